"""The documentation runs as written and covers the public API.

Every ```python block of a docs page runs, in order, in one namespace per page; a block preceded by
``<!-- not run: <reason> -->`` is skipped (it needs files a fresh checkout does not have). The API reference
(``docs/api/*.md``, one ``::: bilevel.<name>`` per public name) is checked against the ``__all__`` of ``bilevel``,
``bilevel.layers``, ``bilevel.interop`` and its bridges, and every page against the site's navigation
(``mkdocs.yml``). The site itself is built by ``make docs-build`` (``mkdocs build --strict``) in CI.
"""

import doctest
import inspect
import re
from pathlib import Path

import pytest
import yaml

import bilevel
import bilevel.interop
import bilevel.layers
from bilevel import inner, methods, testing

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
BLOCK = re.compile(r"(?:<!-- not run: (?P<reason>.*?) -->\n)?```python\n(?P<code>.*?)```", re.S)
PUBLIC_MODULES = (bilevel, bilevel.layers, bilevel.interop, bilevel.interop.learn2learn)
PAGES = sorted(p for p in DOCS.rglob("*.md") if BLOCK.search(p.read_text()))


def _blocks(path):
    """(code, reason to skip or None) for every python block of a Markdown file, in order."""
    return [(m["code"], m["reason"]) for m in BLOCK.finditer(path.read_text())]


def test_readme_quick_example_runs():
    (code, _), *_ = _blocks(ROOT / "README.md")
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["out"].grad.keys() == {"log_l2"}
    assert bool(namespace["out"].linear_info.converged)


def test_readme_and_home_page_show_the_same_example():
    assert _blocks(ROOT / "README.md")[0][0] == _blocks(DOCS / "index.md")[0][0], (
        "the quick example differs between README.md and docs/index.md: copy one to the other")


def _results_table(text):
    start = text.index("| workload |")
    return text[start:text.index("\n\n", start)].replace("(docs/", "(").strip()


def test_readme_and_results_page_show_the_same_table():
    assert _results_table((ROOT / "README.md").read_text() + "\n\n") == _results_table(
        (DOCS / "results.md").read_text() + "\n\n"), (
        "the headline results differ between README.md and docs/results.md: edit both (links drop `docs/`)")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_page_snippets_run(page):
    """Blocks run in order; a block marked `not run` is still compiled and its imports still run."""
    name = str(page.relative_to(ROOT))
    namespace = {"__name__": f"docs_{page.stem}"}
    for code, reason in _blocks(page):
        compiled = compile(code, name, "exec")
        if reason is None:
            exec(compiled, namespace)
        else:
            assert reason.strip(), f"{name}: a `not run` marker needs a reason"
            imports = "\n".join(line for line in code.splitlines() if line.startswith(("import ", "from ")))
            exec(compile(imports, name, "exec"), namespace)


def _documented():
    return {name for page in (DOCS / "api").glob("*.md")
            for name in re.findall(r"^::: *([\w.]+)", page.read_text(), re.M)}


def test_api_reference_covers_every_public_name():
    public = {f"{module.__name__}.{name}" for module in PUBLIC_MODULES for name in module.__all__}
    assert {"bilevel.layers.fixed_point", "bilevel.layers.root", "bilevel.layers.argmin"} <= public
    missing = sorted(public - _documented())
    assert not missing, f"public names missing from the API reference: {missing}; add `::: <name>` to a docs/api page"


def test_api_reference_names_exist():
    for name in _documented():
        obj = bilevel
        for part in name.split(".")[1:]:
            assert hasattr(obj, part), f"docs/api names {name}, which does not exist: fix or remove the `:::` line"
            obj = getattr(obj, part)


def _args_entries(doc):
    """The names in a Google-style ``Args:`` section (``a, b: ...`` groups several)."""
    lines, names = doc.splitlines(), []
    for i, line in enumerate(lines):
        if line.strip() != "Args:":
            continue
        indent = None
        for entry in lines[i + 1:]:
            if not entry.strip():
                continue
            depth = len(entry) - len(entry.lstrip())
            indent = depth if indent is None else indent
            if depth < indent:
                break
            if depth == indent:
                names += [n.strip() for n in entry.split(":", 1)[0].split(",")]
    return names


def _public_callables():
    for module in PUBLIC_MODULES:
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                yield f"{module.__name__}.{name}", obj
                members = vars(obj).items() if inspect.isclass(obj) else ()
                yield from ((f"{module.__name__}.{name}.{m}", f) for m, f in members
                            if inspect.isfunction(f) and not m.startswith("_"))


def test_documented_arguments_exist():
    """Every name under ``Args:`` is a parameter (the site's build is told to accept ``a, b:`` groups)."""
    wrong = []
    for path, obj in _public_callables():
        try:
            params = inspect.signature(obj).parameters.values()
        except (TypeError, ValueError):  # builtins without a signature
            continue
        stars = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}
        names = {p.name for p in params} | {stars[p.kind] + p.name for p in params if p.kind in stars}
        wrong += [f"{path}: {name!r}" for name in _args_entries(inspect.getdoc(obj) or "") if name not in names]
    assert not wrong, f"docstring Args that are not parameters (rename or move to the description): {wrong}"


def _nav_pages(nav):
    for entry in nav:
        value = entry if isinstance(entry, str) else next(iter(entry.values()))
        if isinstance(value, list):
            yield from _nav_pages(value)
        else:
            yield value


def test_every_page_is_in_the_navigation():
    nav = set(_nav_pages(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]))
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert not pages - nav, f"docs pages not in mkdocs.yml's nav: {sorted(pages - nav)}; add them there"
    assert not nav - pages, f"mkdocs.yml's nav names missing pages: {sorted(nav - pages)}"


@pytest.mark.parametrize("module", [methods, inner, testing], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, extraglobs={"bl": bilevel}, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
