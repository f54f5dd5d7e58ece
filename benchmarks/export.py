"""Time and size the export checks on a q8_0 GGUF of the 1.1B shape, against reading its files.

    python -m pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36 -d /tmp/src
    python benchmarks/export.py --llama-cpp /tmp/src/llama_cpp_python-0.3.36.tar.gz

1. generate (or reuse) the base, adapter and merge of ``--preset`` (benchmarks/generate.py);
2. make ``<case>/export-source``: the merged weights (hard links, not copies) with a tokenizer,
   which the converter needs (SentencePiece trained on fixtures/text/sample.txt; the converter
   pads it to the 32000-token vocabulary);
3. convert it to q8_0 with llama.cpp's ``convert_hf_to_gguf.py`` (from the llama-cpp-python
   source distribution, as fixtures/gguf/build.py does) into ``<case>/merged-q8_0.gguf``, once;
4. measure, each in a child process with the page cache warm (wall time, peak RSS from wait4):

   (r)   read the merged weights and the GGUF, every byte once (the baseline)
   (e)   ``pytest --merged-model M --export G --merge-checks export``: model, values,
         tokenizer, chat template, parameters (provenance is skipped without a base)
   (rb)  read the merged weights, the GGUF and the base weights
   (eb)  the same export checks with ``--base-model``: provenance too

Targets on the 1.1B shape: (e) peak RSS under 1 GiB and wall time within 2x of (r).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import generate
from common import (
    REPO,
    GiB,
    Measurement,
    child_env,
    gib,
    machine,
    measure,
    median_run,
    prepare_cache,
    provenance,
    python,
    table,
    write_json,
)

READER = """
import sys
buffer = bytearray(16 * 1024 * 1024)
total = 0
for path in sys.argv[1:]:
    with open(path, "rb", buffering=0) as handle:
        while n := handle.readinto(buffer):
            total += n
print(total)
"""
RSS_LIMIT = 1 * GiB
WALL_RATIO_LIMIT = 2.0


def export_source(info: dict[str, Any]) -> Path:
    """The merged weights with a tokenizer, hard-linked (the generated folder is left as it is)."""
    sys.path.insert(0, str(REPO))
    build = _fixture_builder()
    source = Path(info["case"]) / "export-source"
    if (source / "tokenizer.model").exists():
        return source
    source.mkdir(exist_ok=True)
    merged = Path(info["merged"])
    for path in merged.iterdir():
        target = source / path.name
        if not target.exists():
            os.link(path, target)
    build.save_tokenizer(source, build.train_tokenizer())
    return source


def _fixture_builder() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("gguf_build", REPO / "fixtures/gguf/build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def convert(info: dict[str, Any], llama_cpp: Path, source: Path) -> tuple[Path, float | None]:
    """The q8_0 GGUF of the merge (converted once, then reused) and the seconds it took."""
    target = Path(info["case"]) / "merged-q8_0.gguf"
    if target.exists():
        return target, None
    build = _fixture_builder()
    with tempfile.TemporaryDirectory() as scratch:
        converter = build.find_converter(llama_cpp.resolve(), Path(scratch))
        partial = target.with_suffix(".partial.gguf")
        run = measure("convert", [python(), str(converter), str(source), "--outfile",
                                  str(partial), "--outtype", "q8_0"], env=child_env())
        if not run.ok:
            raise SystemExit(f"the converter failed:\n{run.output_tail}")
        partial.rename(target)
    return target, run.wall_s


def contenders(info: dict[str, Any], source: Path, gguf: Path,
               reports: Path) -> dict[str, list[str]]:
    merged_files = sorted(Path(info["merged"]).glob("*.safetensors"))
    base_files = sorted(Path(info["base"]).glob("*.safetensors"))
    pytest = [python(), "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:randomly", "-q",
              "--merged-model", str(source), "--export", str(gguf), "--merge-checks", "export"]
    return {
        "r": [python(), "-c", READER, *map(str, merged_files), str(gguf)],
        "e": [*pytest, "--merge-report", str(reports / "e.json")],
        "rb": [python(), "-c", READER, *map(str, merged_files), str(gguf), *map(str, base_files)],
        "eb": [*pytest, "--base-model", str(info["base"]), "--merge-report",
               str(reports / "eb.json")],
    }


def check_seconds(report: Path) -> dict[str, float]:
    """Seconds of each export check, from the harness's JSON report (the process start and
    pytest's own work excluded)."""
    if not report.exists():
        return {}
    data = json.loads(report.read_text())
    return {c["name"].split("[")[0]: float(c.get("seconds") or 0.0)
            for c in data.get("checks", []) if c.get("family") == "export"}


LABELS = {
    "r": "(r) read merged + GGUF",
    "e": "(e) export checks, no base",
    "rb": "(rb) read merged + GGUF + base",
    "eb": "(eb) export checks with base",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--llama-cpp", type=Path, required=True,
                        help="the llama-cpp-python sdist (.tar.gz) or a folder holding llama.cpp")
    parser.add_argument("--preset", default="1.1b", choices=sorted(generate.PRESETS))
    parser.add_argument("--root", type=Path, default=generate.DEFAULT_ROOT)
    parser.add_argument("--runs", type=int, default=1, help="runs per contender (median)")
    args = parser.parse_args(argv)

    info = generate.ensure_in_child(args.preset, root=args.root)
    source = export_source(info)
    gguf, convert_s = convert(info, args.llama_cpp, source)
    files = [*sorted(Path(info["merged"]).glob("*.safetensors")), gguf,
             *sorted(Path(info["base"]).glob("*.safetensors"))]
    results: dict[str, Measurement] = {}
    # pytest runs in an empty folder, as a user's gate would (no test files, no configuration).
    empty = Path(tempfile.mkdtemp(prefix="export-bench-"))
    for key, command in contenders(info, source, gguf, empty).items():
        runs = []
        for _ in range(args.runs):
            prepare_cache("warm", files)
            runs.append(measure(LABELS[key], command, cwd=empty, env=child_env(),
                                mem_limit=4 * GiB))
            if key in ("e", "eb"):
                runs[-1].extra["check_seconds"] = check_seconds(empty / f"{key}.json")
        results[key] = median_run(runs)
        if not results[key].ok:
            print(f"{LABELS[key]} failed:\n{results[key].output_tail}", flush=True)

    rows = []
    for key, run in results.items():
        baseline = results["r" if key in ("r", "e") else "rb"]
        ratio = (run.wall_s or 0.0) / (baseline.wall_s or 1.0)
        rows.append([LABELS[key], f"{run.wall_s:.2f}", f"{run.cpu_s:.2f}",
                     gib(run.peak_rss_bytes), f"{ratio:.2f}", "ok" if run.ok else "FAILED"])
    print(table(["contender", "wall s", "cpu s", "peak RSS GiB", "x read", "exit"], rows))
    for key in ("e", "eb"):
        seconds = results[key].extra.get("check_seconds", {})
        total = sum(seconds.values())
        baseline = results["r" if key == "e" else "rb"].wall_s or 1.0
        print(f"{LABELS[key]}: the checks themselves {total:.2f} s ({total / baseline:.2f} x read;"
              f" process start, imports and pytest the rest): "
              + ", ".join(f"{k} {v:.2f}" for k, v in seconds.items()))
    checks = {
        "(e) peak RSS < 1 GiB": (results["e"].peak_rss_bytes or 0) < RSS_LIMIT,
        "(e) wall <= 2 x (r)": (results["e"].wall_s or 0) <= WALL_RATIO_LIMIT * (
            results["r"].wall_s or 0),
        "(eb) peak RSS < 1 GiB": (results["eb"].peak_rss_bytes or 0) < RSS_LIMIT,
        "(eb) wall <= 2 x (rb)": (results["eb"].wall_s or 0) <= WALL_RATIO_LIMIT * (
            results["rb"].wall_s or 0),
    }
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'MISS'} {name}")
    gguf_bytes = gguf.stat().st_size
    print(f"GGUF {gguf_bytes / GiB:.2f} GiB; converted in "
          f"{'(reused)' if convert_s is None else f'{convert_s:.0f} s'}")
    path = write_json("export", {
        "preset": args.preset, "machine": machine(), "provenance": provenance(),
        "gguf_bytes": gguf_bytes, "convert_seconds": convert_s,
        "results": {k: r.to_json() for k, r in results.items()}, "targets": checks,
    })
    print(f"wrote {path}")
    return 0 if all(r.ok for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
