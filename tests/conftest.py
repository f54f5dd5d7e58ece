"""Shared fixtures of the harness's own tests: tiny real merges built once per session.

Every tiny model, adapter and merge comes from the plugin's public ``tiny_merge_factory`` (one
cache per session); ``tiny_llama*`` and ``workshop`` are views of it. Helpers the test modules
import live in the ``support`` package next to this file.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

# Like the root conftest's pre-imports: pytester's in-process runs evict modules first imported
# during a run, and datasets cannot be imported twice in one process (it registers pyarrow
# extension types), so a second in-process benchmark run would fail.
import datasets  # noqa: F401
import pytest
from support.guard import GUARD, committed_files
from support.workshop import Workshop

from harness.case import MergeCase
from harness.plugin.fixtures import TinyMergeFactory

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def _watched(case: MergeCase) -> MergeCase:
    """``case``, its folders watched: every test must leave the session's merges as built."""
    for folder in (case.base, case.adapter, case.merged):
        assert folder is not None
        GUARD.watch(folder)
    return case


@pytest.fixture(scope="session", autouse=True)
def inputs_unchanged() -> Iterator[None]:
    """No committed fixture file and no session-built merge changes across the whole suite."""
    if FIXTURES.is_dir():
        GUARD.watch(FIXTURES, committed_files(FIXTURES))
    yield
    changes = GUARD.changes()
    assert not changes, "inputs changed during the test session:\n" + "\n".join(changes[:20])


@pytest.fixture(scope="session")
def tiny_llama(tiny_merge_factory: TinyMergeFactory) -> MergeCase:
    """A correct peft merge of a tiny fp32 Llama (single-file checkpoints, no tokenizer)."""
    return _watched(tiny_merge_factory(arch="llama", dtype="F32", tokenizer=False))


@pytest.fixture(scope="session")
def tiny_llama_bf16(tiny_merge_factory: TinyMergeFactory) -> MergeCase:
    """A correct peft merge of a tiny bf16 Llama (single-file checkpoints, no tokenizer)."""
    return _watched(tiny_merge_factory(arch="llama", dtype="BF16", tokenizer=False))


@pytest.fixture(scope="session")
def tiny_llama_sharded(tiny_merge_factory: TinyMergeFactory) -> MergeCase:
    """A correct peft merge of a tiny bf16 Llama, base and merge saved in several shards."""
    return _watched(
        tiny_merge_factory(arch="llama", dtype="BF16", shard="20KB", tokenizer=False)
    )


@pytest.fixture(scope="session")
def workshop(
    tiny_merge_factory: TinyMergeFactory, tmp_path_factory: pytest.TempPathFactory
) -> Workshop:
    """Tiny bases, adapters and merges as folders (the session's factory cache, step by step)."""
    return Workshop(tiny_merge_factory, tmp_path_factory.mktemp("workshop-scratch"))


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Torch on one thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    tiny models run faster on one thread than on two contended ones."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
