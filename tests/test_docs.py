"""The README's quick example and the docstring examples run as written."""

import doctest
import re
from pathlib import Path

import pytest

import bilevel
from bilevel import inner, methods, testing

ROOT = Path(__file__).resolve().parents[1]


def test_readme_quick_example_runs():
    code = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)[0]
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["out"].grad.keys() == {"log_l2"}
    assert bool(namespace["out"].linear_info.converged)


@pytest.mark.parametrize("module", [methods, inner, testing], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, extraglobs={"bl": bilevel}, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
