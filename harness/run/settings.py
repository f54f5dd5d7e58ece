"""The settings of one run, resolved once: defaults < gate configuration file < command line.

The command line (or any caller) describes a :class:`Request`: the inputs, the outputs and the
knob values it gave explicitly (a knob it did not give is absent, never a default that could be
mistaken for "not given"). :func:`resolve` reads the configuration file once and builds the
frozen :class:`Settings` every check, worker and report reads. Nothing else writes settings.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.run.config import DEFAULT_LOCK, GateConfig, find, parse
from harness.run.knobs import BY_NAME, KNOBS
from harness.run.result import Family


@dataclass(frozen=True)
class Request:
    """What a run was asked to do, before the configuration file is read."""

    merged: Path | None = None
    base: Path | None = None
    adapter: Path | None = None
    #: ``--export``: exported files (GGUF) to verify against the merged model.
    exports: tuple[Path, ...] = ()
    allow_pickle: bool = False
    trust_remote_code: bool = False
    #: ``--merge-config``: an explicit configuration file (None: discovered).
    config_path: Path | None = None
    #: ``--merge-lock``: an explicit lock file (None: from the configuration, or the default).
    lock_path: Path | None = None
    update_lock: bool = False
    report_path: Path | None = None
    summary_path: Path | None = None
    #: ``--merge-shard K/N``: compute part K of N of the streamed pass (None: all of it).
    shard: tuple[int, int] | None = None
    #: Knob values given explicitly (field name -> parsed value).
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.overrides) - set(BY_NAME))
        if unknown:
            raise ValueError(f"unknown setting(s) {', '.join(unknown)}")


@dataclass(frozen=True)
class Settings:
    """Everything one run needs to know, immutable (shipped whole to xdist workers)."""

    merged: Path | None = None
    base: Path | None = None
    adapter: Path | None = None
    #: Exported files (GGUF, the first part of a split one) verified against the merged model.
    exports: tuple[Path, ...] = ()
    #: A folder the harness may write to (its own merge); never a user's checkpoint folder.
    workdir: Path | None = None
    allow_pickle: bool = False
    trust_remote_code: bool = False
    #: Families to run (None: every family that applies).
    families: frozenset[Family] | None = None
    #: Allowed rounding error of a changed tensor, in ULPs of the stored dtype.
    ulp_tolerance: float = BY_NAME["ulp_tolerance"].default
    #: Hypothesis examples per behaviour property.
    examples: int = BY_NAME["examples"].default
    #: Seconds one check may run before it is failed as hung (None: no limit).
    timeout: float | None = BY_NAME["timeout"].default
    device: str = BY_NAME["device"].default
    dtype: str | None = BY_NAME["dtype"].default
    #: Bytes the forward passes may hold (None: derived from the available memory).
    memory: int | None = BY_NAME["memory"].default
    #: The validated gate configuration file (empty when there is none).
    config: GateConfig = field(default_factory=GateConfig)
    lock_path: Path | None = None
    #: Whether a lock file was named (by ``--merge-lock`` or the file): its check then runs.
    lock_requested: bool = False
    #: Whether ``--merge-lock`` named it: only then may the lock path be a symlink.
    lock_named: bool = False
    update_lock: bool = False
    report_path: Path | None = None
    summary_path: Path | None = None
    #: ``--merge-shard K/N``: this run computes part K of N of the streamed pass only.
    shard: tuple[int, int] | None = None
    #: A private folder in which pytest-xdist workers share the parts of one streamed pass.
    share: Path | None = None
    #: How many processes share the pass through ``share``.
    peers: int = 1

    def runs(self, family: Family) -> bool:
        """Whether ``family`` is selected (every family is, unless some were chosen)."""
        return self.families is None or family in self.families

    @property
    def has_base(self) -> bool:
        """Whether a base model was given (or discovered)."""
        return self.base is not None

    @property
    def has_adapter(self) -> bool:
        """Whether an adapter was given."""
        return self.adapter is not None


def knob_values(config: GateConfig, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Each knob's value: its default, else the file's, else the command line's (which wins)."""
    values = {knob.name: knob.default for knob in KNOBS}
    values.update(config.knobs)
    values.update({name: value for name, value in overrides.items() if value is not None})
    return values


def resolve(
    request: Request,
    *,
    rootdir: Path,
    cwd: Path | None = None,
    workdir: Path | None = None,
) -> Settings:
    """Read the configuration file and build the run's :class:`Settings`.

    Raises :class:`~harness.errors.ConfigError` with a one-line cause for a malformed file.
    The lock file is ``--merge-lock``, else the file's ``lock``, else ``merge-harness.lock``
    beside the configuration file (without one, in the current folder).
    """
    here = cwd if cwd is not None else Path.cwd()
    source, table = find(request.config_path, rootdir, here)
    config = parse(table, source)
    lock = request.lock_path or config.lock
    if lock is None:
        lock = (source.parent if source is not None else here) / DEFAULT_LOCK
    return Settings(
        merged=request.merged,
        base=request.base,
        adapter=request.adapter,
        exports=request.exports,
        workdir=workdir,
        allow_pickle=request.allow_pickle,
        trust_remote_code=request.trust_remote_code,
        config=config,
        lock_path=lock.absolute(),
        lock_requested=request.lock_path is not None or config.lock is not None,
        lock_named=request.lock_path is not None,
        update_lock=request.update_lock,
        report_path=request.report_path,
        summary_path=request.summary_path,
        shard=request.shard,
        **knob_values(config, request.overrides),
    )

