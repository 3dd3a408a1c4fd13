"""Stand-in for transformers' `utils/fetch_hub_objects_for_ci.py` (not in the sdist): maps the Hub URL of a test
fixture to a local file. The image fixtures are drawn by `tests/transformers_suites/conftest.py`; GhostVis has no
video or audio input, so those paths are never opened."""

import os

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def url_to_local_path(url, **kwargs):
    """The local copy of a fixture URL (never the URL: these tests must not reach the network)."""
    return os.path.join(FIXTURES, url.rsplit("/", 1)[-1])
