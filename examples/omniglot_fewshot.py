"""Few-shot Omniglot with MAML, first-order MAML, iMAML, Reptile or Neumann hypergradients.

    python examples/omniglot_fewshot.py                                    # demo: ~5 minutes on 2 CPU cores
    python examples/omniglot_fewshot.py --config maml_5w1s                 # paper settings (for a GPU)
    python examples/omniglot_fewshot.py --config fomaml_5w1s meta.batch=8 meta.steps=2000 wandb.mode=disabled
    python examples/omniglot_fewshot.py --config maml_5w1s --resume        # continue from the last checkpoint

Data: ``data.root=...`` or ``$BILEVEL_DATA`` (a folder holding ``omniglot/`` or the Omniglot zips); missing
official files are downloaded. Configs: ``configs/omniglot/*.yaml``; any key can be overridden as ``key=value``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from tasks.omniglot.train import cli  # noqa: E402

if __name__ == "__main__":
    cli()
