"""Fixtures the plugin provides to users' own tests (``pytest --fixtures`` lists them).

Nothing heavy is imported here: models, peft and torch load inside the fixtures, on first use.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from harness.plugin.state import STATE_KEY

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from harness.case import MergeCase
    from harness.tiny import AdapterSpec, MergeSpec, ModelSpec

__all__ = ["adapter_model", "base_model", "merge_case", "merged_model", "tiny_merge_factory"]

_NO_MERGE = (
    "no merge named: pass --merged-model PATH (with --base-model PATH and --adapter PATH for the"
    " unmerged comparison), or --base-model and --adapter to let the harness merge"
)


class TinyMergeFactory:
    """Builds tiny merge cases on disk, once per distinct spec in a test session.

    Call it with a :class:`~harness.tiny.MergeSpec` (as drawn by
    ``harness.strategies.merge_cases()``) or with keywords::

        case = tiny_merge_factory(arch="qwen2", dtype="BF16", r=8, use_rslora=True)
        case = tiny_merge_factory(spec)

    Keywords: ``arch`` (llama, mistral, qwen2, gpt2, gemma, phi3, bert), ``dtype`` (F32, BF16,
    F16), ``task`` (CAUSAL_LM, SEQ_CLS), ``method`` (``peft``: ``merge_and_unload``;
    ``harness``: the streaming merger), ``seed`` (base weights), ``adapter_seed``, ``scale``
    (standard deviation of the adapter weights' noise), ``layers``, ``peft_type`` (LORA, IA3,
    LOHA, LOKR), ``shard`` (``max_shard_size`` of the saved base and merge, e.g. ``"20KB"``),
    ``tokenizer`` (save a tokenizer with the base; default True); every other keyword is an
    argument of the peft type's config class (for LoRA: ``r``, ``lora_alpha``,
    ``target_modules``, ``use_rslora``, ``use_dora``, ``rank_pattern``, ``alpha_pattern``,
    ``modules_to_save``...). Returns a :class:`~harness.case.MergeCase` with ``base``,
    ``adapter`` and ``merged`` folders.

    The parts are built and cached on their own, so cases share what they have in common:
    :meth:`base` (one folder per :class:`~harness.tiny.ModelSpec`), :meth:`adapter` (per model
    and :class:`~harness.tiny.AdapterSpec`) and :meth:`merge` (per model, adapters in order,
    method and shard size; several adapters merge one after the other). Nothing built is ever
    written again: treat every folder as read-only and copy one to damage it.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._cases: dict[str, MergeCase] = {}
        self._folders: dict[tuple[Any, ...], Path] = {}

    def spec(
        self,
        *,
        arch: str = "llama",
        dtype: str = "F32",
        task: str = "CAUSAL_LM",
        method: str = "peft",
        seed: int = 0,
        adapter_seed: int = 1,
        scale: float = 0.5,
        layers: int | None = None,
        peft_type: str = "LORA",
        shard: str | int | None = None,
        tokenizer: bool = True,
        **config: Any,
    ) -> MergeSpec:
        """The :class:`~harness.tiny.MergeSpec` that the same keywords would build."""
        from harness.tiny import MODULES, MergeSpec, ModelSpec

        overrides = {} if layers is None else {MODULES[arch].layers_key: layers}
        if MODULES[arch].conv1d and peft_type in ("LORA", "IA3"):
            config.setdefault("fan_in_fan_out", True)
        model = ModelSpec(arch, dtype, task, seed, tuple(overrides.items()), shard, tokenizer)
        return MergeSpec(
            model, tuple(config.items()), adapter_seed, scale, method, peft_type, shard
        )

    def __call__(self, spec: MergeSpec | None = None, /, **keywords: Any) -> MergeCase:
        """Build (or reuse) the merge case of ``spec`` or of the keywords."""
        from harness.case import MergeCase

        if spec is None:
            spec = self.spec(**keywords)
        elif keywords:
            raise TypeError("pass a MergeSpec or keywords, not both")
        key = spec.key()
        if key not in self._cases:
            adapter = spec.adapter_spec
            merged = self.merge(spec.model, [adapter], method=spec.method, shard=spec.shard)
            base = self.base(spec.model)
            self._cases[key] = MergeCase(merged, base, self.adapter(spec.model, adapter), spec)
        return self._cases[key]

    def base(self, model: ModelSpec) -> Path:
        """The folder of ``model``, built on first use."""
        return self._built(("base", model), model.build)

    def adapter(self, model: ModelSpec, adapter: AdapterSpec) -> Path:
        """The folder of ``adapter`` trained, as it were, on ``model``; built on first use."""
        base = self.base(model)
        return self._built(("adapter", model, adapter), lambda out: adapter.build(base, out))

    def merge(
        self,
        model: ModelSpec,
        adapters: Sequence[AdapterSpec],
        *,
        method: str = "peft",
        shard: str | int | None = None,
    ) -> Path:
        """The folder of ``adapters`` merged in order into ``model``, built on first use.

        ``method`` and ``shard`` as in :func:`harness.tiny.build_merge`.
        """
        from harness.tiny import build_merge

        base = self.base(model)
        folders = [self.adapter(model, a) for a in adapters]
        return self._built(
            ("merged", model, tuple(adapters), method, shard),
            lambda out: build_merge(base, folders, out, method=method, shard=shard),
        )

    def _built(self, key: tuple[Any, ...], build: Callable[[Path], Path]) -> Path:
        if key not in self._folders:
            # The specs' reprs are plain values in a fixed order: a stable folder name.
            digest = hashlib.sha256(repr(key).encode()).hexdigest()[:16]
            self._folders[key] = build(self.root / f"{key[0]}-{digest}")
        return self._folders[key]


@pytest.fixture(scope="session")
def tiny_merge_factory(tmp_path_factory: pytest.TempPathFactory) -> TinyMergeFactory:
    """Build tiny random merge cases on disk in seconds: base, PEFT adapter, and its merge.

    ``tiny_merge_factory(arch="llama", dtype="BF16", r=4, use_dora=True)`` saves a 2-layer,
    32-wide model of the architecture (llama, mistral, qwen2 tied, gpt2 Conv1D, gemma, phi3;
    bert for ``task="SEQ_CLS"``) with a tokenizer, a LoRA adapter with non-zero random weights
    from the ``LoraConfig`` keywords (LoRA, rsLoRA, DoRA, rank/alpha patterns,
    ``modules_to_save``, embedding targets; ``peft_type="IA3"``, ``"LOHA"`` or ``"LOKR"`` for
    those adapter types), and its merge by peft (``method="peft"``) or by the streaming merger
    (``method="harness"``); ``shard="20KB"`` saves base and merge in shards. Also accepts a
    ``MergeSpec`` drawn from ``harness.strategies.merge_cases()``. ``.base(model)``,
    ``.adapter(model, adapter)`` and ``.merge(model, adapters)`` build the parts alone (several
    adapters merge in sequence). Everything is cached per parameters for the session;
    returns a ``harness.case.MergeCase`` (``.base``, ``.adapter``, ``.merged`` folders,
    ``.config``, ``.merged_model()``, ``.measure(probe)``, ``.run_checks("behaviour")``).
    """
    return TinyMergeFactory(tmp_path_factory.mktemp("tiny-merges"))


def _state(config: pytest.Config) -> Any:
    return config.stash.get(STATE_KEY, None)


@pytest.fixture(scope="session")
def merge_case(request: pytest.FixtureRequest) -> MergeCase:
    """The merge named on the command line (``--merged-model``, ``--base-model``, ``--adapter``).

    When only ``--base-model`` and ``--adapter`` are given, the harness has already merged them
    with its streaming merger into a temporary folder, and ``merged`` is that folder. Skips
    when no merge was named. A ``harness.case.MergeCase``: ``.merged``/``.base``/``.adapter``
    paths, ``.config``, ``.task``, ``.probe_inputs()`` (a hypothesis strategy of inputs valid
    for the model), ``.measure(probe)`` (merged vs unmerged vs reference on one input).
    """
    from harness.case import MergeCase

    state = _state(request.config)
    if state is None or state.settings.merged is None:
        pytest.skip(_NO_MERGE)
    settings = state.settings
    return MergeCase(
        settings.merged, settings.base, settings.adapter, None, settings, state.context()
    )


def _load(case: MergeCase, what: str) -> Any:
    from harness.behaviour.models import missing_libraries
    from harness.errors import HarnessError

    reason = missing_libraries()
    if reason:
        pytest.skip(reason)
    if what in ("base", "adapter") and case.base is None:
        pytest.skip("no --base-model given (nor discoverable from the adapter)")
    if what == "adapter" and case.adapter is None:
        pytest.skip("no --adapter given")
    try:
        loader = {
            "base": case.base_model,
            "adapter": case.adapter_model,
            "merged": case.merged_model,
        }[what]
        return loader()
    except HarnessError as exc:
        pytest.fail(f"cannot load the {what} model: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def base_model(merge_case: MergeCase) -> Any:
    """The base model (transformers, eval mode) on ``--merge-device``, built once per session.

    The ``AutoModelFor*`` class of the adapter's task, offline, in the comparison dtype
    (``--merge-dtype`` to change it), its layers read from the checkpoint while it runs, within
    ``--merge-memory`` (its parameters hold weights only during a forward pass). Skips without
    ``--base-model``.
    """
    return _load(merge_case, "base")


@pytest.fixture(scope="session")
def adapter_model(merge_case: MergeCase) -> Any:
    """The unmerged adapter model: ``peft.PeftModel`` on the base, on ``--merge-device``.

    Built once per session, in eval mode, the base's layers streamed like ``base_model``'s.
    Skips without ``--base-model`` and ``--adapter``.
    """
    return _load(merge_case, "adapter")


@pytest.fixture(scope="session")
def merged_model(merge_case: MergeCase) -> Any:
    """The merged model, built from its own folder as a user loads it.

    ``AutoModelFor*`` of the task, offline (``local_files_only``), ``trust_remote_code`` only
    with ``--merge-trust-remote-code``, on ``--merge-device``, in eval mode; once per session.
    Its layers are read from the checkpoint while it runs, within ``--merge-memory``.
    """
    return _load(merge_case, "merged")
