"""The behaviour section's fault table: how far deliberate faults stand out, behaviour alone.

    python benchmarks/behaviour_faults.py                 # the default comparison (fp32 on a CPU)
    python benchmarks/behaviour_faults.py --dtype stored  # compare in each checkpoint's dtype

Builds tiny correct merges (llama, qwen2 tied, gpt2 Conv1D; fp32, bf16, fp16; all-linear LoRA,
adapter noise 0.05), injects the faults of ``tests/support/faults.py`` into copies of the merged
files and runs ``behaviour::equivalence`` (20 probes) on each. Prints one markdown row per merge:
the share of the allowance the correct merge used, and for each fault how many times more than
rounding noise the merged model deviates on the shrunk minimal input. The last column is
``behaviour::layers`` on a merge with layer 0's delta doubled: how many times its noise that
layer computes (the check fails beyond ``C_LAYER``), and the share of the allowance the correct
merge's worst layer used.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from support.faults import inject, scale_layer

from harness.case import MergeCase
from harness.checks import behaviour
from harness.plugin.fixtures import TinyMergeFactory
from harness.run.result import CheckResult
from harness.run.runner import run_check
from harness.run.settings import Settings

LABELS = {"qwen2": "qwen2 (tied)", "gpt2": "gpt2 (Conv1D)"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=("default", "stored"), default="default")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    checks = {c.name: c for c in behaviour.checks(Settings())}
    check, layers = checks["equivalence"], checks["layers"]
    root = Path(tempfile.mkdtemp(prefix="behaviour-faults-"))
    factory = TinyMergeFactory(root)

    def run(case: MergeCase, dtype: str, which: Any = None) -> CheckResult:
        compare = dtype if args.dtype == "stored" else None
        fresh = MergeCase(case.merged, case.base, case.adapter, None, Settings(dtype=compare))
        try:
            return run_check(which or check, fresh.context())
        finally:
            fresh.release()

    print("| architecture | dtype | correct | scale x2 | sign flip | transposed | last layer |"
          " layers: correct / layer 0 x2 |")
    print("|---|---|---|---|---|---|---|---|")
    for arch in ("llama", "qwen2", "gpt2"):
        for dtype in ("F32", "BF16", "F16"):
            case = factory(arch=arch, dtype=dtype, scale=0.05, target_modules="all-linear")
            good = run(case, dtype)
            cells = [f"{good.outcome.value} ({good.metrics.get('worst_ratio', 0):.0%})"]
            for fault in ("scale", "sign", "transpose", "layer"):
                folder = inject(case.merged, case.base, fault, root / f"{arch}-{dtype}-{fault}")
                bad = run(MergeCase(folder, case.base, case.adapter), dtype)
                found = re.search(r"([0-9.e+]+)x more", bad.message)
                caught = bad.outcome.value == "failed" and found
                cells.append(f"{found.group(1)}x" if caught and found else bad.outcome.value)
            good_layers = run(case, dtype, layers)
            doubled = scale_layer(case.merged, case.base, root / f"{arch}-{dtype}-x2", 0, 2.0)
            bad_layers = run(MergeCase(doubled, case.base, case.adapter), dtype, layers)
            worst = bad_layers.metrics.get("worst", {})
            times = worst.get("merged", 0) / max(worst.get("noise", 0), 1e-300)
            cells.append(
                f"{good_layers.outcome.value} ({_used(good_layers):.0%}) /"
                f" {bad_layers.outcome.value} ({times:.3g}x)"
            )
            print(f"| {LABELS.get(arch, arch)} | {dtype} | " + " | ".join(cells) + " |", flush=True)
    return 0


def _used(result: CheckResult) -> float:
    worst = result.metrics.get("worst", {})
    allowed = worst.get("allowed", 0.0)
    return float(worst.get("merged", 0.0) / allowed) if allowed else 0.0


if __name__ == "__main__":
    sys.exit(main())
