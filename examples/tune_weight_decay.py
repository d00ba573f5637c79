"""Tune weight decay by hypergradient descent, against grid and random search on the same task.

    python examples/tune_weight_decay.py data.name=iris
    python examples/tune_weight_decay.py data.name=breast_cancer outer.method=neumann
    python examples/tune_weight_decay.py data.name=my_table.csv data.target=label data.task=multiclass
    python examples/tune_weight_decay.py configs/weight_decay/digits_noise_feature.yaml data.seed=1 --overwrite
    python examples/tune_weight_decay.py data.name=iris device=cpu       # auto (default: the GPU if any), cuda:1 ...

Data: any scikit-learn loader by name (``iris``, ``wine``, ``breast_cancer``, ``diabetes``, ``digits``), a CSV or
NPZ file (``data.target`` names the target column; ``data.task`` = auto | regression | binary | multiclass), or
``mnist`` / ``fashion-mnist`` (read from ``data.root`` or ``$BILEVEL_DATA``). Arguments are YAML files (merged in
order) and ``key=value`` overrides of the schema in ``tasks/weight_decay/config.py``; unknown keys are errors.
Writes ``results.json``, ``history.png`` and ``landscape.png`` to ``out_dir`` (default
``runs/weight_decay/<data set>``); a folder holding a run (any of those files, or ``wandb/``) is refused unless
``--overwrite``. wandb runs offline unless ``wandb.mode=online``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from tasks.weight_decay.experiment import cli  # noqa: E402

if __name__ == "__main__":
    cli()
