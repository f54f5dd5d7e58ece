"""The inputs of one run and the lazily computed, shared facts about them.

A :class:`Context` is created once per process (the pytest controller, or each xdist worker).
Checks ask it for the opened checkpoints and for shared scans; each is computed on first use and
cached, including a failure, so that ten checks over an unreadable file report one cause ten
times instead of reading it ten times.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from harness.errors import HarnessError

if TYPE_CHECKING:
    from harness.adapter import Adapter
    from harness.checkpoint import Checkpoint
    from harness.config import GateConfig

T = TypeVar("T")


@dataclass
class Options:
    """Everything a user can set, independent of pytest (the plugin fills it from options)."""

    merged: Path | None = None
    base: Path | None = None
    adapter: Path | None = None
    allow_pickle: bool = False
    trust_remote_code: bool = False
    #: Allowed rounding error of a targeted tensor, in units of the stored dtype's ULP.
    ulp_tolerance: float = 1.0
    device: str = "cpu"
    dtype: str | None = None
    #: Hypothesis examples per behaviour property.
    examples: int = 20
    #: Seconds one check may run before it is failed as hung (None: no limit).
    check_timeout: float | None = None
    config_path: Path | None = None
    lock_path: Path | None = None
    update_lock: bool = False
    report_path: Path | None = None
    summary_path: Path | None = None
    #: Families of checks to run (None: all that apply).
    families: frozenset[str] | None = None
    #: Settings read from the gate configuration file (validated by ``harness.gate``).
    settings: dict[str, Any] = field(default_factory=dict)
    #: A folder the harness may write to (its own merges); never a user's checkpoint folder.
    workdir: Path | None = None
    #: The validated gate configuration (benchmarks, perplexity, lock, reports); set by
    #: ``harness.gate.load_settings``.
    gate: GateConfig | None = None


class _Failure:
    def __init__(self, error: HarnessError) -> None:
        self.error = error


class Context:
    """Opened inputs and memoised shared computations for one process."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self._memo: dict[str, Any] = {}

    def memo(self, key: str, compute: Callable[[], T]) -> T:
        """Compute ``key`` once; later calls return the value or re-raise the same failure."""
        if key not in self._memo:
            try:
                self._memo[key] = compute()
            except HarnessError as exc:
                self._memo[key] = _Failure(exc)
        value = self._memo[key]
        if isinstance(value, _Failure):
            raise value.error
        return value  # type: ignore[no-any-return]

    def known(self, key: str) -> bool:
        """Whether ``key`` was computed (or its computation failed) already."""
        return key in self._memo

    def seed(self, key: str, value: Any) -> None:
        """Record ``value`` for ``key`` unless it is known already.

        A pass that computed it on the way seeds it, e.g. the weight oracle's digests for
        ``scan:merged``.
        """
        self._memo.setdefault(key, value)

    @property
    def has_base(self) -> bool:
        """Whether a base model was given (or discovered)."""
        return self.options.base is not None

    @property
    def has_adapter(self) -> bool:
        """Whether an adapter was given."""
        return self.options.adapter is not None

    def merged(self) -> Checkpoint:
        """The merged checkpoint, opened and validated (cached)."""
        from harness.checkpoint import Checkpoint

        path = self.options.merged
        if path is None:
            raise HarnessError("no merged model: pass --merged-model PATH")
        return self.memo(
            "open:merged", lambda: Checkpoint.open(path, allow_pickle=self.options.allow_pickle)
        )

    def base(self) -> Checkpoint:
        """The base checkpoint, opened and validated (cached)."""
        from harness.checkpoint import Checkpoint

        path = self.options.base
        if path is None:
            raise HarnessError("no base model: pass --base-model PATH")
        return self.memo(
            "open:base", lambda: Checkpoint.open(path, allow_pickle=self.options.allow_pickle)
        )

    def adapter(self) -> Adapter:
        """The adapter folder, opened and validated (cached)."""
        from harness.adapter import Adapter

        path = self.options.adapter
        if path is None:
            raise HarnessError("no adapter: pass --adapter PATH")
        return self.memo(
            "open:adapter", lambda: Adapter.open(path, allow_pickle=self.options.allow_pickle)
        )
