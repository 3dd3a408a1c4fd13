"""Every docstring example (`>>>`) of the package runs, one test per module: an example that is not run is not one.

The docstrings fence their examples in Markdown (```python ... ```, as TRL and transformers write them). Plain
`doctest` would read the closing fence as part of the expected output, so the parser below ends an example's output
at a fence line; everything else is the standard library's doctest (pytest's `--doctest-modules` takes no parser
short of replacing its collector, as transformers' conftest does, which is why this is a test file rather than a flag).

Examples run in a temporary working directory. Every module must import on a CPU-only machine without network; one
that cannot goes in `CANNOT_IMPORT_ON_CPU` with the reason and is skipped with it, any other import error fails.
"""

import doctest
import importlib
import io
import pkgutil
import re

import pytest

import ghostvis_hf

CANNOT_IMPORT_ON_CPU: dict[str, str] = {}  # module name -> why it cannot be imported on a CPU-only machine

_FENCE = re.compile(r"^[ \t]*```.*$", re.MULTILINE)


class _FencedDocTestParser(doctest.DocTestParser):
    def parse(self, string, name="<string>"):
        # A blank line ends an example's expected output; blanking the fence keeps every line number.
        return super().parse(_FENCE.sub("", string), name)


def _module_names() -> list[str]:
    def refuse(name):
        if name not in CANNOT_IMPORT_ON_CPU:
            raise ImportError(f"cannot import package {name} to list its modules")

    names = [ghostvis_hf.__name__]
    names += [m.name for m in pkgutil.walk_packages(ghostvis_hf.__path__, "ghostvis_hf.", onerror=refuse)]
    return sorted(names)


@pytest.mark.parametrize("name", _module_names())
def test_docstring_examples(name, tmp_path, monkeypatch):
    if name in CANNOT_IMPORT_ON_CPU:
        pytest.skip(CANNOT_IMPORT_ON_CPU[name])
    monkeypatch.chdir(tmp_path)  # examples that write a file write it here
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(parser=_FencedDocTestParser())
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report = io.StringIO()
    failed = sum(runner.run(test, out=report.write).failed for test in finder.find(module, name))
    assert failed == 0, f"{failed} docstring example(s) of {name} failed:\n{report.getvalue()}"
