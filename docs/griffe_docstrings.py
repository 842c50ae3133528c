"""Griffe extension for the API reference: reads the package's docstrings as the package writes them.

The docstrings follow anomalib's style: a singular ``Example:`` section of doctests, and Sphinx roles
(``:class:`MvfaModel```) for cross-references. Griffe's Google parser knows only ``Examples:`` (it
renders ``Example:`` as an admonition of plain Markdown, where ``>>>`` turns into quotes) and no roles.
This extension rewrites both on the docstring text before it is parsed; the source is not changed.
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension, Object

SINGULAR_EXAMPLE = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)
SPHINX_ROLE = re.compile(r":(?:class|func|meth|attr|mod|data|exc|obj|const):`~?([^`]+)`")


class DocstringStyle(Extension):
    """Turn ``Example:`` into ``Examples:`` and ``:role:`name``` into ``name`` in code."""

    def on_instance(self, *, obj: Object, **kwargs: Any) -> None:
        """Rewrite the docstring of every object griffe loads."""
        if obj.docstring is not None:
            text = SINGULAR_EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
            obj.docstring.value = SPHINX_ROLE.sub(r"`\1`", text)
