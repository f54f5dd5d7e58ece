"""Which stored tensors make each parameter of a model, decided once from the checkpoint's headers.

transformers maps checkpoint keys to a model's parameters with its own rules when it loads a
model: the ``base_model_prefix`` added or stripped, legacy names renamed, and in transformers 5
per-expert MoE tensors fused into one parameter (``WeightConverter``). The plan applies the same
rules, with transformers' own functions, to the checkpoint's names alone, so that each layer can
later be read on its own: a :class:`Recipe` per parameter, and the keys that loading would report
as missing, unexpected or of the wrong shape. Where transformers has no conversion machinery
(transformers 4) names map as they are, with the prefix rule. A tied parameter that the
checkpoint lacks is read from the tensor it is tied to, as transformers ties it after loading.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from harness.io.checkpoint import Checkpoint
from harness.io.safetensors import tensor_from_bytes

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Recipe:
    """How one parameter (or a group of parameters a converter makes together) is read.

    ``sources`` are checkpoint tensor names. Without a ``converter`` the parameter is the one
    source as stored (cast to the parameter's dtype). With one, transformers' ``WeightConverter``
    is run on the sources (with their source ``patterns``) and makes the parameters ``targets``;
    ``key`` is the first of them, the layer name transformers passes to the converter.
    """

    sources: tuple[str, ...]
    converter: Any = None
    patterns: tuple[str, ...] = ()
    key: str = ""
    targets: tuple[str, ...] = ()


@dataclass
class WeightPlan:
    """Recipes for a model's parameters and the problems loading it would report."""

    recipes: dict[str, Recipe] = field(default_factory=dict)
    #: Parameters no stored tensor makes (transformers would initialise them randomly).
    missing: list[str] = field(default_factory=list)
    #: Stored tensors no parameter uses.
    unexpected: list[str] = field(default_factory=list)
    #: (name, stored shape, parameter shape) of direct recipes whose shapes disagree.
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    #: Persistent buffers the checkpoint holds (loaded into the model once, when it is built).
    buffers: dict[str, str] = field(default_factory=dict)


def _natural(name: str) -> tuple[tuple[int, Any], ...]:
    """Sort key that orders ``layers.2`` before ``layers.10`` (transformers' loading order)."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in name.split("."))


def _ignored(names: Iterable[str], patterns: Any) -> set[str]:
    found = [p for p in (patterns or []) if isinstance(p, str)]
    return {n for n in names if any(re.search(p, n) for p in found)}


def _rules(model: Any) -> tuple[list[Any], list[Any], Any] | None:
    """The renamings and converters transformers has for ``model``, or None (transformers 4)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:
        return None
    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    return renamings, converters, WeightConverter


def _rename(
    key: str, rules: tuple[list[Any], list[Any], Any] | None, prefix: str, meta: dict[str, Any]
) -> tuple[str, str | None]:
    """A checkpoint key's parameter name (and the converter pattern it matched)."""
    if rules is not None:
        from transformers.core_model_loading import rename_source_key

        renamed, pattern = rename_source_key(key, rules[0], rules[1], prefix, meta)
        if renamed not in meta and key in meta:
            renamed, pattern = rename_source_key(key, [], [], prefix, meta)
        return renamed, pattern
    if prefix and key.startswith(prefix + ".") and key[len(prefix) + 1 :] in meta:
        return key[len(prefix) + 1 :], None
    if prefix and f"{prefix}.{key}" in meta:
        return f"{prefix}.{key}", None
    return key, None


def _ties(model: Any) -> dict[str, str]:
    """Tied parameter -> the parameter it is tied to (transformers 5, or the v4 head rule)."""
    tied = getattr(model, "all_tied_weights_keys", None)
    if isinstance(tied, dict):
        return {str(k): str(v) for k, v in tied.items()}
    config: Any = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not getattr(text, "tie_word_embeddings", False):
        return {}
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if inputs is None or outputs is None:
        return {}
    source, target = names.get(id(inputs.weight)), names.get(id(outputs.weight))
    return {target: source} if source and target and source != target else {}


def plan_weights(model: Any, checkpoint: Checkpoint) -> WeightPlan:
    """The recipes of every parameter of ``model`` (a skeleton on the meta device)."""
    meta = model.state_dict()
    parameters = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    rules = _rules(model)
    prefix = str(getattr(model, "base_model_prefix", "") or "")
    plan = WeightPlan()
    groups: dict[str, tuple[Any, list[tuple[str, str]]]] = {}
    converters = {p: c for c in (rules[1] if rules else []) for p in c.source_patterns}
    unexpected: list[str] = []
    for key in sorted(checkpoint.tensors, key=_natural):
        renamed, pattern = _rename(key, rules, prefix, meta)
        if renamed not in meta:
            unexpected.append(key)
        elif pattern is not None:
            groups.setdefault(renamed, (converters[pattern], []))[1].append((key, pattern))
        elif renamed in parameters:
            plan.recipes.setdefault(renamed, Recipe((key,)))
        else:
            plan.buffers.setdefault(renamed, key)
    for first, (converter, sources) in groups.items():
        targets = tuple(
            t
            for t in dict.fromkeys(
                first.replace(converter.target_patterns[0], target, 1)
                for target in converter.target_patterns
            )
            if t in parameters
        ) or (first,)
        recipe = Recipe(
            tuple(k for k, _ in sources), converter, tuple(p for _, p in sources), first, targets
        )
        for target in targets:
            plan.recipes.setdefault(target, recipe)
    for target, source in _ties(model).items():
        if target not in plan.recipes and source in plan.recipes:
            plan.recipes[target] = plan.recipes[source]
    cls = type(model)
    absent = sorted(parameters - set(plan.recipes), key=_natural)
    skip = _ignored(absent, getattr(cls, "_keys_to_ignore_on_load_missing", None))
    plan.missing = [n for n in absent if n not in skip]
    skip = _ignored(unexpected, getattr(cls, "_keys_to_ignore_on_load_unexpected", None))
    plan.unexpected = [n for n in unexpected if n not in skip]
    for name, recipe in plan.recipes.items():
        if recipe.converter is None:
            stored = checkpoint.tensors[recipe.sources[0]].shape
            wanted = tuple(meta[name].shape)
            if stored != wanted:
                plan.mismatched.append((name, stored, wanted))
    return plan


def read_tensor(checkpoint: Checkpoint, name: str) -> torch.Tensor:
    """One stored tensor as a CPU tensor in its stored dtype (a fresh buffer, no memory map)."""
    return tensor_from_bytes(checkpoint.tensors[name], checkpoint.read_into(name))


def convert(recipe: Recipe, model: Any, checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    """Run a recipe's transformers converter on its stored tensors: parameter name -> tensor.

    The converter is transformers' own (``WeightConverter.convert``), given deferred reads in
    the order transformers collects them; a copy is used, since converting consumes what the
    converter collected.
    """
    converter = copy.deepcopy(recipe.converter)
    for source, pattern in zip(recipe.sources, recipe.patterns, strict=True):

        def read(source: str = source) -> torch.Tensor:
            return read_tensor(checkpoint, source)

        converter.add_tensor(recipe.key, source, pattern, read)
    made = converter.convert(recipe.key, model=model, config=getattr(model, "config", None))
    return {name: (value[0] if isinstance(value, list) else value) for name, value in made.items()}
