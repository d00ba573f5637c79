import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("BILEVEL_DATA", str((ROOT / ".." / "shared" / "data").resolve()))
os.environ.setdefault("WANDB_MODE", "disabled")


# Small problems: one intra-op thread avoids OpenMP spinning (measured far slower on a shared 2-core machine).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    from bilevel.diagnostics import reset_warnings
    reset_warnings()  # warnings come once per call site and cause: every test starts afresh
    yield
