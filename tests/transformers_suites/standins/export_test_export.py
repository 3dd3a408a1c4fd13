"""Stand-in for transformers' `tests/exporters/test_export.py` (not in the sdist): the base class
`ModelTesterMixin` extends. It adds no tests; GhostVis's compile test (`tests/test_modeling.py`) covers the static-cache
graph capture that export relies on."""


class ExportTesterMixin:
    pass
