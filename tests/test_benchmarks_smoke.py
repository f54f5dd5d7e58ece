"""Keep the benchmark scripts from rotting: generate a micro case and run contender (c) on it.

The real measurements (0.5B, 1.1B, 7B) are never part of the test run; this only proves that
``benchmarks/generate.py`` writes a checkpoint the harness accepts and that ``verify.py``'s
harness path runs, passes and writes its JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VERIFY = ROOT / "benchmarks" / "verify.py"


def test_verify_harness_path_on_micro_preset(tmp_path: Path) -> None:
    command = [sys.executable, str(VERIFY), "--preset", "micro", "--only", "c", "--cache", "warm",
               "--root", str(tmp_path / "models"), "--out", str(tmp_path / "out"),
               "--max-shard-size", "200KB"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    case = tmp_path / "models" / "micro-seed0"
    base_files = sorted(p.name for p in (case / "base").glob("*.safetensors"))
    assert base_files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert (case / "base" / "model.safetensors.index.json").exists()
    assert (case / "adapter" / "adapter_config.json").exists()
    results = list((tmp_path / "out").glob("verify-micro-*.json"))
    assert len(results) == 1
    data = json.loads(results[0].read_text())
    harness_run = data["runs"][0]["results"]["c"]
    assert harness_run["returncode"] == 0
    assert harness_run["wall_s"] > 0
    assert harness_run["peak_rss_bytes"] > 0
    # The generated merge really differs from its base (a no-op merge would fail (c) anyway).
    assert "hash" in data["runs"][0]["families_c"]
    assert any(name.startswith("hash::") for name in harness_run["extra"]["check_seconds"])
