"""The source distribution is complete: it holds the tests, fixtures and scripts; its tests run."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tracked() -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    return listed.stdout.split() if listed.returncode == 0 else []


def test_sdist_is_complete_and_runs_its_own_tests(tmp_path):
    files = _tracked()
    if not files:  # not a git checkout (e.g. already an sdist): build from the tree as it is
        files = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file()]
    source = tmp_path / "source"
    for name in files:
        target = source / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((ROOT / name).read_bytes())
    built = subprocess.run(
        [sys.executable, "-c",
         "import sys; from setuptools import build_meta;"
         " print(build_meta.build_sdist(sys.argv[1]))",
         str(tmp_path / "dist")],
        cwd=source, capture_output=True, text=True, timeout=300, check=False,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    archive = tmp_path / "dist" / built.stdout.strip().splitlines()[-1]
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    (unpacked,) = (tmp_path / "unpacked").iterdir()
    for needed in ("tests/conftest.py", "conftest.py", "fixtures/tiny/merged/model.safetensors",
                   "fixtures/gate/merge-harness.toml", ".ci/run", ".ci/demo", "action.yml",
                   "tox.ini", "harness/schema/report.schema.json", "LICENSE"):
        assert (unpacked / needed).is_file(), f"the sdist lacks {needed}"
    assert not list(unpacked.rglob("__pycache__"))
    # Its own tests run from the unpacked tree (the quick ones; the rest are the same files).
    env = {**os.environ, "PYTHONPATH": str(unpacked)}
    ran = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
         "tests/test_layering.py", "tests/test_ulp.py"],
        cwd=unpacked, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert ran.returncode == 0, ran.stdout[-3000:]
