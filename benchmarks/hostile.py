"""What hostile inputs cost: time to refuse a catastrophic regex, memory and output of floods.

Each figure is a ratio against a baseline measured in the same run on the same tiny model:

- regex: ``screen()`` of a catastrophic ``target_modules`` over a Llama-7B's module names
  (refused at the budget) against an ordinary pattern over the same names, and the plugin's
  wall time on the hostile adapter against the same adapter unchanged;
- memory: peak RSS (``wait4``) of the plugin on a merged checkpoint that declares an extra
  6 GiB tensor over a sparse file, against the unchanged merge;
- output: bytes printed and peak RSS with a 50 MB config value, against the unchanged merge.

    python benchmarks/hostile.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import contextlib

import common
from common import GiB, measure, provenance, python, set_out, table, write_json


def llama7b_names() -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for i in range(32):
        for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                     "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            names.append(f"model.layers.{i}.{part}.weight")
        names += [f"model.layers.{i}.input_layernorm.weight",
                  f"model.layers.{i}.post_attention_layernorm.weight"]
    return names


def regex_figures() -> list[list[str]]:
    from harness.errors import AdapterError
    from harness.io.patterns import PatternMatcher, module_names, screen

    names = module_names(llama7b_names())
    started = time.perf_counter()
    screen({"target_modules": r".*\.(q_proj|v_proj)"}, names, PatternMatcher("x"))
    ordinary = time.perf_counter() - started
    started = time.perf_counter()
    with contextlib.suppress(AdapterError):
        screen({"target_modules": "(.|.|.)*Z"}, names, PatternMatcher("x"))
    hostile = time.perf_counter() - started
    return [["screen() over 7B module names", f"{ordinary * 1e3:.2f} ms",
             f"{hostile:.2f} s (refused)", f"{hostile / ordinary:.0f}x"]]


def log_size(label: str) -> int:
    """Bytes a measured run printed (``common.measure`` keeps its whole output in a log)."""
    return (common._out[0] / "logs" / f"{label}-{os.getpid()}.log").stat().st_size


def plugin(cwd: Path, label: str, *args: str):
    return measure(label, [python(), "-m", "pytest", "-p", "no:randomly", "-p",
                           "no:cacheprovider", *args], cwd=cwd,
                   env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, timeout=900)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.out is not None:
        set_out(args.out)
    from harness.tiny import build_adapter, build_base, peft_merge

    root = Path(tempfile.mkdtemp(prefix="hostile-bench-"))
    try:
        base = build_base(root / "base")
        adapter = build_adapter(base, root / "adapter")
        merged = peft_merge(base, adapter, root / "merged")
        rows = regex_figures()

        hostile_adapter = Path(shutil.copytree(adapter, root / "hostile-adapter"))
        config = json.loads((hostile_adapter / "adapter_config.json").read_text())
        config["target_modules"] = "(.|.|.)*Z"
        (hostile_adapter / "adapter_config.json").write_text(json.dumps(config))
        common = ["--merged-model", str(merged), "--base-model", str(base)]
        plain = plugin(root, "regex-baseline", "--merge-checks", "weights", *common,
                       "--adapter", str(adapter))
        bad = plugin(root, "regex-hostile", "--merge-checks", "weights", *common,
                     "--adapter", str(hostile_adapter))
        rows.append(["plugin, weights family (wall)", f"{plain.wall_s:.2f} s",
                     f"{bad.wall_s:.2f} s (exit {bad.returncode})",
                     f"{bad.wall_s / plain.wall_s:.2f}x"])

        sparse = Path(shutil.copytree(merged, root / "sparse"))
        path = sparse / "model.safetensors"
        raw = path.read_bytes()
        (size,) = struct.unpack("<Q", raw[:8])
        header, data = json.loads(raw[8:8 + size]), raw[8 + size:]
        extra = 6 * GiB
        header["extra.weight"] = {"dtype": "F32", "shape": [extra // 4],
                                  "data_offsets": [len(data), len(data) + extra]}
        text = json.dumps(header).encode()
        path.write_bytes(struct.pack("<Q", len(text)) + text + data)
        os.truncate(path, 8 + len(text) + len(data) + extra)
        checks = ["--merge-checks", "structure,hash"]
        baseline = plugin(root, "memory-baseline", *checks, *common)
        six = plugin(root, "memory-6gib", *checks, "--merged-model", str(sparse),
                     "--base-model", str(base))
        rows.append(["peak RSS, extra 6 GiB tensor", f"{baseline.peak_rss_bytes / GiB:.3f} GiB",
                     f"{six.peak_rss_bytes / GiB:.3f} GiB (exit {six.returncode})",
                     f"{six.peak_rss_bytes / baseline.peak_rss_bytes:.2f}x"])

        flood = Path(shutil.copytree(merged, root / "flood"))
        config = json.loads((flood / "config.json").read_text())
        config["notes"] = "x" * (50 * 1024 * 1024)
        (flood / "config.json").write_text(json.dumps(config))
        big = plugin(root, "flood-50mb", "--merge-checks", "structure", "--merged-model",
                     str(flood), "--base-model", str(base))
        plain_structure = plugin(root, "flood-baseline", "--merge-checks", "structure", *common)
        printed = {m.label: log_size(m.label) for m in (plain_structure, big)}
        rows.append(["bytes printed, 50 MB config value", f"{printed['flood-baseline']} B",
                     f"{printed['flood-50mb']} B (exit {big.returncode})",
                     f"{printed['flood-50mb'] / printed['flood-baseline']:.2f}x"])
        rows.append(["peak RSS, 50 MB config value",
                     f"{plain_structure.peak_rss_bytes / GiB:.3f} GiB",
                     f"{big.peak_rss_bytes / GiB:.3f} GiB",
                     f"{big.peak_rss_bytes / plain_structure.peak_rss_bytes:.2f}x"])
        print(table(["case", "baseline", "hostile", "ratio"], rows))
        written = write_json("hostile", {"rows": rows, "provenance": provenance(),
                                         "runs": [m.to_json() for m in (plain, bad, baseline,
                                                                        six, big,
                                                                        plain_structure)]})
        print(f"wrote {written}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
