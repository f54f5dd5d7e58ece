"""Shared fixtures of the harness's own tests: tiny real merges built once per session."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# Like the root conftest's pre-imports: pytester's in-process runs evict modules first imported
# during a run, and datasets cannot be imported twice in one process (it registers pyarrow
# extension types), so a second in-process benchmark run would fail.
import datasets  # noqa: F401
import pytest
from guard import GUARD, committed_files

from harness.tiny import build_adapter, build_base, peft_merge

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


@dataclass(frozen=True)
class TinyMerge:
    """Paths of a tiny base, its adapter and peft's merge of the two."""

    base: Path
    adapter: Path
    merged: Path


def _build(root: Path, dtype: str, shard: str | None = None) -> TinyMerge:
    base = build_base(root / "base", dtype=dtype, max_shard_size=shard)
    adapter = build_adapter(base, root / "adapter")
    merged = peft_merge(base, adapter, root / "merged", max_shard_size=shard)
    GUARD.watch(root)  # every test must leave the session's merges as built
    return TinyMerge(base, adapter, merged)


@pytest.fixture(scope="session", autouse=True)
def inputs_unchanged() -> Iterator[None]:
    """No committed fixture file and no session-built merge changes across the whole suite."""
    if FIXTURES.is_dir():
        GUARD.watch(FIXTURES, committed_files(FIXTURES))
    yield
    changes = GUARD.changes()
    assert not changes, "inputs changed during the test session:\n" + "\n".join(changes[:20])


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> TinyMerge:
    """A correct peft merge of a tiny fp32 Llama (single-file checkpoints)."""
    return _build(tmp_path_factory.mktemp("llama-f32"), "F32")


@pytest.fixture(scope="session")
def tiny_llama_bf16(tmp_path_factory: pytest.TempPathFactory) -> TinyMerge:
    """A correct peft merge of a tiny bf16 Llama (single-file checkpoints)."""
    return _build(tmp_path_factory.mktemp("llama-bf16"), "BF16")


@pytest.fixture(scope="session")
def tiny_llama_sharded(tmp_path_factory: pytest.TempPathFactory) -> TinyMerge:
    """A correct peft merge of a tiny bf16 Llama, base and merge saved in several shards."""
    return _build(tmp_path_factory.mktemp("llama-sharded"), "BF16", shard="20KB")
