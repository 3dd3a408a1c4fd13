"""Fetch transformers' own common test suites for the testers in this folder.

The suites (`test_modeling_common.py`, `test_configuration_common.py`, `test_processing_common.py`) come from the
transformers sdist on PyPI matching the installed version, fetched once with `pip download` into
`.cache/transformers-suites/<version>/` (git-ignored). The sdist does not ship the modules they import; the small
stand-ins in `standins/` take their place, and the image fixtures the processor suite names by Hub URL are drawn here.
A failed fetch fails the run: there is no silent skip.
"""

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import transformers
from PIL import Image

HERE = Path(__file__).resolve().parent
SUITES = ("test_modeling_common.py", "test_configuration_common.py", "test_processing_common.py")
STANDINS = {  # stand-in file -> where the suites import it from
    "generation_test_utils.py": "transformers_tests/generation/test_utils.py",
    "export_test_export.py": "transformers_tests/exporters/test_export.py",
    "configuration_test_utils.py": "transformers_tests/utils/test_configuration_utils.py",
    "fetch_hub_objects_for_ci.py": "utils/fetch_hub_objects_for_ci.py",
}
IMAGE_FIXTURES = ("coco_sample.png", "australia.jpg")


def _download_suites(version: str, dest: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
        cmd += ["--dest", tmp, f"transformers=={version}"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        sdists = list(Path(tmp).glob("transformers-*.tar.gz"))
        if result.returncode != 0 or not sdists:
            raise RuntimeError(
                f"Could not fetch the transformers {version} sdist for its common test suites "
                f"({' '.join(cmd)}):\n{result.stdout}{result.stderr}"
            )
        with tarfile.open(sdists[0]) as tar:
            for name in SUITES:
                member = tar.getmember(f"{sdists[0].name[: -len('.tar.gz')]}/tests/{name}")
                (dest / "transformers_tests" / name).write_bytes(tar.extractfile(member).read())


def _draw_fixtures(folder: Path) -> None:
    rng = np.random.default_rng(0)
    for name, size in zip(IMAGE_FIXTURES, ((640, 480), (500, 333))):
        if (folder / name).exists():  # deterministic: drawn once per cache folder
            continue
        pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name)


def suites_folder() -> Path:
    """The folder holding `transformers_tests/` (fetched suites + stand-ins) for the installed transformers."""
    version = transformers.__version__
    root = HERE.parents[1] / ".cache" / "transformers-suites" / version
    if not (root / "transformers_tests" / SUITES[-1]).exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=root.parent))
        (staging / "transformers_tests").mkdir()
        _download_suites(version, staging)
        shutil.rmtree(root, ignore_errors=True)
        os.replace(staging, root)  # whole folder or nothing: a failed fetch leaves no half-filled cache
    for package in ("transformers_tests", "transformers_tests/generation", "transformers_tests/exporters",
                    "transformers_tests/utils"):
        (root / package).mkdir(exist_ok=True)
        (root / package / "__init__.py").touch()
    (root / "utils" / "fixtures").mkdir(parents=True, exist_ok=True)
    for standin, target in STANDINS.items():  # refreshed every run (ours, and they may change), but a real module
        path = root / target  # put there (e.g. the full generation suite from a transformers checkout) is kept
        if not path.exists() or "Stand-in for transformers'" in path.read_text():
            shutil.copy(HERE / "standins" / standin, path)
    _draw_fixtures(root / "utils" / "fixtures")
    return root


sys.path.insert(0, str(suites_folder()))

# Markers the suites (and transformers.testing_utils' decorators) put on tests; ours run with --strict-markers.
UPSTREAM_MARKERS = (
    "accelerate_tests", "generate", "flash_attn_test", "flash_attn_3_test", "flash_attn_4_test",
    "torch_compile_test",
    "is_agent_test", "is_expert_parallel_test", "is_fsdp_test", "is_pipeline_test", "is_staging_test",
    "is_tensor_parallel_test", "is_training_test", "order",
)


def pytest_configure(config):
    for marker in UPSTREAM_MARKERS:
        config.addinivalue_line("markers", f"{marker}: marker of transformers' common test suites")
