"""Offline and no code execution: nothing is fetched, nothing read is ever run.

A malicious pickle (its ``__reduce__`` creates a marker file) is refused unread by default, and
refused by ``torch.load(weights_only=True)`` with ``--merge-allow-pickle``; the marker never
appears and no ``torch.load`` without ``weights_only=True`` is ever called. A ``config.json`` with
``auto_map`` custom code fails ``merge::security::no_remote_code`` and its code is never imported.
The run is switched offline (the Hugging Face libraries included) and restored afterwards. The
full run under a network guard lives in ``test_readonly.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from support.guard import NetworkGuard, install_family

from harness.errors import CheckpointError
from harness.io.checkpoint import Checkpoint
from harness.run.result import CheckResult


class Payload:
    """Unpickling this calls ``open(marker, "w")``: creates the marker file (code execution)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def save_malicious(path: Path, marker: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A torch.save file holding real tensors and the payload, as a trojaned checkpoint would."""
    torch.save({**tensors, "__payload__": Payload(marker)}, path)


class LoadRecorder:
    """Records every ``torch.load`` call and whether it asked for ``weights_only=True``."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real = torch.load

        def load(f: Any, *args: Any, **kwargs: Any) -> Any:
            self.calls.append((str(f), kwargs.get("weights_only")))
            return real(f, *args, **kwargs)

        monkeypatch.setattr(torch, "load", load)


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "PWNED"


@pytest.fixture
def trojan(tmp_path: Path, tiny_llama, marker: Path) -> Path:
    """A merged folder whose only weights are a malicious pickle (config.json kept)."""
    folder = tmp_path / "trojan"
    folder.mkdir()
    shutil.copy(tiny_llama.merged / "config.json", folder / "config.json")
    save_malicious(folder / "pytorch_model.bin", marker,
                   load_file(tiny_llama.merged / "model.safetensors"))
    return folder


def test_the_payload_is_live(trojan: Path, marker: Path):
    """Control: loading the trojan the unsafe way really runs its code."""
    torch.load(trojan / "pytorch_model.bin", weights_only=False)
    assert marker.exists()
    marker.unlink()


def assert_clean(result: pytest.RunResult) -> None:
    text = result.stdout.str() + result.stderr.str()
    assert "Traceback" not in text and "INTERNALERROR" not in text, text


def test_malicious_pickle_refused_unread_by_default(
    pytester: pytest.Pytester, trojan: Path, marker: Path, tiny_llama, monkeypatch
):
    """Every family runs; the pickle is never handed to any unpickler."""
    loads = LoadRecorder()
    loads.install(monkeypatch)
    result = pytester.runpytest(
        "--merged-model", str(trojan), "--base-model", str(tiny_llama.base),
        "--adapter", str(tiny_llama.adapter), "--merge-examples", "2",
    )
    assert_clean(result)
    assert result.ret == 1
    result.stdout.fnmatch_lines(
        [f"FAIL merge::structure::loads *{trojan}: only pickle checkpoint(s) (pytorch_model.bin);"
         " refusing to unpickle*"]
    )
    assert not marker.exists()
    assert [c for c in loads.calls if str(trojan) in c[0]] == []


def test_malicious_pickle_refused_by_weights_only(
    pytester: pytest.Pytester, trojan: Path, marker: Path, tiny_llama, monkeypatch
):
    """--merge-allow-pickle loads with weights_only=True only, which refuses the payload."""
    loads = LoadRecorder()
    loads.install(monkeypatch)
    result = pytester.runpytest(
        "--merge-allow-pickle", "--merge-checks", "structure,security,weights,hash",
        "--merged-model", str(trojan), "--base-model", str(tiny_llama.base),
        "--adapter", str(tiny_llama.adapter),
    )
    assert_clean(result)
    assert result.ret == 1
    result.stdout.fnmatch_lines(
        [f"FAIL merge::structure::loads *{trojan}/pytorch_model.bin: refused by"
         " torch.load(weights_only=True): Unsupported global: GLOBAL io.open was not an allowed"
         " global by default"]
    )
    assert not marker.exists()
    assert loads.calls and all(weights_only is True for _, weights_only in loads.calls)


def test_malicious_adapter_pickle_never_runs(
    pytester: pytest.Pytester, tmp_path: Path, tiny_llama, marker: Path, monkeypatch
):
    """The same for an adapter saved as adapter_model.bin, with and without the opt-in."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    shutil.copy(tiny_llama.adapter / "adapter_config.json", adapter)
    save_malicious(adapter / "adapter_model.bin", marker,
                   load_file(tiny_llama.adapter / "adapter_model.safetensors"))
    loads = LoadRecorder()
    loads.install(monkeypatch)
    for extra in ((), ("--merge-allow-pickle",)):
        result = pytester.runpytest(
            *extra, "--merge-checks", "structure,weights",
            "--merged-model", str(tiny_llama.merged), "--base-model", str(tiny_llama.base),
            "--adapter", str(adapter),
        )
        assert_clean(result)
        assert result.ret == 1
        result.stdout.fnmatch_lines(["FAIL merge::weights::* *adapter_model.bin*"])
        assert not marker.exists()
    assert all(weights_only is True for _, weights_only in loads.calls)


def test_opted_in_pickle_checkpoint_is_checked(pytester: pytest.Pytester, tmp_path, tiny_llama):
    """A plain (benign) pickle checkpoint with --merge-allow-pickle: read and verified."""
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(tiny_llama.merged / "config.json", folder)
    torch.save(load_file(tiny_llama.merged / "model.safetensors"), folder / "pytorch_model.bin")
    assert Checkpoint.open(folder, allow_pickle=True).is_pickle
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        Checkpoint.open(folder)
    result = pytester.runpytest(
        "--merge-allow-pickle", "--merge-checks", "structure,hash",
        "--merged-model", str(folder), "--base-model", str(tiny_llama.base),
    )
    assert_clean(result)
    assert result.ret == 0, result.stdout.str()
    result.stdout.fnmatch_lines(["PASS merge::structure::loads *opted-in pickle*"])


# ---- custom code -------------------------------------------------------------------------------


@pytest.fixture
def custom_code(tmp_path: Path, tiny_llama, marker: Path) -> Path:
    """A merged folder whose config asks for modelling code that would create the marker."""
    folder = Path(shutil.copytree(tiny_llama.merged, tmp_path / "custom"))
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "modeling_evil.EvilConfig",
                          "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_evil.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class EvilConfig(LlamaConfig):\n    pass\n"
        "class EvilForCausalLM(LlamaForCausalLM):\n    pass\n"
    )
    return folder


def test_auto_map_refused_and_never_imported(pytester, custom_code, marker, tiny_llama):
    """Every family runs (forward passes included); the custom code is never imported."""
    result = pytester.runpytest(
        "--merged-model", str(custom_code), "--base-model", str(tiny_llama.base),
        "--adapter", str(tiny_llama.adapter), "--merge-examples", "2",
    )
    assert_clean(result)
    assert result.ret == 1
    result.stdout.fnmatch_lines(
        [f"FAIL merge::security::no_remote_code *{custom_code}/config.json has auto_map (custom"
         " code (modeling_evil.py)); refusing custom code: pass --merge-trust-remote-code to allow"]
    )
    assert not marker.exists()
    assert "modeling_evil" not in " ".join(sys.modules)


def test_auto_map_allowed_when_trusted(pytester, custom_code, tiny_llama):
    result = pytester.runpytest(
        "--merge-trust-remote-code", "--merge-checks", "security",
        "--merged-model", str(custom_code), "--base-model", str(tiny_llama.base),
    )
    assert_clean(result)
    assert result.ret == 0
    result.stdout.fnmatch_lines(
        ["PASS merge::security::no_remote_code *custom code allowed by --merge-trust-remote-code:*"]
    )


# ---- offline -----------------------------------------------------------------------------------


def test_run_is_offline_and_restored(pytester, tiny_llama, monkeypatch):
    """Inside a run every Hugging Face switch says offline, even over a user's explicit 0."""
    import huggingface_hub.constants as hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    seen: dict[str, object] = {}

    def record(ctx):
        seen.update({k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                                                    "TRANSFORMERS_OFFLINE")})
        seen["hub"] = hub.HF_HUB_OFFLINE
        return CheckResult.passed("recorded")

    install_family(monkeypatch, {"record": record})
    result = pytester.runpytest(
        "--merge-checks", "security", "--merged-model", str(tiny_llama.merged)
    )
    assert result.ret == 0
    assert seen == {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                    "hub": True}
    # Restored when pytest unconfigures: the harness leaves the process as it found it.
    assert os.environ["HF_HUB_OFFLINE"] == "0"
    assert "HF_DATASETS_OFFLINE" not in os.environ
    assert hub.HF_HUB_OFFLINE is False


def test_hub_id_base_is_a_usage_error(pytester, tmp_path, tiny_llama):
    """An adapter naming a hub model as its base: a usage error, not a download."""
    adapter = Path(shutil.copytree(tiny_llama.adapter, tmp_path / "adapter"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "meta-llama/Llama-2-7b-hf"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    network = NetworkGuard()
    with pytest.MonkeyPatch.context() as patch:
        network.install(patch)
        result = pytester.runpytest("--adapter", str(adapter))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["ERROR: *base_model_name_or_path 'meta-llama/Llama-2-7b-hf' is not a local folder (the"
         " harness works offline and never downloads); pass --base-model PATH"]
    )
    assert network.attempts == []


def test_network_guard_is_not_vacuous():
    """Control: the guard really stops a download attempt (and records it)."""
    import urllib.request

    network = NetworkGuard()
    with pytest.MonkeyPatch.context() as patch:
        network.install(patch)
        with pytest.raises(OSError):
            urllib.request.urlopen("http://huggingface.co/api/models", timeout=1)
    assert network.attempts and "huggingface.co" in network.attempts[0]
