"""The settings of one run and the lazily computed, shared facts about its inputs.

A :class:`Context` is created once per process (the pytest controller, or each xdist worker).
Checks ask it for the opened checkpoints and for shared computations, each named by a typed
:class:`Key`; each is computed on first use and cached, a failure included, so that ten checks
over an unreadable file report one cause ten times instead of reading it ten times.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar, cast

from harness.errors import HarnessError
from harness.io.adapter import Adapter
from harness.io.checkpoint import Checkpoint
from harness.run.settings import Settings

T = TypeVar("T")


class Key(Generic[T]):
    """The name of one memoised computation and, for the type checker, its value's type."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Key({self.name!r})"


class _Failure:
    """A remembered failure: the same error is raised to every later asker."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


MERGED: Key[Checkpoint] = Key("open:merged")
BASE: Key[Checkpoint] = Key("open:base")
ADAPTER: Key[Adapter] = Key("open:adapter")
#: The inputs, by the key that opens them.
INPUTS: dict[str, str] = {MERGED.name: "merged", BASE.name: "base", ADAPTER.name: "adapter"}


class Context:
    """Settings, opened inputs and memoised shared computations for one process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._memo: dict[str, Any] = {}
        #: input -> the id of the check that reports it when it cannot be read (set by the
        #: plugin from the selected items; empty: every check reports what it hits).
        self.owners: dict[str, str] = {}

    def input_failure(self, error: BaseException) -> str | None:
        """The input (``merged``, ``base``, ``adapter``) whose opening raised ``error``, if any."""
        for key, which in INPUTS.items():
            value = self._memo.get(key)
            if isinstance(value, _Failure) and value.error is error:
                return which
        return None

    def memo(self, key: Key[T], compute: Callable[[], T]) -> T:
        """Compute ``key`` once; later calls return the value or re-raise the same failure.

        A :class:`HarnessError` (bad input) is remembered, and so is any other exception: a
        computation that broke once is not run again by the next check that needs it.
        """
        if key.name not in self._memo:
            try:
                self._memo[key.name] = compute()
            except Exception as exc:
                self._memo[key.name] = _Failure(exc)
        value = self._memo[key.name]
        if isinstance(value, _Failure):
            raise value.error
        return cast(T, value)

    def known(self, key: Key[Any]) -> bool:
        """Whether ``key`` was computed (or its computation failed) already."""
        return key.name in self._memo

    def seed(self, key: Key[T], value: T) -> None:
        """Record ``value`` for ``key`` unless it is known already (a pass made it on the way)."""
        self._memo.setdefault(key.name, value)

    def forget(self, key: Key[Any]) -> None:
        """Drop a memoised value (models released after their checks)."""
        self._memo.pop(key.name, None)

    @property
    def has_base(self) -> bool:
        """Whether a base model was given (or discovered)."""
        return self.settings.base is not None

    @property
    def has_adapter(self) -> bool:
        """Whether an adapter was given."""
        return self.settings.adapter is not None

    def merged(self) -> Checkpoint:
        """The merged checkpoint, opened and validated (cached)."""
        path = self.settings.merged
        if path is None:
            raise HarnessError("no merged model: pass --merged-model PATH")
        return self.memo(
            MERGED, lambda: Checkpoint.open(path, allow_pickle=self.settings.allow_pickle)
        )

    def base(self) -> Checkpoint:
        """The base checkpoint, opened and validated (cached)."""
        path = self.settings.base
        if path is None:
            raise HarnessError("no base model: pass --base-model PATH")
        return self.memo(
            BASE, lambda: Checkpoint.open(path, allow_pickle=self.settings.allow_pickle)
        )

    def adapter(self) -> Adapter:
        """The adapter folder, opened and validated (cached)."""
        path = self.settings.adapter
        if path is None:
            raise HarnessError("no adapter: pass --adapter PATH")
        return self.memo(
            ADAPTER, lambda: Adapter.open(path, allow_pickle=self.settings.allow_pickle)
        )
