"""Tune weight decay by hypergradient descent, against grid and random search on the same task.

    python examples/tune_weight_decay.py configs/weight_decay/digits_scalar.yaml
    python examples/tune_weight_decay.py configs/weight_decay/digits_noise_feature.yaml data.seed=1 outer.method=neumann

Arguments are YAML files (merged in order) and ``key=value`` overrides of the schema in
``tasks/weight_decay/config.py``; unknown keys are errors. MNIST / Fashion-MNIST are read from ``data.root`` or the
``BILEVEL_DATA`` environment variable. Writes ``results.json``, ``history.png`` and ``landscape.png`` to ``out_dir``;
wandb runs offline unless ``wandb.mode=online``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from tasks.weight_decay.config import load_config
from tasks.weight_decay.experiment import run, summary


def main(argv):
    files = [a for a in argv if "=" not in a]
    overrides = [a for a in argv if "=" in a]
    cfg = load_config(files, overrides)
    results = run(cfg)
    print(summary(results))
    print(f"results in {cfg.out_dir}/")


if __name__ == "__main__":
    main(sys.argv[1:])
