"""Shared pieces of the benchmark scripts: model shapes, measurement, page cache, tables, JSON.

Each contender runs as a child process. Its wall time is measured around the process, and its
peak resident memory comes from ``os.wait4`` (``ru_maxrss`` of that child alone, including any
descendants it waited for), so the figures of one contender never mix with another's or with the
benchmark driver's own memory. A watchdog polls the child's process tree and kills it when its
resident memory passes a limit, so a contender that cannot fit does not push the machine into
swap or the OOM killer (other people's processes share this machine).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT = HERE / "out"
GiB = 1024**3
GB = 1e9


# ---- model shapes -------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """A Llama-architecture shape (bf16 weights, untied embeddings)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    note: str = ""

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) in the order of ``LlamaForCausalLM.state_dict()``."""
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out += [
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (i, h)),
                (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)),
                (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,)),
            ]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return out

    @property
    def parameters(self) -> int:
        return sum(math.prod(s) for _, s in self.tensors())

    def linear_modules(self) -> list[tuple[str, int, int]]:
        """(module path, in_features, out_features) of every linear layer an all-linear LoRA
        targets (``lm_head`` excluded, as peft's ``all-linear`` does)."""
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        out = []
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out += [
                (p + "self_attn.q_proj", h, h),
                (p + "self_attn.k_proj", h, kv),
                (p + "self_attn.v_proj", h, kv),
                (p + "self_attn.o_proj", h, h),
                (p + "mlp.gate_proj", h, i),
                (p + "mlp.up_proj", h, i),
                (p + "mlp.down_proj", i, h),
            ]
        return out


PRESETS: dict[str, Shape] = {
    # A few MB: the smoke test and quick script checks.
    "micro": Shape(64, 172, 2, 4, 2, 1000, "smoke-test size, about 0.3M parameters"),
    # Development size (about 0.12B): every path in seconds.
    "0.1b": Shape(768, 2048, 12, 12, 4, 32000, "development size"),
    # 0.5B: hidden 1536, 16 layers, 24 heads of 64, 8 KV heads (GQA), SwiGLU 4096, vocab 32000.
    "0.5b": Shape(1536, 4096, 16, 24, 8, 32000, "0.5B Llama shape (GQA 24/8 heads)"),
    # TinyLlama-1.1B's shape.
    "1.1b": Shape(2048, 5632, 22, 32, 4, 32000, "TinyLlama-1.1B shape"),
    # Llama-2-7B's shape.
    "7b": Shape(4096, 11008, 32, 32, 32, 32000, "Llama-2-7B shape"),
}


# ---- machine ------------------------------------------------------------------------------


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes."""
    out: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                out[key] = int(parts[0]) * (1024 if len(parts) > 1 else 1)
    except OSError:
        pass
    return out


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    disk = shutil.disk_usage(HERE)
    from importlib.metadata import version

    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(meminfo().get("MemTotal", 0) / GiB, 1),
        "disk_total_gb": round(disk.total / GB),
        "disk_free_gb": round(disk.free / GB),
        "python": platform.python_version(),
        "torch": version("torch"),
        "transformers": version("transformers"),
        "peft": version("peft"),
        "kernel": platform.release(),
        # Other work on the machine distorts timings: record it with the figures.
        "loadavg_1_5_15": list(os.getloadavg()),
    }


# ---- page cache ---------------------------------------------------------------------------


def drop_caches() -> bool:
    """Write back dirty pages and drop the page cache; False when not permitted."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def warm(files: list[Path]) -> None:
    """Read every file once so that its pages are in the page cache."""
    buffer = bytearray(16 * 1024 * 1024)
    for path in files:
        with path.open("rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass


def prepare_cache(mode: str, files: list[Path]) -> None:
    """Put the page cache in the agreed state before a contender starts."""
    if mode == "cold":
        if not drop_caches():
            raise SystemExit("--cache cold needs permission to write /proc/sys/vm/drop_caches")
    elif mode == "warm":
        warm(files)


def resolve_cache_mode(mode: str) -> str:
    """``auto``: cold when the page cache can be dropped here, else warm."""
    if mode != "auto":
        return mode
    return "cold" if os.access("/proc/sys/vm/drop_caches", os.W_OK) else "warm"


# ---- measuring a child process ------------------------------------------------------------


def _tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants (0 once they are gone)."""
    total = 0
    stack = [pid]
    page = os.sysconf("SC_PAGE_SIZE")
    while stack:
        p = stack.pop()
        try:
            fields = Path(f"/proc/{p}/statm").read_text().split()
            total += int(fields[1]) * page
            for task in Path(f"/proc/{p}/task").iterdir():
                children = (task / "children").read_text().split()
                stack += [int(c) for c in children]
        except (OSError, ValueError, IndexError):
            continue
    return total


@dataclass
class Measurement:
    """One contender's run: wall seconds, peak RSS, exit status and the tail of its output."""

    label: str
    command: list[str]
    ran: bool = True
    returncode: int | None = None
    wall_s: float | None = None
    peak_rss_bytes: int | None = None
    #: user + system CPU seconds of the child (and its waited-for descendants): less sensitive
    #: than wall time to other work on a shared machine.
    cpu_s: float | None = None
    polled_peak_bytes: int | None = None
    note: str = ""
    output_tail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.ran and self.returncode == 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def measure(
    label: str,
    command: list[str],
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    mem_limit: int | None = None,
    timeout: float | None = None,
) -> Measurement:
    """Run ``command``; wall time, ``ru_maxrss`` from ``wait4`` and a polled tree peak.

    With ``mem_limit`` the child's whole process tree is killed as soon as its resident memory
    passes that many bytes (checked every 50 ms), and the measurement says so.
    """
    result = Measurement(label, [str(c) for c in command])
    log = _out[0] / "logs"
    log.mkdir(parents=True, exist_ok=True)
    log_path = log / f"{label.split()[0]}-{os.getpid()}.log"
    with log_path.open("w+b") as sink:
        start = time.perf_counter()
        process = subprocess.Popen(
            result.command, cwd=cwd, env=env, stdout=sink, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        peak = 0
        killed: list[str] = []
        done = threading.Event()

        def poll() -> None:
            nonlocal peak
            while not done.wait(0.05):
                rss = _tree_rss(process.pid)
                peak = max(peak, rss)
                over_memory = mem_limit is not None and rss > mem_limit
                over_time = timeout is not None and time.perf_counter() - start > timeout
                if over_memory or over_time:
                    killed.append(
                        f"killed at {rss / GiB:.1f} GiB resident (limit {mem_limit / GiB:.1f} GiB)"
                        if over_memory and mem_limit is not None
                        else f"killed after {timeout:.0f} s"
                    )
                    with contextlib.suppress(OSError):
                        os.killpg(process.pid, signal.SIGKILL)
                    return

        watcher = threading.Thread(target=poll, daemon=True)
        watcher.start()
        _, status, usage = os.wait4(process.pid, 0)
        result.wall_s = time.perf_counter() - start
        done.set()
        watcher.join()
        process.returncode = os.waitstatus_to_exitcode(status)
        result.returncode = process.returncode
        # Linux reports ru_maxrss in KiB.
        result.peak_rss_bytes = int(usage.ru_maxrss) * 1024
        result.cpu_s = usage.ru_utime + usage.ru_stime
        result.polled_peak_bytes = peak
        if killed:
            result.note = killed[0]
        sink.seek(0)
        text = sink.read().decode("utf-8", "replace")
    result.output_tail = "\n".join(text.splitlines()[-25:])
    return result


def median_run(runs: list[Measurement]) -> Measurement:
    """The run with the median wall time, carrying the largest peak RSS of all runs and every
    run's figures in ``extra["runs"]`` (a single run is returned as it is)."""
    if len(runs) == 1:
        return runs[0]
    done = [r for r in runs if r.ok]
    if len(done) < len(runs):
        return next(r for r in runs if not r.ok)
    ordered = sorted(done, key=lambda r: r.wall_s or 0.0)
    chosen = ordered[(len(ordered) - 1) // 2]
    chosen.extra["runs"] = [{"wall_s": r.wall_s, "cpu_s": r.cpu_s,
                             "peak_rss_bytes": r.peak_rss_bytes} for r in runs]
    chosen.peak_rss_bytes = max(r.peak_rss_bytes or 0 for r in runs)
    chosen.note = (f"median of {len(runs)}: wall "
                   + "/".join(f"{r.wall_s:.1f}" for r in runs) + " s")
    return chosen


def skipped(label: str, command: list[str], note: str) -> Measurement:
    """A contender that was not started (and why)."""
    return Measurement(label, [str(c) for c in command], ran=False, note=note)


# ---- output -------------------------------------------------------------------------------


def folder_bytes(folder: Path, pattern: str = "*.safetensors") -> int:
    """Bytes of the files matching ``pattern`` in ``folder``."""
    return sum(p.stat().st_size for p in folder.glob(pattern))


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, sorted."""
    return sorted(folder.glob("*.safetensors"))


def gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GiB:.2f}"


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain fixed-width table (also valid-ish markdown)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


_out = [OUT]


def set_out(folder: Path) -> None:
    """Write results and contender logs under ``folder`` instead of ``benchmarks/out``."""
    _out[0] = folder


def write_json(name: str, data: dict[str, Any]) -> Path:
    """Write ``data`` to ``<out>/<name>-<timestamp>.json`` and return the path."""
    _out[0].mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = _out[0] / f"{name}-{stamp}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    return path


def python() -> str:
    """The interpreter running the benchmark (the project's venv when run from it)."""
    return sys.executable


_harness_src: list[Path] = []


def use_harness_src(folder: Path | None) -> None:
    """Run the contenders (and this driver's own imports) against the ``harness`` package in
    ``folder`` (e.g. ``git archive <commit> harness | tar -x -C folder``) instead of the
    installed one: figures then belong to a known commit, not to a working tree in flux.
    PYTHONPATH precedes the editable install's finder, so the pytest11 entry point
    ``harness.plugin`` resolves there too."""
    if folder is None:
        return
    folder = folder.resolve()
    if not (folder / "harness" / "__init__.py").exists():
        raise SystemExit(f"--harness-src {folder}: no harness/__init__.py there")
    _harness_src[:] = [folder]
    sys.path.insert(0, str(folder))


def provenance() -> dict[str, Any]:
    """Which harness code was measured: ``--harness-src`` or the repository's HEAD (and
    whether ``harness/`` had uncommitted changes then)."""
    if _harness_src:
        stamp = _harness_src[0] / "COMMIT"
        return {"harness_src": str(_harness_src[0]),
                "commit": stamp.read_text().strip() if stamp.exists() else None}
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return done.stdout.strip()
    return {"harness_src": "installed (working tree)", "commit": git("rev-parse", "HEAD"),
            "harness_dirty": bool(git("status", "--porcelain", "--", "harness"))}


def child_env(**extra: str) -> dict[str, str]:
    """Environment of the contenders: offline (no hub look-ups), ``--harness-src`` first."""
    env = dict(os.environ)
    if _harness_src:
        env["PYTHONPATH"] = os.pathsep.join(
            [str(_harness_src[0]), *filter(None, [env.get("PYTHONPATH")])])
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env
