"""Time the streaming merger against peft's merge, in one run (issue 4).

    python benchmarks/merge.py --preset 1.1b
    python benchmarks/merge.py --preset 0.5b 1.1b      # + memory independence of the merger

Contenders, each a child process measured alone (wall time, peak RSS from ``wait4``):

  (p) peft     transformers load + ``PeftModel.from_pretrained`` + ``merge_and_unload`` +
               ``save_pretrained`` (``benchmarks/peft_merge.py``)
  (h) harness  ``merge-harness merge BASE ADAPTER OUT`` (the streaming merger)

Both write the same shard size (the base's, ``--max-shard-size``). The page cache is put in the
same state before each (``--cache cold``: dropped; ``warm``: base and adapter read once), and
written data is flushed with ``sync`` after each, outside the timing, so one contender's
write-back does not slow the next. Afterwards both outputs are hashed with
``harness.stream.hashing.hash_checkpoint`` (canonical digest: shard layout and metadata do not
count) and the digests are printed: equal digests mean bit-identical tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import generate
from common import (
    GB,
    HERE,
    PRESETS,
    GiB,
    Measurement,
    child_env,
    gib,
    machine,
    measure,
    median_run,
    meminfo,
    prepare_cache,
    provenance,
    python,
    resolve_cache_mode,
    set_out,
    skipped,
    table,
    use_harness_src,
    weight_files,
    write_json,
)

LABELS = {"p": "(p) peft load+merge_and_unload+save", "h": "(h) merge-harness merge"}
TARGETS = {"h/p wall": ("wall_s", 0.7), "h/p peak RSS": ("peak_rss_bytes", 0.3)}
MEMORY_RATIO_LIMIT = 1.3
DIGEST = (
    "import sys; from harness.io.checkpoint import Checkpoint; from harness.stream.hashing import"
    " hash_checkpoint; print(hash_checkpoint(Checkpoint.open(sys.argv[1]),"
    " with_files=False).digest)"
)


def harness_cli() -> list[str] | None:
    """How to start ``merge-harness`` (None when this build has no merger yet)."""
    probe = subprocess.run([python(), "-c", "import harness.merger, harness.cli"],
                           capture_output=True, env=child_env())
    if probe.returncode != 0:
        return None
    script = Path(python()).with_name("merge-harness")
    if script.exists():
        return [str(script)]
    return [python(), "-c", "import sys; from harness.cli import main; sys.exit(main())"]


def digest(folder: Path) -> str | None:
    done = subprocess.run([python(), "-c", DIGEST, str(folder)], capture_output=True, text=True,
                          env=child_env())
    return done.stdout.strip() if done.returncode == 0 else None


def run_preset(preset: str, args: argparse.Namespace, limit: int) -> dict[str, Any]:
    info = generate.ensure_in_child(preset, root=args.root, seed=args.seed,
                                    max_shard_size=args.max_shard_size)
    inputs = weight_files(info["base"]) + weight_files(info["adapter"])
    base_bytes = sum(p.stat().st_size for p in weight_files(info["base"]))
    shard = str(info["max_shard_size"])
    work = Path(info["case"]) / "merge-bench"
    print(f"\n== {preset}: {PRESETS[preset].parameters / 1e9:.2f}B parameters, base weight files"
          f" {base_bytes / 1e9:.2f} GB, cache {args.cache}, shard size {shard} bytes", flush=True)
    cli = harness_cli()
    results: dict[str, Measurement] = {}
    rounds: dict[str, list[Measurement]] = {}
    outputs: dict[str, Path] = {}
    for key in [k for _ in range(args.repeat) for k in args.only]:
        if key in results and not results[key].ran:
            continue
        out = work / key
        shutil.rmtree(out, ignore_errors=True)
        os.sync()
        work.mkdir(parents=True, exist_ok=True)
        if key == "p":
            command = [python(), str(HERE / "peft_merge.py"), str(info["base"]),
                       str(info["adapter"]), str(out), "--max-shard-size", shard]
        else:
            if cli is None:
                results[key] = skipped(LABELS[key], [], "did not run: harness.merger is not in"
                                       " this build")
                rounds[key] = [results[key]]
                print(f"   {LABELS[key]}: {results[key].note}", flush=True)
                continue
            command = [*cli, "merge", str(info["base"]), str(info["adapter"]), str(out),
                       "--max-shard-size", shard, *args.merge_args]
        prepare_cache(args.cache, inputs)
        result = measure(LABELS[key], command, cwd=work, env=child_env(), mem_limit=limit,
                         timeout=args.timeout)
        os.sync()
        if not result.ok:
            result.note = result.note or f"exit status {result.returncode}"
        results[key] = result
        rounds.setdefault(key, []).append(result)
        outputs[key] = out
        status = "ok" if result.ok else f"FAILED ({result.note})"
        print(f"   {LABELS[key]}: {result.wall_s:.1f} s, peak RSS {gib(result.peak_rss_bytes)}"
              f" GiB, CPU {result.cpu_s:.1f} s, {status}", flush=True)
        if not result.ok:
            print("      " + result.output_tail.replace("\n", "\n      "), flush=True)
    results = {key: median_run(runs) for key, runs in rounds.items()}
    names = {"p": "peft", "h": "harness"}
    digests = {names[key]: digest(out) for key, out in outputs.items() if results[key].ok}
    digests["generated merged"] = digest(Path(info["merged"]))
    digests["base"] = digest(Path(info["base"]))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return {"preset": preset, "base_bytes": base_bytes, "cache": args.cache,
            "results": {k: v.to_json() for k, v in results.items()}, "digests": digests,
            "_measurements": results}


def report(runs: list[dict[str, Any]]) -> dict[str, Any]:
    rows = []
    for run in runs:
        for key, m in run["_measurements"].items():
            gbps = run["base_bytes"] / GB / m.wall_s if m.ok and m.wall_s else None
            rows.append([run["preset"], m.label, f"{m.wall_s:.1f}" if m.ok and m.wall_s else "-",
                         f"{gbps:.2f}" if gbps else "-",
                         gib(m.peak_rss_bytes) if m.ok else "-",
                         f"{m.cpu_s:.1f}" if m.ok and m.cpu_s is not None else "-",
                         ("ok" + (f" ({m.note})" if m.note else "")) if m.ok else m.note])
            run["results"][key]["throughput_gbps"] = gbps
    print()
    print(table(["preset", "contender", "wall s", "GB/s (base)", "peak RSS GiB", "CPU s",
                 "status"], rows))
    summary: dict[str, Any] = {"ratios": {}, "bit_identical": {}, "memory_independence": None}
    ratio_rows = []
    for run in runs:
        got = {}
        h, p = run["_measurements"].get("h"), run["_measurements"].get("p")
        for name, (field, limit) in TARGETS.items():
            value = (getattr(h, field) / getattr(p, field)
                     if h is not None and p is not None and h.ok and p.ok else None)
            got[name] = {"value": value, "limit": limit,
                         "met": None if value is None else value <= limit}
            ratio_rows.append([run["preset"], name, "-" if value is None else f"{value:.2f}",
                               f"<= {limit}", "n/a" if value is None
                               else ("met" if value <= limit else "MISSED")])
        summary["ratios"][run["preset"]] = got
        d = run["digests"]
        same = d.get("peft") is not None and d.get("peft") == d.get("harness")
        both = "peft" in d and "harness" in d
        summary["bit_identical"][run["preset"]] = same if both else None
        for name, value in d.items():
            print(f"{run['preset']} canonical digest {name:17}: {value}")
        if both:
            verdict = "yes" if same else "NO"
            print(f"{run['preset']} merger output bit-identical to peft's: {verdict}")
    print()
    print(table(["preset", "ratio", "value", "target (1.1B)", "verdict"], ratio_rows))
    peaks = {run["preset"]: run["_measurements"]["h"].peak_rss_bytes for run in runs
             if "h" in run["_measurements"] and run["_measurements"]["h"].ok}
    if len(peaks) >= 2:
        ordered = sorted(peaks, key=lambda p: PRESETS[p].parameters)
        small, large = ordered[0], ordered[-1]
        value = peaks[large] / peaks[small]
        summary["memory_independence"] = {"small": small, "large": large, "value": value,
                                          "limit": MEMORY_RATIO_LIMIT,
                                          "met": value <= MEMORY_RATIO_LIMIT}
        print(f"\n(h) peak RSS {large} / {small}: {gib(peaks[large])} / {gib(peaks[small])} GiB"
              f" = {value:.2f} (target <= {MEMORY_RATIO_LIMIT}:"
              f" {'met' if value <= MEMORY_RATIO_LIMIT else 'MISSED'})")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), nargs="+", default=["0.1b"])
    parser.add_argument("--root", type=Path, default=generate.DEFAULT_ROOT,
                        help="cache folder of generated models (default: %(default)s)")
    parser.add_argument("--harness-src", type=Path, default=None, metavar="DIR",
                        help="measure the harness package in DIR (a snapshot: git archive"
                        " COMMIT harness | tar -x -C DIR) instead of the installed one")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the JSON results and logs (default: benchmarks/out)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-shard-size", default=None,
                        help="shard size when generating (default: 5GB or the cached case's)")
    parser.add_argument("--only", default="p,h", help="contenders (default: %(default)s)")
    parser.add_argument("--cache", choices=["auto", "cold", "warm"], default="auto")
    parser.add_argument("--mem-limit", type=float, default=None, metavar="GIB",
                        help="kill a contender past this resident size (default: available"
                        " memory at start minus 1 GiB)")
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per contender, round-robin; the median wall time is reported"
                        " with the largest peak RSS (default: %(default)s)")
    parser.add_argument("--merge-args", default="",
                        help="extra arguments for merge-harness merge, one string")
    parser.add_argument("--keep", action="store_true", help="keep both merged outputs")
    args = parser.parse_args(argv)
    args.only = [k.strip() for k in args.only.split(",") if k.strip()]
    if not set(args.only) <= set(LABELS):
        parser.error(f"--only takes letters from {','.join(LABELS)}")
    args.merge_args = args.merge_args.split()
    args.cache = resolve_cache_mode(args.cache)
    if args.out is not None:
        set_out(args.out)
    use_harness_src(args.harness_src)
    limit = (int(args.mem_limit * GiB) if args.mem_limit
             else meminfo().get("MemAvailable", 8 * GiB) - GiB)
    code = provenance()
    print(f"harness code: {code}")
    runs = [run_preset(p, args, limit) for p in args.preset]

    def saved(summary: dict[str, Any] | None) -> Path:
        plain = [{k: v for k, v in run.items() if k != "_measurements"} for run in runs]
        return write_json("merge-" + "-".join(args.preset),
                          {"machine": machine(), "code": code, "mem_limit_bytes": limit,
                           "runs": plain,
                           "summary": summary, "argv": sys.argv})

    # Saved before the report too, so a fault in the report loses no measurement.
    first = saved(None)
    summary = report(runs)
    first.unlink()
    path = saved(summary)
    print(f"\nwritten {path}")
    print(json.dumps(summary["bit_identical"]))
    failed = [k for run in runs for k, r in run["results"].items()
              if r["ran"] and r["returncode"] != 0]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
