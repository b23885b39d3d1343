"""The docstring examples of every ce_dynamics module run and print what they show (as
`pytest --doctest-modules ce_dynamics` would)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import ce_dynamics

MODULES = sorted(m.name for m in pkgutil.iter_modules(ce_dynamics.__path__, prefix="ce_dynamics."))


@pytest.mark.parametrize("name", ["ce_dynamics", *MODULES])
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in doctest.DocTestFinder().find(module, name):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples of {name} failed"


def test_the_package_has_docstring_examples() -> None:
    """Guards the test above against finding nothing (a rename, a moved docstring)."""
    found = sum(len(t.examples) for name in MODULES
                for t in doctest.DocTestFinder().find(importlib.import_module(name), name))
    assert found >= 4
