"""A merge case: the merged folder, with the base and adapter it claims to come from.

The ``merge_case`` fixture returns the case named on the command line; the
``tiny_merge_factory`` fixture returns the cases it builds. Either way a case loads its models
lazily (sharing one :class:`~harness.run.context.Context`), tailors probe strategies to its
model, and runs the harness's own checks on itself.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.behaviour import models
from harness.behaviour.measure import Comparer, Figures
from harness.checks import build_suite
from harness.io.models import read_config, task_of
from harness.run.context import Context, Key
from harness.run.result import CheckResult, Family
from harness.run.runner import run_check
from harness.run.settings import Settings
from harness.strategies import probes_for

if TYPE_CHECKING:
    from hypothesis.strategies import SearchStrategy

    from harness.behaviour.probe import ProbeInput, ProbeSpace
    from harness.tiny import MergeSpec

CONFIG: Key[dict[str, Any]] = Key("case:config")
COMPARER: Key[Comparer] = Key("case:comparer")


@dataclass
class MergeCase:
    """Folders of one merge and lazily loaded facts about it."""

    merged: Path
    base: Path | None = None
    adapter: Path | None = None
    #: The spec a tiny case was built from (None for a case named on the command line).
    spec: MergeSpec | None = None
    #: Settings (device, dtype, examples...) the models load and checks run with.
    settings: Settings | None = None
    _context: Context | None = field(default=None, repr=False, compare=False)

    def context(self) -> Context:
        """The context whose memo holds this case's loaded models."""
        if self._context is None:
            settings = dataclasses.replace(
                self.settings or Settings(),
                merged=self.merged,
                base=self.base,
                adapter=self.adapter,
            )
            self._context = Context(settings)
        return self._context

    @property
    def device(self) -> str:
        """The device models are loaded on (``--merge-device``)."""
        return self.context().settings.device

    @property
    def config(self) -> dict[str, Any]:
        """The merged folder's ``config.json``."""
        return self.context().memo(CONFIG, lambda: read_config(self.merged))

    @property
    def adapter_config(self) -> dict[str, Any] | None:
        """The adapter's ``adapter_config.json`` (None without an adapter)."""
        if self.adapter is None:
            return None
        return self.context().adapter().config

    @property
    def task(self) -> str:
        """The model's task (the adapter's ``task_type``, else from ``architectures``)."""
        return task_of(self.adapter_config, self.config)

    @property
    def vocab_size(self) -> int:
        """The vocabulary size of the merged model."""
        return self.probe_space().vocab_size

    def probe_space(self) -> ProbeSpace:
        """The inputs the merged model accepts (the behaviour checks' own space)."""
        return models.setup(self.context()).space

    def probe_inputs(
        self, *, min_length: int = 1, max_length: int | None = None
    ) -> SearchStrategy[ProbeInput]:
        """A hypothesis strategy of probe inputs valid for this model.

        Ids come from its vocabulary (special tokens included), padding only where it supports
        padded batches.
        """
        return probes_for(self.probe_space(), min_length=min_length, max_length=max_length)

    def merged_model(self) -> Any:
        """The merged model, built from its folder as a user loads it (cached).

        Its layers are read from the checkpoint while it runs (``harness.forward``): call it as
        any transformers model; its parameters hold weights only during a forward pass.
        """
        return models.merged_model(self.context()).model

    def adapter_model(self) -> Any:
        """The unmerged adapter model, ``PeftModel`` on the base (cached, streamed likewise)."""
        return models.adapter_model(self.context()).model

    def base_model(self) -> Any:
        """The base model without the adapter (cached, streamed likewise)."""
        return models.base_model(self.context()).model

    def measure(self, probe: ProbeInput) -> Figures:
        """Compare merged and unmerged models against the reference on ``probe``.

        The result's ``ok`` is the behaviour check's verdict for this one input; ``explain()``
        gives the figures.
        """
        comparer = self.context().memo(COMPARER, lambda: Comparer(self.context()))
        return comparer.measure(probe)

    def run_checks(self, *families: str) -> dict[str, CheckResult]:
        """Run the harness's checks of ``families`` (default: all) on this case, by check id."""
        settings = self.context().settings
        chosen = frozenset(Family(f) for f in families) if families else None
        suite = build_suite(dataclasses.replace(settings, families=chosen))
        return {check.id: run_check(check, self.context()) for check in suite}

    def release(self) -> None:
        """Free the loaded models."""
        if self._context is not None:
            models.release_models(self._context)
