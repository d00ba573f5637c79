"""Griffe extension for the API reference: read a docstring's ``Example:`` section as Google-style ``Examples:``.

The project's docstrings head their doctests ``Example:`` (as Napoleon and the Google style guide allow); griffe
parses only the plural as an examples section and would otherwise render ``>>>`` lines as Markdown block quotes.
"""

import re

import griffe

_HEADING = re.compile(r"^(\s*)Example:\s*$", re.M)


class ExampleSections(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _HEADING.sub(r"\1Examples:", obj.docstring.value)
