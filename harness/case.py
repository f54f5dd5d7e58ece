"""A merge case: the merged folder, with the base and adapter it claims to come from.

The ``merge_case`` fixture returns the case named on the command line; the
``tiny_merge_factory`` fixture returns the cases it builds. Either way a case loads its models
lazily (sharing one :class:`~harness.context.Context`), tailors probe strategies to its model, and
runs the harness's own checks on itself.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.context import Context, Options

if TYPE_CHECKING:
    from hypothesis.strategies import SearchStrategy

    from harness.behaviour import Figures
    from harness.probe import ProbeInput, ProbeSpace
    from harness.result import CheckResult
    from harness.tiny import MergeSpec


@dataclass
class MergeCase:
    """Folders of one merge and lazily loaded facts about it."""

    merged: Path
    base: Path | None = None
    adapter: Path | None = None
    #: The spec a tiny case was built from (None for a case named on the command line).
    spec: MergeSpec | None = None
    #: Settings (device, dtype, examples...) the models load and checks run with.
    options: Options | None = None
    _context: Context | None = field(default=None, repr=False, compare=False)

    def context(self) -> Context:
        """The context whose memo holds this case's loaded models."""
        if self._context is None:
            base = self.options or Options()
            options = dataclasses.replace(
                base, merged=self.merged, base=self.base, adapter=self.adapter
            )
            self._context = Context(options)
        return self._context

    @property
    def device(self) -> str:
        """The device models are loaded on (``--merge-device``)."""
        return self.context().options.device

    @property
    def config(self) -> dict[str, Any]:
        """The merged folder's ``config.json``."""
        from harness.loading import read_config

        return self.context().memo("case:config", lambda: read_config(self.merged))

    @property
    def adapter_config(self) -> dict[str, Any] | None:
        """The adapter's ``adapter_config.json`` (None without an adapter)."""
        if self.adapter is None:
            return None
        return self.context().adapter().config

    @property
    def task(self) -> str:
        """The model's task (the adapter's ``task_type``, else from ``architectures``)."""
        from harness.loading import task_of

        return task_of(self.adapter_config, self.config)

    @property
    def vocab_size(self) -> int:
        """The vocabulary size of the merged model."""
        return self.probe_space().vocab_size

    def probe_space(self) -> ProbeSpace:
        """The inputs the merged model accepts (the behaviour checks' own space)."""
        from harness.behaviour import setup

        return setup(self.context()).space

    def probe_inputs(
        self, *, min_length: int = 1, max_length: int | None = None
    ) -> SearchStrategy[ProbeInput]:
        """A hypothesis strategy of probe inputs valid for this model.

        Ids come from its vocabulary (special tokens included), padding only where it supports
        padded batches.
        """
        return self.probe_space().strategy(min_length=min_length, max_length=max_length)

    def merged_model(self) -> Any:
        """The merged model, loaded from its folder as a user would (cached)."""
        from harness.behaviour import merged_model

        return merged_model(self.context())

    def adapter_model(self) -> Any:
        """The unmerged adapter model, ``PeftModel`` on the base (cached)."""
        from harness.behaviour import adapter_model

        return adapter_model(self.context())

    def base_model(self) -> Any:
        """The base model without the adapter (cached)."""
        from harness.behaviour import base_model

        return base_model(self.context())

    def measure(self, probe: ProbeInput) -> Figures:
        """Compare merged and unmerged models against the reference on ``probe``.

        The result's ``ok`` is the behaviour check's verdict for this one input; ``explain()``
        gives the figures.
        """
        from harness.behaviour import Comparer

        comparer: Comparer = self.context().memo("case:comparer", lambda: Comparer(self.context()))
        return comparer.measure(probe)

    def run_checks(self, *families: str) -> dict[str, CheckResult]:
        """Run the harness's checks of ``families`` (default: all) on this case, by check id."""
        from harness.runner import run_check
        from harness.suite import build_suite

        options = self.context().options
        chosen = frozenset(families) if families else None
        suite = build_suite(dataclasses.replace(options, families=chosen))
        return {check.id: run_check(check, self.context()) for check in suite}

    def release(self) -> None:
        """Free the loaded models."""
        from harness.behaviour import release_models

        if self._context is not None:
            release_models(self._context)
