"""What the library depends on. Its only dependency is torch (numpy and the rest belong to the workloads' extras), and
the one private torch API it uses, ``torch.utils._pytree``, is imported only by ``bilevel/tree.py``: what bilevel
needs of it is pinned here, so that a torch release that changes it fails here by name rather than deep inside a
solver."""

from pathlib import Path
from typing import NamedTuple

import torch

import bilevel
from bilevel import tree
from bilevel.types import SolveInfo

SOURCE = Path(bilevel.__file__).parent


def test_the_library_imports_only_torch():
    import tomllib
    declared = tomllib.loads((SOURCE.parent / "pyproject.toml").read_text())["project"]["dependencies"]
    assert [d.split(">")[0].split("=")[0] for d in declared] == ["torch"]
    imports = sorted(str(p.relative_to(SOURCE)) for p in SOURCE.rglob("*.py")
                     if any(line.startswith(("import numpy", "from numpy")) for line in p.read_text().splitlines()))
    assert imports == [], f"bilevel/ imports numpy, which is not a declared dependency: {imports}"


def test_only_tree_imports_the_private_module():
    users = sorted(str(p.relative_to(SOURCE)) for p in SOURCE.rglob("*.py") if "_pytree" in p.read_text())
    assert users == ["tree.py"], f"import pytree through bilevel.tree, not torch.utils._pytree: {users}"


class Pair(NamedTuple):
    a: torch.Tensor
    b: tuple


def test_tree_map_leaves_and_round_trip():
    x, y, z = torch.tensor(1.0), torch.tensor([2.0, 3.0]), torch.tensor(4.0)
    value = {"w": x, "state": (y, [z]), "pair": Pair(x, (y,))}
    doubled = tree.pytree.tree_map(lambda t: 2 * t, value)
    assert isinstance(doubled["pair"], Pair) and isinstance(doubled["state"][1], list)
    torch.testing.assert_close(doubled["state"][0], 2 * y)
    assert [t.tolist() for t in tree.pytree.tree_leaves(value)] == [1.0, [2.0, 3.0], 4.0, 1.0, [2.0, 3.0]]
    leaves, spec = tree.tree_flatten(value)
    rebuilt = tree.tree_unflatten([t + 1 for t in leaves], spec)
    assert rebuilt.keys() == value.keys() and float(rebuilt["pair"].a) == 2.0
    # several trees at once (meta_grad stacks per-task results this way), including bilevel's own NamedTuples
    infos = [SolveInfo(*(torch.tensor(float(i)) for _ in SolveInfo._fields)) for i in range(3)]
    stacked = tree.pytree.tree_map(lambda *xs: torch.stack(xs), *infos)
    assert isinstance(stacked, SolveInfo) and stacked.steps.tolist() == [0.0, 1.0, 2.0]
