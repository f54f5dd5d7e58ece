"""A merge with one layer's delta doubled, and the behaviour family alone run on it.

    python benchmarks/fault_layer.py --preset 7b --layer 15
    python benchmarks/fault_layer.py --preset 1.1b --layer 10 --pytest-args "--merge-memory 3GiB"

Makes ``<case>/merged-layer<K>-x2`` next to the generated case (``benchmarks/generate.py``,
never committed): a copy of the correct merge whose tensors of layer K are
``base + 2 * (merged - base)``, the rest byte for byte (each shard copied, the layer's tensors
rewritten in place, one tensor in memory at a time). Then runs ``pytest --merge-checks
behaviour`` on it in a child process (wall time and peak RSS as ``verify.py`` measures them)
and prints each check's outcome; the run must fail.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import generate
from common import PRESETS, child_env, gib, machine, measure, python, use_harness_src, write_json


def write_fault(merged: Path, base: Path, out: Path, layer: int) -> list[str]:
    """Copy ``merged`` to ``out`` with layer ``layer``'s delta doubled; the changed tensors."""
    import torch

    from harness.io.checkpoint import Checkpoint
    from harness.io.safetensors import tensor_from_bytes

    pattern = re.compile(rf"\.layers\.{layer}\.")
    source, original = Checkpoint.open(merged), Checkpoint.open(base)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(merged, partial)
    changed = []
    for info in source.in_file_order():
        if not pattern.search(info.name) or info.name not in original.tensors:
            continue
        w = tensor_from_bytes(original.tensors[info.name], original.read_bytes(info.name))
        m = tensor_from_bytes(info, source.read_bytes(info.name))
        if torch.equal(w, m):
            continue
        # the merge's delta added twice: base + 2 * (merged - base), rounded once
        doubled = (w.double() + 2 * (m.double() - w.double())).to(m.dtype).contiguous()
        with (partial / info.file.name).open("r+b") as handle:
            handle.seek(info.start)
            handle.write(doubled.view(torch.uint8).numpy().tobytes())
        changed.append(info.name)
    partial.rename(out)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="1.1b")
    parser.add_argument("--layer", type=int, default=None, help="default: the middle layer")
    parser.add_argument("--root", type=Path, default=generate.DEFAULT_ROOT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--harness-src", type=Path, default=None, metavar="DIR")
    parser.add_argument("--pytest-args", default="", help="extra pytest arguments, one string")
    parser.add_argument("--timeout", type=float, default=3600.0)
    args = parser.parse_args(argv)
    use_harness_src(args.harness_src)
    info = generate.ensure_in_child(args.preset, root=args.root, seed=args.seed)
    layer = PRESETS[args.preset].layers // 2 if args.layer is None else args.layer
    faulty = Path(info["merged"]).with_name(f"merged-layer{layer}-x2")
    if not faulty.is_dir():
        changed = write_fault(Path(info["merged"]), Path(info["base"]), faulty, layer)
        print(f"wrote {faulty}: {len(changed)} tensors of layer {layer} with the delta doubled")
    work = Path(tempfile.mkdtemp(prefix="fault-layer-"))
    junit = work / "junit.xml"
    command = [python(), "-m", "pytest", "--merged-model", str(faulty), "--base-model",
               str(info["base"]), "--adapter", str(info["adapter"]), "--merge-checks",
               "behaviour", "-p", "no:cacheprovider", "-q", f"--junitxml={junit}",
               *args.pytest_args.split()]
    result = measure("behaviour on the faulty merge", command, cwd=work, env=child_env(),
                     timeout=args.timeout)
    outcomes = {}
    if junit.exists():
        for case in ET.parse(junit).getroot().iter("testcase"):
            state = "failed" if case.find("failure") is not None else (
                "skipped" if case.find("skipped") is not None else "passed")
            outcomes[case.get("name", "?")] = (state, float(case.get("time", "0")))
    shutil.rmtree(work, ignore_errors=True)
    print(f"{args.preset}, layer {layer} x2: exit {result.returncode}, wall {result.wall_s:.1f} s,"
          f" peak RSS {gib(result.peak_rss_bytes)} GiB")
    for name, (state, seconds) in outcomes.items():
        print(f"  behaviour::{name}: {state} ({seconds:.1f} s)")
    lines = [ln for ln in result.output_tail.splitlines() if "merge::behaviour::" in ln]
    print("\n".join(lines))
    path = write_json(f"fault-layer-{args.preset}", {
        "machine": machine(), "preset": args.preset, "layer": layer, "command": command,
        "result": result.to_json(), "outcomes": outcomes, "argv": sys.argv})
    print(f"written {path}")
    print(json.dumps({"caught": result.returncode == 1 and any(
        s == "failed" for s, _ in outcomes.values())}))
    return 0 if result.returncode == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
