"""Sinusoid regression (Finn et al., 2017) with MAML, first-order MAML, Reptile, iMAML, Neumann hypergradients or a
jointly trained baseline: 10-shot, a 40-40 ReLU MLP, post-adaptation MSE on 600 test sinusoids.

    python examples/sinusoid.py --config maml                  # one of configs/sinusoid/*.yaml
    python examples/sinusoid.py --config imaml meta.steps=2000 # any key can be overridden as key=value
    python examples/sinusoid.py --config imaml --resume        # continue from the last checkpoint
    python examples/sinusoid.py --config maml run.device=cpu   # auto (default: the GPU if any), cpu, cuda:1 ...

Writes results.json, metrics.csv, curves.png and checkpoint.pt into runs/sinusoid/<config>/ (or run.dir=...).
"""

import sys
from pathlib import Path

# run from a checkout without installing; appended, so that an installed or PYTHONPATH bilevel comes first
sys.path.append(str(Path(__file__).resolve().parents[1]))

from tasks.sinusoid.train import cli  # noqa: E402

if __name__ == "__main__":
    cli()
