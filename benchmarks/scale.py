"""Scale-out figures: the streamed pass divided among xdist workers and among CI shards.

    python benchmarks/scale.py --preset 1.1b [--repeat 3] [--shards 4] [--workers 2]

Contenders, each a child process measured alone with a warm page cache (wall time, user +
system CPU seconds of the process tree from ``wait4``), all with
``--merge-checks structure,weights,hash`` from an empty folder:

  (n0)  ``pytest -n 0``                         the baseline: one process, one pass
  (n2)  ``pytest -n 2``                         xdist workers dividing one pass
  (kN)  ``pytest --merge-shard K/N``, K = 1..N  each part alone, as one CI job would run it
  (c)   ``merge-harness combine`` of the N reports

Printed: CPU(n2)/CPU(n0) and wall(n2)/wall(n0) (targets 1.15 and 1.0); each part's bytes read
against the unsharded pass's (target 0.30 for 4 parts); the sum of the parts' wall times
against the unsharded wall time (target 1.2); and whether the combined verdict, digests and
per-check outcomes equal the unsharded run's. Each contender runs ``--repeat`` times and the
median wall time is kept (CPU from the same run).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import generate
from common import (
    PRESETS,
    Measurement,
    child_env,
    machine,
    measure,
    median_run,
    prepare_cache,
    provenance,
    python,
    set_out,
    table,
    use_harness_src,
    weight_files,
    write_json,
)

FAMILIES = "--merge-checks=structure,weights,hash"
TARGETS = {"cpu n2/n0": 1.15, "wall n2/n0": 1.0, "part bytes": 0.30, "parts wall sum": 1.2}


def _gate(info: dict[str, Any], work: Path, report: Path, *extra: str) -> list[str]:
    return [
        python(), "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider",
        "--rootdir", str(work), FAMILIES, f"--merged-model={info['merged']}",
        f"--base-model={info['base']}", f"--adapter={info['adapter']}",
        f"--merge-report={report}", *extra,
    ]


def _repeat(label: str, command: list[str], work: Path, times: int,
            part: Path | None = None) -> Measurement:
    runs = []
    for _ in range(times):
        run = measure(label, command, cwd=work, env=child_env())
        if part is not None and run.ok:
            # The pass's own seconds, as this very run recorded them: the next run overwrites the
            # report, and the median run's figures must come from one run.
            run.extra["pass_s"] = float(json.loads(part.read_text())["part"]["seconds"])
        runs.append(run)
    return median_run(runs)


def _view(report: dict[str, Any]) -> dict[str, Any]:
    checks = {c["id"]: (c["outcome"], c["message"]) for c in report["checks"]
              if c["id"] != "merge::structure::parts"}
    verdict = {k: v for k, v in report["verdict"].items() if k not in ("exit_status", "counts")}
    return {"verdict": verdict, "digests": report["digests"], "checks": checks}


def _bytes_read(report: dict[str, Any]) -> int:
    for check in report["checks"]:
        if check["id"] == "merge::weights::targeted_match_reference":
            return int(check["metrics"].get("bytes_read", 0))
    return 0


def run(args: argparse.Namespace) -> dict[str, Any]:
    info = generate.ensure_in_child(args.preset, root=args.root, seed=args.seed)
    work = Path(tempfile.mkdtemp(prefix="scale-bench-"))
    files = weight_files(Path(info["base"])) + weight_files(Path(info["merged"]))
    prepare_cache("warm", files)
    whole = work / "whole.json"
    base = _repeat("n0", _gate(info, work, whole, "-n", "0"), work, args.repeat)
    shared = _repeat(f"n{args.workers}",
                     _gate(info, work, work / "shared.json", "-n", str(args.workers)),
                     work, args.repeat)
    parts: list[Measurement] = []
    names: list[str] = []
    for index in range(1, args.shards + 1):
        report = work / f"part-{index}.json"
        names.append(str(report))
        parts.append(_repeat(f"k{index}", _gate(info, work, report,
                                                 f"--merge-shard={index}/{args.shards}"),
                             work, args.repeat, part=report))
    combined_path = work / "combined.json"
    combine = _repeat("c", [python(), "-m", "harness.cli", "combine", *names,
                            f"--merge-report={combined_path}"], work, 1)
    single = json.loads(whole.read_text())
    total = _bytes_read(single)
    part_bytes = [int(json.loads(Path(n).read_text())["part"]["bytes_read"]) for n in names]
    # The rest of a part's wall time is what every job pays to start (interpreter, pytest,
    # torch, the plugin) whatever its share.
    part_pass = [float(p.extra.get("pass_s", float("nan"))) for p in parts]
    combined = json.loads(combined_path.read_text())
    same_shared = _view(json.loads((work / "shared.json").read_text())) == _view(single)
    same_combined = _view(combined) == _view(single)
    assert base.cpu_s and shared.cpu_s and base.wall_s and shared.wall_s
    ratios = {
        "cpu n2/n0": shared.cpu_s / base.cpu_s,
        "wall n2/n0": shared.wall_s / base.wall_s,
        "part bytes": max(part_bytes) / total if total else float("nan"),
        "parts wall sum": sum(p.wall_s or 0.0 for p in parts) / base.wall_s,
    }
    rows = [[m.label, f"{m.wall_s:.1f}", f"{m.cpu_s:.1f}", str(m.returncode)]
            for m in (base, shared, *parts, combine)]
    print(table(["contender", "wall s", "cpu s", "exit"], rows))
    print()
    print(table(["part", "bytes read", "share of unsharded", "pass s", "wall s - pass s"],
                [[f"{i}/{args.shards}", f"{b / 1e9:.3f} GB", f"{b / total:.3f}",
                  f"{s:.1f}", f"{(p.wall_s or 0.0) - s:.1f}"]
                 for i, (b, s, p) in enumerate(zip(part_bytes, part_pass, parts, strict=True),
                                               1)]))
    print()
    print(table(["ratio", "value", "target", "verdict"],
                [[k, f"{v:.3f}", f"<= {TARGETS[k]}", "met" if v <= TARGETS[k] else "MISSED"]
                 for k, v in ratios.items()]))
    print(f"\n-n {args.workers} report equals -n 0: {'yes' if same_shared else 'NO'}")
    print(f"combine of {args.shards} parts equals the unsharded run: "
          f"{'yes' if same_combined else 'NO'}")
    return {
        "preset": args.preset,
        "machine": machine(),
        "provenance": provenance(),
        "measurements": [m.to_json() for m in (base, shared, *parts, combine)],
        "part_bytes": part_bytes,
        "part_pass_s": part_pass,
        "unsharded_bytes": total,
        "ratios": ratios,
        "targets": TARGETS,
        "same_shared": same_shared,
        "same_combined": same_combined,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="1.1b")
    parser.add_argument("--root", type=Path, default=generate.DEFAULT_ROOT,
                        help="where generated models are kept (reused when present)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3, help="runs per contender (median)")
    parser.add_argument("--shards", type=int, default=4, help="parts of the CI-job split")
    parser.add_argument("--workers", type=int, default=2, help="xdist workers")
    parser.add_argument("--harness-src", type=Path, default=None, metavar="DIR",
                        help="measure the harness package in DIR instead of the installed one")
    parser.add_argument("--out", type=Path, default=None, help="where results are written")
    args = parser.parse_args(argv)
    use_harness_src(args.harness_src)
    if args.out is not None:
        set_out(args.out)
    summary = run(args)
    print(f"\nwrote {write_json(f'scale-{args.preset}', summary)}")
    return 0 if summary["same_shared"] and summary["same_combined"] else 1


if __name__ == "__main__":
    sys.exit(main())
