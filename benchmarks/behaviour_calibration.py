"""Calibrate the behaviour check's tolerance constants on correct merges.

    python benchmarks/behaviour_calibration.py --merges 300 --probes 10
    python benchmarks/behaviour_calibration.py --merges 50 --architectures llama,gpt2 --dtypes BF16
    python benchmarks/behaviour_calibration.py --merges 300 --compare stored   # the native rule
    python benchmarks/behaviour_calibration.py --merges 300 --layers    # behaviour::layers' C_LAYER

Draws merge cases with ``harness.strategies.merge_cases`` (tiny models, LoRA/rsLoRA/DoRA/patterns/
modules_to_save, peft's merge and the streaming merger), builds each, and on hypothesis-drawn
probes, measured together in one streamed pass per model as the check measures them, records
how far the merged model M is from the reference R relative to the unmerged adapter model A,
exactly as the check judges it (by default with the check's default comparison dtype on this
CPU: float32 without native bf16, where A is the reference and the floor is the twin's;
``--compare stored`` compares in each checkpoint's own dtype, the default for bf16 checkpoints
on CPUs with AMX or AVX512-BF16):

    max-ratio  = max|M-R|  / max(max|A-R|,  noise_max)
    mean-ratio = mean|M-R| / max(mean|A-R|, noise_mean)

Prints the largest ratios per architecture and dtype, and the constants the check should use:
1.5x the largest ratio seen, rounded up to a whole number (``harness.behaviour.measure.C_MAX`` and
``C_MEAN``). Every merge here is correct, so any ratio is rounding noise.

With ``--layers`` it calibrates ``behaviour::layers`` instead: on the calibration probe, each
layer of M teacher-forced with R's inputs, the ratio a merge needs to pass,
``(q(M) - eps * scale) / max(q(A), q(T))`` per layer (``harness.behaviour.layers``), and the
largest over layers and merges; the suggested ``C_LAYER`` is 1.5x that, rounded up to a half.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from harness import tiny
from harness.behaviour import layers as layer_rule
from harness.behaviour import measure as behaviour
from harness.behaviour.models import release_models
from harness.run.context import Context
from harness.run.settings import Settings
from harness.strategies import merge_cases, probes_for


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--merges", type=int, default=300)
    parser.add_argument("--probes", type=int, default=10)
    parser.add_argument("--architectures", default="llama,qwen2,gpt2,mistral,gemma,phi3")
    parser.add_argument("--dtypes", default="F32,BF16,F16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jsonl", type=Path, default=None, help="also write one line per merge")
    parser.add_argument("--layers", action="store_true",
                        help="calibrate behaviour::layers (C_LAYER) instead of the probe rule")
    parser.add_argument(
        "--compare",
        choices=("default", "stored"),
        default="default",
        help="comparison dtype: the check's default on this CPU (forward.compute), or the dtype"
        " each checkpoint stores (the default where the CPU has native bf16)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="behaviour-calibration-"))
    sink = args.jsonl.open("w") if args.jsonl else None
    worst: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
    top: list[tuple[float, str]] = []
    count = [0]
    started = time.perf_counter()

    @seed(args.seed)
    @settings(
        max_examples=args.merges,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(
        spec=merge_cases(
            architectures=args.architectures.split(","),
            dtypes=args.dtypes.split(","),
            methods=("peft", "harness"),
        ),
        data=st.data(),
    )
    def sweep(spec: tiny.MergeSpec, data: st.DataObject) -> None:
        count[0] += 1
        folder = root / str(count[0])
        built = tiny.build_case(spec, folder)
        dtype = spec.model.dtype if args.compare == "stored" else None
        options = Settings(merged=built.merged, base=built.base, adapter=built.adapter, dtype=dtype)
        ctx = Context(options)
        if args.layers:
            needed = 0.0
            for f in layer_rule.measure_layers(ctx):
                need = _ratio(max(f.merged - (f.allowed - layer_rule.C_LAYER * f.noise), 0.0),
                              f.noise)
                needed = max(needed, need)
            key = (spec.model.arch, spec.model.dtype)
            worst[key][0] = max(worst[key][0], needed)
            worst[key][2] += 1
            top.append((needed / layer_rule.C_LAYER, spec.key()))
            if sink:
                sink.write(json.dumps({"spec": spec.key(), "needed": needed}) + "\n")
            release_models(ctx)
            shutil.rmtree(folder, ignore_errors=True)
            return
        comparer = behaviour.Comparer(ctx)
        rows = []
        # every probe of a merge in one streamed pass per model, as the check measures them
        probes = [data.draw(probes_for(comparer.setup.space)) for _ in range(args.probes)]
        measured = comparer.measure_all(probes)
        tol = comparer.tolerance
        for f in measured:
            r_max = _ratio(f.merged.max_abs, max(f.noise.max_abs, tol.noise_max))
            r_mean = _ratio(f.merged.mean_abs, max(f.noise.mean_abs, tol.noise_mean))
            rows.append((r_max, r_mean, f.ok))
            key = (spec.model.arch, spec.model.dtype)
            worst[key][0] = max(worst[key][0], r_max)
            worst[key][1] = max(worst[key][1], r_mean)
            worst[key][2] += 1
            top.append((max(r_max / behaviour.C_MAX, r_mean / behaviour.C_MEAN), spec.key()))
        if sink:
            sink.write(json.dumps({"spec": spec.key(), "rows": rows}) + "\n")
        release_models(ctx)
        shutil.rmtree(folder, ignore_errors=True)

    sweep()
    if args.layers:
        print(f"{count[0]} correct merges, {time.perf_counter() - started:.0f} s")
        print(f"{'architecture':12} {'dtype':5} {'merges':>6} {'layer-ratio':>11}")
        for (arch, dtype), (needed, _, n) in sorted(worst.items()):
            print(f"{arch:12} {dtype:5} {n:6d} {needed:11.2f}")
        largest = max(w[0] for w in worst.values())
        print(f"largest: layer-ratio {largest:.2f}")
        suggested = math.ceil(3 * largest) / 2
        print(f"suggested: C_LAYER = {suggested:g} (in use: {layer_rule.C_LAYER:g})")
        used, key = max(top)
        print(f"largest share of the allowance used by a correct merge: {used:.0%} ({key})")
        shutil.rmtree(root, ignore_errors=True)
        return 0 if used <= 1 else 1
    print(
        f"{count[0]} correct merges, {sum(w[2] for w in worst.values())} probes,"
        f" {time.perf_counter() - started:.0f} s"
    )
    print(f"{'architecture':12} {'dtype':5} {'probes':>6} {'max-ratio':>9} {'mean-ratio':>10}")
    for (arch, dtype), (r_max, r_mean, n) in sorted(worst.items()):
        print(f"{arch:12} {dtype:5} {n:6d} {r_max:9.2f} {r_mean:10.2f}")
    all_max = max(w[0] for w in worst.values())
    all_mean = max(w[1] for w in worst.values())
    print(f"largest: max-ratio {all_max:.2f}, mean-ratio {all_mean:.2f}")
    print(
        f"suggested: C_MAX = {math.ceil(1.5 * all_max)}, C_MEAN = {math.ceil(1.5 * all_mean)}"
        f" (in use: {behaviour.C_MAX:g}, {behaviour.C_MEAN:g})"
    )
    used, key = max(top)
    print(f"largest share of the allowance used by a correct merge: {used:.0%} ({key})")
    shutil.rmtree(root, ignore_errors=True)
    return 0 if used <= 1 else 1


def _ratio(value: float, floor: float) -> float:
    if floor <= 0:
        return 0.0 if value <= 0 else math.inf
    return value / floor


if __name__ == "__main__":
    sys.exit(main())
