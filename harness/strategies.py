"""Public hypothesis strategies for merge testing, and the harness's settings profiles.

Strategies are plural nouns with keyword-only bounds, validated when the strategy is created
(a bad bound raises :class:`hypothesis.errors.InvalidArgument` at once, not at the first draw):

- :func:`probe_inputs` — token ids (special tokens included), lengths, batch sizes and left or
  right padding with attention masks, as :class:`~harness.behaviour.probe.ProbeInput`;
- :func:`model_configs` — tiny models per architecture as :class:`~harness.tiny.ModelSpec`;
- :func:`lora_configs` — ``LoraConfig`` keyword arguments (rank, alpha, targets, rsLoRA, DoRA,
  rank/alpha patterns, ``modules_to_save``, embedding targets) for an architecture;
- :func:`merge_cases` — whole merge cases as :class:`~harness.tiny.MergeSpec`, built on disk by
  the ``tiny_merge_factory`` fixture.

Importing this module registers the settings profiles ``merge-harness-ci`` (derived from
hypothesis' built-in ``ci`` profile: derandomised, no database, no deadline) and
``merge-harness-dev``; :func:`load_profile` picks one from the environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from harness.behaviour.probe import PADDINGS, ProbeInput, ProbeSpace, pad_rows
from harness.tiny import (
    ARCHITECTURES,
    DTYPES,
    ENCODERS,
    MODULES,
    TASKS,
    MergeSpec,
    ModelSpec,
    Modules,
)

__all__ = [
    "PROFILE_CI",
    "PROFILE_DEV",
    "load_profile",
    "lora_configs",
    "merge_cases",
    "model_configs",
    "probe_inputs",
    "probes_for",
    "register_profiles",
]

PROFILE_CI = "merge-harness-ci"
PROFILE_DEV = "merge-harness-dev"
#: Health checks that are expected with real models: each example runs forward passes, and
#: session-scoped model fixtures are reused across examples on purpose.
_SUPPRESSED = (
    HealthCheck.too_slow,
    HealthCheck.function_scoped_fixture,
    HealthCheck.differing_executors,
)


# ---- validation -------------------------------------------------------------------------


def _integer(name: str, value: Any, low: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{name}={value!r} must be an integer")
    if low is not None and value < low:
        raise InvalidArgument(f"{name}={value!r} must be at least {low}")
    return value


def _bounds(low_name: str, low: Any, high_name: str, high: Any, floor: int) -> tuple[int, int]:
    lo = _integer(low_name, low, floor)
    hi = _integer(high_name, high, floor)
    if lo > hi:
        raise InvalidArgument(f"{low_name}={lo} must not exceed {high_name}={hi}")
    return lo, hi


def _choices(name: str, values: Any, allowed: Sequence[str]) -> tuple[str, ...]:
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise InvalidArgument(
            f"{name}={values!r} must be a sequence of names, e.g. {list(allowed[:2])}"
        )
    chosen = tuple(values)
    if not chosen:
        raise InvalidArgument(f"{name} must not be empty")
    unknown = [v for v in chosen if v not in allowed]
    if unknown:
        raise InvalidArgument(f"{name}: unknown {unknown!r} (known: {', '.join(allowed)})")
    return chosen


def _flag(name: str, value: Any) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise InvalidArgument(f"{name}={value!r} must be True, False or None (either)")
    return value


def _maybe(flag: bool | None) -> st.SearchStrategy[bool]:
    return st.booleans() if flag is None else st.just(flag)


# ---- probe inputs -----------------------------------------------------------------------


def probe_inputs(
    *,
    vocab_size: int,
    special_ids: Sequence[int] = (),
    pad_id: int | None = None,
    min_length: int = 1,
    max_length: int = 16,
    min_batch: int = 1,
    max_batch: int = 4,
    paddings: Sequence[str] = PADDINGS,
) -> st.SearchStrategy[ProbeInput]:
    """Batches of token ids in ``[0, vocab_size)`` with attention masks.

    Ids are drawn uniformly or from ``special_ids`` (BOS, EOS, pad...). Each row has its own
    length in ``[min_length, max_length]`` and rows are padded on the drawn side (``"left"`` or
    ``"right"``) with ``pad_id`` (0 when None) under mask 0; ``"none"`` gives every row one
    length. Examples shrink towards one row of one token ``0`` without padding.
    """
    vocab = _integer("vocab_size", vocab_size, 1)
    specials = tuple(special_ids)
    for i in specials:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab:
            raise InvalidArgument(f"special_ids: {i!r} is not a token id below vocab_size={vocab}")
    if pad_id is not None and (
        isinstance(pad_id, bool) or not isinstance(pad_id, int) or not 0 <= pad_id < vocab
    ):
        raise InvalidArgument(f"pad_id={pad_id!r} is not a token id below vocab_size={vocab}")
    lo_len, hi_len = _bounds("min_length", min_length, "max_length", max_length, 1)
    lo_batch, hi_batch = _bounds("min_batch", min_batch, "max_batch", max_batch, 1)
    sides = _choices("paddings", paddings, PADDINGS)
    token = st.integers(0, vocab - 1)
    if specials:
        token = st.one_of(token, st.sampled_from(sorted(set(specials))))
    fill = 0 if pad_id is None else pad_id

    @st.composite
    def draw_probe(draw: st.DrawFn) -> ProbeInput:
        side = draw(st.sampled_from(sides))
        batch = draw(st.integers(lo_batch, hi_batch))
        if side == "none":
            length = draw(st.integers(lo_len, hi_len))
            lengths = [length] * batch
        else:
            lengths = [draw(st.integers(lo_len, hi_len)) for _ in range(batch)]
        rows = [draw(st.lists(token, min_size=n, max_size=n)) for n in lengths]
        return pad_rows(rows, side, fill)

    return draw_probe()


def probes_for(
    space: ProbeSpace, *, min_length: int = 1, max_length: int | None = None
) -> st.SearchStrategy[ProbeInput]:
    """:func:`probe_inputs` within a model's :class:`~harness.behaviour.probe.ProbeSpace`.

    Ids from its vocabulary (special tokens included), padding only where the model supports
    padded batches, at most ``space.max_batch`` rows of at most ``max_length`` (default
    ``space.max_length``) tokens.
    """
    return probe_inputs(
        vocab_size=space.vocab_size,
        special_ids=space.special_ids,
        pad_id=space.pad_id,
        min_length=min_length,
        max_length=max_length or space.max_length,
        max_batch=space.max_batch,
        paddings=space.paddings,
    )


# ---- models and adapters ----------------------------------------------------------------


def model_configs(
    *,
    architectures: Sequence[str] | None = None,
    dtypes: Sequence[str] = DTYPES,
    tasks: Sequence[str] = ("CAUSAL_LM",),
    min_layers: int = 1,
    max_layers: int = 2,
    seeds: Sequence[int] | None = None,
) -> st.SearchStrategy[ModelSpec]:
    """Tiny models as :class:`~harness.tiny.ModelSpec`.

    Each has an architecture, a stored dtype (``F32``, ``BF16``, ``F16``), a task, a layer
    count and a seed for the random weights.

    ``architectures`` defaults to the causal LMs (llama, mistral, qwen2, gpt2, gemma, phi3);
    encoders (``bert``) are drawn only for ``SEQ_CLS``. ``seeds`` limits the random weights to
    a few bases (each distinct base is built once by the factory fixture; fewer is faster).
    """
    known = (*ARCHITECTURES, *ENCODERS)
    archs = _choices("architectures", architectures or tuple(ARCHITECTURES), known)
    codes = _choices("dtypes", dtypes, DTYPES)
    chosen_tasks = _choices("tasks", tasks, TASKS)
    lo, hi = _bounds("min_layers", min_layers, "max_layers", max_layers, 1)
    pairs = [
        (a, t) for a in archs for t in chosen_tasks if not (a in ENCODERS and t == "CAUSAL_LM")
    ]
    if not pairs:
        raise InvalidArgument(
            f"no architecture of {list(archs)} supports the tasks {list(chosen_tasks)}"
        )
    if seeds is None:
        seed_strategy: st.SearchStrategy[int] = st.integers(0, 2**16)
    else:
        if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence) or not seeds:
            raise InvalidArgument(f"seeds={seeds!r} must be a non-empty sequence of integers")
        seed_strategy = st.sampled_from([_integer("seeds item", s, 0) for s in seeds])

    @st.composite
    def draw_model(draw: st.DrawFn) -> ModelSpec:
        arch, task = draw(st.sampled_from(pairs))
        layers = draw(st.integers(lo, hi))
        return ModelSpec(
            arch=arch,
            dtype=draw(st.sampled_from(codes)),
            task=task,
            seed=draw(seed_strategy),
            overrides=((MODULES[arch].layers_key, layers),),
        )

    return draw_model()


def lora_configs(
    *,
    architecture: str = "llama",
    task_type: str | None = None,
    min_rank: int = 1,
    max_rank: int = 8,
    rslora: bool | None = None,
    dora: bool | None = None,
    patterns: bool | None = None,
    modules_to_save: bool | None = None,
    embeddings: bool | None = None,
) -> st.SearchStrategy[dict[str, Any]]:
    """``LoraConfig`` keyword arguments valid for a tiny model of ``architecture``.

    Each flag is True (always), False (never) or None (drawn): ``rslora`` (``alpha/sqrt(r)``
    scaling), ``dora`` (weight-decomposed LoRA), ``patterns`` (per-module ``rank_pattern`` and
    ``alpha_pattern``), ``modules_to_save`` (a trained copy of the output head) and
    ``embeddings`` (LoRA on the input embedding and/or the output head). Targets are
    ``"all-linear"`` or a drawn subset of the block's linear layers; GPT-2 gets
    ``fan_in_fan_out=True``. Architectures that tie the head to the embedding draw no head or
    embedding targets and no saved head unless asked with True (their merge is ill-defined:
    the unmerged adapter changes one side of the tie only); DoRA is not combined with
    embedding targets.
    """
    known = (*ARCHITECTURES, *ENCODERS)
    if architecture not in known:
        raise InvalidArgument(f"architecture={architecture!r}: known {', '.join(known)}")
    if task_type is not None and task_type not in TASKS:
        raise InvalidArgument(f"task_type={task_type!r}: one of {', '.join(TASKS)} or None")
    lo, hi = _bounds("min_rank", min_rank, "max_rank", max_rank, 1)
    flags = {
        name: _flag(name, value)
        for name, value in (
            ("rslora", rslora),
            ("dora", dora),
            ("patterns", patterns),
            ("modules_to_save", modules_to_save),
            ("embeddings", embeddings),
        )
    }
    modules = MODULES[architecture]
    classify = task_type == "SEQ_CLS" or architecture in ENCODERS
    if flags["dora"] and flags["embeddings"]:
        raise InvalidArgument("dora=True and embeddings=True: peft has no DoRA for embeddings")
    if classify and flags["modules_to_save"]:
        raise InvalidArgument("modules_to_save=True is for causal LMs (SEQ_CLS saves its head)")
    if flags["embeddings"] and flags["dora"] is None:
        flags["dora"] = False  # asked-for embedding targets exclude DoRA
    if modules.tied and flags["embeddings"] is None:
        flags["embeddings"] = False
    if (modules.tied or classify) and flags["modules_to_save"] is None:
        flags["modules_to_save"] = False
    if classify and flags["embeddings"] is None:
        flags["embeddings"] = False

    @st.composite
    def draw_lora(draw: st.DrawFn) -> dict[str, Any]:
        return _draw_lora(draw, modules, lo, hi, flags, task_type, classify)

    return draw_lora()


def _draw_lora(
    draw: st.DrawFn,
    modules: Modules,
    lo: int,
    hi: int,
    flags: Mapping[str, bool | None],
    task_type: str | None,
    classify: bool,
) -> dict[str, Any]:
    rank = draw(st.integers(lo, hi))
    alpha = draw(st.sampled_from(sorted({rank, 2 * rank, 8, 16})))
    use_dora = draw(_maybe(flags["dora"]))
    use_embeddings = draw(_maybe(flags["embeddings"])) and not use_dora
    save_head = draw(_maybe(flags["modules_to_save"]))
    linear = sorted(draw(st.sets(st.sampled_from(modules.linear), min_size=1)))
    all_linear = draw(st.booleans())
    extra: list[str] = []
    if use_embeddings:
        options = (
            [modules.embedding] if classify or save_head else [modules.embedding, modules.head]
        )
        extra = sorted(draw(st.sets(st.sampled_from(options), min_size=1)))
    targets: str | list[str]
    if all_linear and not extra:
        targets, chosen = "all-linear", list(modules.linear)
    else:
        chosen = list(modules.linear) if all_linear else linear
        targets = sorted(chosen + extra)
    kwargs: dict[str, Any] = {
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": targets,
        "use_rslora": draw(_maybe(flags["rslora"])),
        "use_dora": use_dora,
    }
    if modules.conv1d:
        kwargs["fan_in_fan_out"] = True
    if task_type is not None:
        kwargs["task_type"] = task_type
    if save_head:
        kwargs["modules_to_save"] = [modules.head]
    if draw(_maybe(flags["patterns"])):
        names = sorted(draw(st.sets(st.sampled_from(chosen), min_size=1)))
        kwargs["rank_pattern"] = {n: draw(st.integers(lo, hi)) for n in names}
        kwargs["alpha_pattern"] = {n: draw(st.sampled_from((4, 8, 16, 32))) for n in names}
    return kwargs


def merge_cases(
    *,
    architectures: Sequence[str] | None = None,
    dtypes: Sequence[str] = DTYPES,
    tasks: Sequence[str] = ("CAUSAL_LM",),
    methods: Sequence[str] = ("peft",),
    min_rank: int = 1,
    max_rank: int = 8,
    rslora: bool | None = None,
    dora: bool | None = None,
    patterns: bool | None = None,
    modules_to_save: bool | None = None,
    embeddings: bool | None = None,
    scales: Sequence[float] = (0.05, 0.5),
    min_layers: int = 1,
    max_layers: int = 2,
    seeds: Sequence[int] | None = None,
) -> st.SearchStrategy[MergeSpec]:
    """Whole merge cases as :class:`~harness.tiny.MergeSpec`.

    A case is a tiny model (:func:`model_configs`), an adapter config for it
    (:func:`lora_configs`), the adapter weights' noise ``scale`` and seed, and the merger
    (``peft`` or ``harness``); ``seeds`` as in :func:`model_configs`. Build one with the
    ``tiny_merge_factory`` fixture or :func:`harness.tiny.build_case`.
    """
    models = model_configs(
        architectures=architectures,
        dtypes=dtypes,
        tasks=tasks,
        min_layers=min_layers,
        max_layers=max_layers,
        seeds=seeds,
    )
    chosen_methods = _choices("methods", methods, ("peft", "harness"))
    if isinstance(scales, (str, bytes)) or not isinstance(scales, Sequence) or not scales:
        raise InvalidArgument(f"scales={scales!r} must be a non-empty sequence of numbers")
    for scale in scales:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise InvalidArgument(f"scales: {scale!r} must be a positive number")
    lora_flags: dict[str, Any] = dict(
        min_rank=min_rank,
        max_rank=max_rank,
        rslora=rslora,
        dora=dora,
        patterns=patterns,
        modules_to_save=modules_to_save,
    )
    lora_configs(embeddings=embeddings, **lora_flags)  # validate the bounds eagerly

    @st.composite
    def draw_case(draw: st.DrawFn) -> MergeSpec:
        model = draw(models)
        method = draw(st.sampled_from(chosen_methods))
        tied = MODULES[model.arch].tied
        # peft's merge of a LoRA on a tied embedding changes both sides of the tie, which the
        # unmerged adapter model does not: not a correct merge to draw (the harness unties).
        wants_embeddings = embeddings if not (tied and method == "peft") else False
        lora = draw(
            lora_configs(
                architecture=model.arch,
                task_type=model.task,
                embeddings=wants_embeddings,
                **lora_flags,
            )
        )
        return MergeSpec(
            model=model,
            lora=tuple(lora.items()),
            adapter_seed=draw(st.integers(0, 2**16)),
            scale=draw(st.sampled_from(tuple(scales))),
            method=method,
        )

    return draw_case()


# ---- settings profiles ------------------------------------------------------------------


def register_profiles() -> None:
    """Register ``merge-harness-ci`` and ``merge-harness-dev`` (idempotent).

    Both derive from hypothesis' built-in ``ci`` profile (no deadline: forward passes vary in
    time); ``-ci`` stays derandomised with no example database, so a CI run is reproducible
    without cached failures, while ``-dev`` draws fresh random examples and keeps the default
    database so a local failure replays first.
    """
    import warnings

    from hypothesis.errors import HypothesisDeprecationWarning

    with warnings.catch_warnings():
        # first imported inside an @settings-decorated test: registering is still harmless
        warnings.simplefilter("ignore", HypothesisDeprecationWarning)
        _register()


def _register() -> None:
    ci = settings.get_profile("ci")
    settings.register_profile(
        PROFILE_CI,
        parent=ci,
        max_examples=25,
        deadline=None,
        suppress_health_check=_SUPPRESSED,
    )
    settings.register_profile(
        PROFILE_DEV,
        parent=ci,
        max_examples=10,
        deadline=None,
        derandomize=False,
        database=settings.get_profile("default").database,
        print_blob=False,
        suppress_health_check=_SUPPRESSED,
    )


def load_profile(environ: Mapping[str, str] | None = None) -> str:
    """Load ``$HYPOTHESIS_PROFILE``, else ``merge-harness-ci`` under ``$CI``, else ``-dev``."""
    env = os.environ if environ is None else environ
    name = env.get("HYPOTHESIS_PROFILE") or (PROFILE_CI if env.get("CI") else PROFILE_DEV)
    settings.load_profile(name)
    return name


register_profiles()
