"""Helpers of the export tests: the committed GGUF fixtures, running the family, editing copies."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from harness.checks.export import checks
from harness.run.context import Context
from harness.run.result import CheckResult
from harness.run.runner import run_check
from harness.run.settings import Settings

GGUF = Path(__file__).resolve().parent.parent / "fixtures" / "gguf"
LLAMA = GGUF / "llama"
MERGED = LLAMA / "merged"
BASE = LLAMA / "base"
TYPES = ("f32", "f16", "bf16", "q8_0")


def export_file(outtype: str) -> Path:
    """The committed conversion of the tiny merge in ``outtype``."""
    return GGUF / f"llama-{outtype}.gguf"


def fault(name: str) -> Path:
    """A committed faulty conversion (fixtures/gguf/faults)."""
    return GGUF / "faults" / f"{name}.gguf"


def run_export(
    export: Path, merged: Path = MERGED, base: Path | None = BASE
) -> dict[str, CheckResult]:
    """Every export check of ``export``, by check kind (``values``...), run as the plugin runs."""
    settings = Settings(merged=merged, base=base, exports=(export,))
    ctx = Context(settings)
    return {check.name.split("[")[0]: run_check(check, ctx) for check in checks(settings)}


def outcomes(results: dict[str, CheckResult]) -> dict[str, str]:
    """kind -> ``outcome: message`` (readable assertion failures)."""
    return {kind: f"{r.outcome.value}: {r.message}" for kind, r in results.items()}


def copy_to(source: Path, folder: Path) -> Path:
    """A private copy of ``source`` a test may damage."""
    target = folder / source.name
    shutil.copy2(source, target)
    return target


def gguf_tool(script: str, *args: str) -> None:
    """Run one of gguf's own command-line tools (``gguf_set_metadata``...), as a user would."""
    command = [sys.executable, "-m", f"gguf.scripts.{script}", *args]
    done = subprocess.run(command, capture_output=True, text=True, check=False, input="y\n")
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: {done.stderr[-2000:]}")


def build_module() -> ModuleType:
    """fixtures/gguf/build.py as a module (the converter-driving helpers)."""
    spec = importlib.util.spec_from_file_location("gguf_fixture_build", GGUF / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
