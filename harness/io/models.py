"""Load transformers models as a user would: the task's ``AutoModelFor*`` class, offline.

Every load passes ``local_files_only=True`` and the user's ``trust_remote_code`` (off by
default); a ``config.json`` with an ``auto_map`` (custom modelling code) is refused unless the
user allows remote code, with a one-line cause, before transformers sees it. Loading is quiet:
progress bars and load reports of transformers and peft are silenced while a model loads.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.errors import CheckpointError, HarnessError, one_line
from harness.io.adapter import CONFIG_FILE, Adapter
from harness.io.checkpoint import Checkpoint
from harness.io.code import custom_code
from harness.io.files import check_folder, exists, read_json
from harness.io.patterns import PatternMatcher, module_names, screen
from harness.text import bounded

if TYPE_CHECKING:
    import torch

#: peft ``task_type`` -> the transformers auto class that loads such a model.
AUTO_CLASSES: dict[str, str] = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
    "MASKED_LM": "AutoModelForMaskedLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
}
#: Class-name endings in ``config.json``'s ``architectures`` -> task, for a merge without an
#: adapter config (first match wins).
_ARCHITECTURE_TASKS = (
    ("ForCausalLM", "CAUSAL_LM"),
    ("LMHeadModel", "CAUSAL_LM"),
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
    ("ForMaskedLM", "MASKED_LM"),
    ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
)
#: config keys of a classification head that the base must be loaded with to fit the adapter.
HEAD_KEYS = ("num_labels", "id2label", "label2id", "pad_token_id", "problem_type")


def task_of(adapter_config: dict[str, Any] | None, model_config: dict[str, Any] | None) -> str:
    """The model's task: the adapter's ``task_type`` when set, else from ``architectures``.

    A ``*ForConditionalGeneration`` model is a sequence-to-sequence LM when its config is an
    encoder-decoder (T5, BART), else a decoder with inputs beside text (vision-language models)
    whose text path is a causal LM.
    """
    task = (adapter_config or {}).get("task_type")
    if isinstance(task, str) and task:
        return task.upper()
    encoder_decoder = bool((model_config or {}).get("is_encoder_decoder"))
    for name in (model_config or {}).get("architectures") or []:
        for suffix, found in _ARCHITECTURE_TASKS:
            if str(name).endswith(suffix):
                if found == "SEQ_2_SEQ_LM" and not encoder_decoder:
                    return "CAUSAL_LM"
                return found
    return (
        "FEATURE_EXTRACTION" if model_config and model_config.get("architectures") else "CAUSAL_LM"
    )


def auto_class(task: str) -> Any:
    """The transformers auto class for ``task``; HarnessError for a task the harness cannot run."""
    import transformers

    name = AUTO_CLASSES.get(task)
    if name is None:
        raise HarnessError(
            f"task {task!r} is not supported by the behaviour checks (supported:"
            f" {', '.join(AUTO_CLASSES)})"
        )
    return getattr(transformers, name)


@contextlib.contextmanager
def quiet() -> Iterator[list[str]]:
    """Silence transformers' progress bars and load reports (restored afterwards).

    What transformers logs meanwhile is kept, not printed, and yielded: its load report (which
    weights mismatched, which were missing) is the cause a bare "see the report above"
    exception leaves out.
    """
    import logging

    import transformers.utils.logging as hf_logging

    kept: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            kept.append(record.getMessage())

    # transformers' library root logger: its handlers print, its level filters
    library = logging.getLogger("transformers")
    handlers, propagate = list(library.handlers), library.propagate
    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    keeper = Keep(logging.WARNING)
    for handler in handlers:
        library.removeHandler(handler)
    library.addHandler(keeper)
    library.propagate = False
    hf_logging.set_verbosity_warning()  # type: ignore[no-untyped-call]
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield kept
    finally:
        library.removeHandler(keeper)
        for handler in handlers:
            library.addHandler(handler)
        library.propagate = propagate
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]


def load_report(kept: list[str]) -> str:
    """The rows of transformers' load report that explain a failure (mismatched, missing...)."""
    rows = []
    for message in kept:
        for line in message.splitlines():
            cells = [c.strip() for c in line.split("|")]
            if len(cells) >= 3 and cells[1] in ("MISMATCH", "MISSING", "UNEXPECTED"):
                reason = f" ({cells[2]})" if cells[2] else ""
                rows.append(f"{cells[0]}: {cells[1].lower()}{reason}")
    return "; ".join(rows)


def read_config(folder: Path) -> dict[str, Any]:
    """``config.json`` of a model folder; HarnessError when absent or malformed."""
    path = folder / "config.json"
    if not exists(path):
        raise CheckpointError(f"{folder}: no config.json (transformers cannot load it)")
    data = read_json(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return data


def refuse_remote_code(folder: Path, trust_remote_code: bool) -> None:
    """Refuse a folder a loader must not be handed, or one that needs unallowed custom code.

    Every entry must pass :func:`~harness.io.files.check_folder` (no symlink out, no pipe), and
    no configuration file may name custom code (:mod:`harness.io.code`) unless allowed.
    """
    check_folder(folder)
    found = custom_code(folder)
    if found and not trust_remote_code:
        entry = found[0]
        raise HarnessError(
            f"{entry.file}: {' and '.join(entry.keys)} asks for custom code; refusing to run it"
            " (pass --merge-trust-remote-code to allow)"
        )


def refuse_hostile_patterns(adapter: Path, base: Path) -> None:
    """Replay peft's regex matches of ``adapter``'s config on ``base``'s module names, bounded.

    peft matches ``target_modules``, ``rank_pattern`` and the other patterns with ``re`` and
    would hang on a catastrophic one while holding the GIL; :func:`harness.io.patterns.screen`
    runs the same matches first within :data:`~harness.io.patterns.PATTERN_SECONDS` and refuses
    the adapter with a one-line cause when they do not end.
    """
    config = read_json(adapter / CONFIG_FILE)
    if not isinstance(config, dict):
        raise CheckpointError(f"{adapter / CONFIG_FILE}: not a JSON object")
    try:
        names = list(Checkpoint.open(base).tensors)
    except CheckpointError:  # a pickle-only base: the adapter's own module names
        names = list(Adapter.open(adapter, allow_pickle=False).tensors)
    screen(config, module_names(names), PatternMatcher(CONFIG_FILE))


def resolve_device(name: str) -> torch.device:
    """A torch device from ``--merge-device``; HarnessError when unusable here."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise HarnessError(f"--merge-device {name!r}: not a torch device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HarnessError(f"--merge-device {name}: CUDA is not available on this machine")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise HarnessError(f"--merge-device {name}: MPS is not available on this machine")
    return device


def load_pretrained(
    folder: Path,
    task: str,
    *,
    dtype: torch.dtype | str = "auto",
    device: str = "cpu",
    trust_remote_code: bool = False,
    head: dict[str, Any] | None = None,
    stored: torch.dtype | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Load ``folder`` with the task's auto class; return the model (eval mode) and load info.

    The load info has ``missing_keys`` (weights transformers initialised randomly because the
    checkpoint lacks them) and ``unexpected_keys`` (stored weights the class does not use).
    ``head`` overrides config keys of a classification head (labels, pad id). With ``stored``
    (the dtype the checkpoint holds), the model loads in that dtype and is cast to ``dtype``
    afterwards: the same values when ``dtype`` is wider, and faster than transformers'
    converting load (a 1.1B bf16 Llama: 0.1 s memory-mapped + 4.9 s cast, against 14.3 s).
    """
    refuse_remote_code(folder, trust_remote_code)
    cls = auto_class(task)
    target = resolve_device(device)
    try:
        with quiet() as kept:
            model, info = cls.from_pretrained(
                folder,
                dtype=dtype if stored is None else stored,
                local_files_only=True,
                trust_remote_code=trust_remote_code,
                output_loading_info=True,
                **(head or {}),
            )
    except HarnessError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
        report = load_report(kept)
        if report:
            raise HarnessError(
                f"{folder}: transformers cannot load it as {cls.__name__}: {bounded(report)}"
            ) from None
        raise HarnessError(
            f"{folder}: transformers cannot load it as {cls.__name__}: {one_line(exc, whole=True)}"
        ) from None
    if stored is not None and dtype != stored:
        model.to(dtype)
    model.to(target)
    model.eval()
    return model, {k: sorted(v) if isinstance(v, (set, list)) else v for k, v in info.items()}


def load_peft(
    base: Path,
    adapter: Path,
    task: str,
    *,
    dtype: torch.dtype | str = "auto",
    device: str = "cpu",
    trust_remote_code: bool = False,
    head: dict[str, Any] | None = None,
    stored: torch.dtype | None = None,
) -> Any:
    """The unmerged adapter model: ``PeftModel.from_pretrained`` on the base, in eval mode.

    peft keeps half-precision adapter weights in float32 (``autocast_adapter_dtype``), exactly
    as a user's inference with the unmerged adapter runs. ``stored`` is the base's own dtype
    (see :func:`load_pretrained`).
    """
    from peft import PeftModel

    refuse_remote_code(adapter, trust_remote_code)
    refuse_hostile_patterns(adapter, base)
    model, _ = load_pretrained(
        base,
        task,
        dtype=dtype,
        device=device,
        trust_remote_code=trust_remote_code,
        head=head,
        stored=stored,
    )
    try:
        with quiet():
            peft_model = PeftModel.from_pretrained(model, adapter, is_trainable=False)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise HarnessError(
            f"{adapter}: peft cannot apply it to {base}: {one_line(exc, whole=True)}"
        ) from None
    peft_model.to(resolve_device(device))
    peft_model.eval()
    return peft_model
