"""Tiny bases, adapters and merges as folders, for tests that compose them one step at a time.

The oracle, delta, diagnosis, merger and CLI tests ask for a base, then adapters on it, then
merges of those by peft or by the streaming merger, and pass folders around. :class:`Workshop`
turns each request into specs for the public ``tiny_merge_factory`` (one cache for the whole
session, shared with ``tiny_llama`` and friends); the ``workshop`` fixture in ``tests/conftest.py``
builds one per session.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from harness.plugin.fixtures import TinyMergeFactory
from harness.tiny import AdapterSpec, ModelSpec, build_merge

#: Noise of the IA3/LoHa/LoKr adapters' weights (LoRA keeps the factory's default).
OTHER_SCALE = 0.3


class Workshop:
    """Folders of tiny bases, adapters and merges, built once per session by the factory.

    Bases are saved as ``save_pretrained`` alone saves them (no tokenizer). Every folder is
    shared by the whole session: copy one (:meth:`folder` gives a fresh place) to damage it.
    """

    def __init__(self, factory: TinyMergeFactory, scratch: Path) -> None:
        self.factory = factory
        self.scratch = scratch
        self._models: dict[Path, ModelSpec] = {}
        self._adapters: dict[Path, tuple[ModelSpec, AdapterSpec]] = {}

    def base(self, arch: str = "llama", dtype: str = "BF16", shard: str | None = None) -> Path:
        """A tiny random base model (in shards of ``shard``, e.g. ``"20KB"``)."""
        model = ModelSpec(arch, dtype, shard=shard, tokenizer=False)
        folder = self.factory.base(model)
        self._models[folder] = model
        return folder

    def adapter(self, base: Path, seed: int = 1, **lora: Any) -> Path:
        """A LoRA adapter on ``base`` (``lora`` -> LoraConfig) with random non-zero weights."""
        return self._adapter(base, AdapterSpec(tuple(lora.items()), seed))

    def other_adapter(self, base: Path, peft_type: str, seed: int = 1, **config: Any) -> Path:
        """An IA3, LOHA or LOKR adapter on ``base`` (``config`` -> its peft config class)."""
        return self._adapter(base, AdapterSpec(tuple(config.items()), seed, OTHER_SCALE, peft_type))

    def peft(self, base: Path, adapter: Path) -> Path:
        """peft's merge_and_unload + save_pretrained."""
        return self._merge(base, [adapter], "peft")

    def ours(self, base: Path, adapter: Path | list[Path]) -> Path:
        """The streaming merger's output (several adapters merge in order)."""
        return self._merge(base, adapter if isinstance(adapter, list) else [adapter], "harness")

    def folder(self, name: str) -> Path:
        """A fresh folder for a test's own output."""
        folder = self.scratch / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.parent.mkdir(parents=True, exist_ok=True)
        return folder

    def _adapter(self, base: Path, adapter: AdapterSpec) -> Path:
        model = self._models[base]
        folder = self.factory.adapter(model, adapter)
        self._adapters[folder] = (model, adapter)
        return folder

    def _merge(self, base: Path, adapters: list[Path], method: str) -> Path:
        model = self._models.get(base)
        specs = [self._adapters.get(a) for a in adapters]
        if model is not None and all(s is not None and s[0] == model for s in specs):
            return self.factory.merge(model, [s[1] for s in specs if s], method=method)
        # Folders a test made itself (edited copies): merged as they are, never cached.
        name = "+".join([base.name, *(a.name for a in adapters)])
        return build_merge(base, adapters, self.folder(f"{method}-{name}"), method=method)
