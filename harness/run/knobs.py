"""The settings a user may give on the command line and in the gate configuration file.

One table, :data:`KNOBS`, drives the pytest options, the configuration keys, their validation
and the reference tables of the docs. Each knob parses a command-line string and a TOML value
with the same function, so ``--merge-ulp 1`` and ``ulp_tolerance = 1`` mean exactly the same
and fail with the same message. The command line always wins over the file.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from harness.dtypes import from_name
from harness.memory import parse_size
from harness.run.result import Family


class KnobError(ValueError):
    """A value a knob cannot take; the message says what it must be."""


def _number(value: Any) -> float:
    if isinstance(value, bool):
        raise KnobError(f"must be a number, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise KnobError(f"must be a number, got {value!r}") from None
    if not isinstance(value, (int, float)) or math.isnan(value):
        raise KnobError(f"must be a number, got {value!r}")
    return float(value)


def parse_ulp(value: Any) -> float:
    """ULP tolerance ``k`` of the weight oracle: a number >= 0."""
    number = _number(value)
    if not number >= 0 or math.isinf(number):
        raise KnobError(f"must be a finite number >= 0, got {value!r}")
    return number


def parse_examples(value: Any) -> int:
    """Hypothesis examples per behaviour property: an integer >= 1."""
    if isinstance(value, str) and value.strip().lstrip("+").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise KnobError(f"must be an integer, got {value!r}")
    if value < 1:
        raise KnobError(f"must be >= 1, got {value}")
    return value


def parse_timeout(value: Any) -> float:
    """Seconds one check may run: a number > 0."""
    number = _number(value)
    if not number > 0 or math.isinf(number):
        raise KnobError(f"must be a finite number > 0, got {value!r}")
    return number


def parse_device(value: Any) -> str:
    """A torch device name: ``cpu``, ``cuda``, ``cuda:1``, ``mps``, ``xpu``."""
    if not isinstance(value, str) or not value.strip():
        raise KnobError(f"must be a device name such as cpu or cuda:0, got {value!r}")
    text = value.strip()
    kind, _, index = text.partition(":")
    if kind not in ("cpu", "cuda", "mps", "xpu") or (index and not index.isdigit()):
        raise KnobError(f"must be cpu, cuda, cuda:N, mps or xpu, got {value!r}")
    return text


def parse_dtype(value: Any) -> str:
    """A floating dtype for forward passes: ``fp32``, ``bf16``, ``fp16``, ``fp64`` (or ``F32``)."""
    if not isinstance(value, str):
        raise KnobError(f"must be a dtype name such as bf16 or fp32, got {value!r}")
    try:
        code = from_name(value)
    except KeyError as exc:
        raise KnobError(str(exc.args[0])) from None
    if code not in ("F64", "F32", "BF16", "F16"):
        raise KnobError(f"forward passes run in fp64, fp32, bf16 or fp16, not {value!r}")
    return code


def parse_memory(value: Any) -> int:
    """A memory budget: ``6GiB``, ``6G``, ``1.5GB``, ``512MiB`` or a number of bytes."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise KnobError(f"must be a size such as 6GiB or 512MiB, got {value!r}")
    try:
        return parse_size(value)
    except ValueError as exc:
        raise KnobError(str(exc)) from None


def parse_families(value: Any) -> frozenset[Family]:
    """Families of checks: a comma-separated string or a list of names."""
    names = value.split(",") if isinstance(value, str) else value
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
        raise KnobError(f"must be a list of family names, got {value!r}")
    chosen = {n.strip() for n in names if n.strip()}
    known = {f.value for f in Family}
    unknown = sorted(chosen - known)
    if unknown:
        raise KnobError(
            f"unknown famil{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}"
            f" (known: {', '.join(f.value for f in Family)})"
        )
    if not chosen:
        raise KnobError("names no family")
    return frozenset(Family(n) for n in chosen)


@dataclass(frozen=True)
class Knob:
    """One setting: its field in ``Settings``, its flag and config key, parser and default."""

    #: Field of :class:`~harness.run.settings.Settings`.
    name: str
    flag: str
    #: Key in ``[tool.merge-harness]``.
    key: str
    parse: Callable[[Any], Any]
    default: Any
    metavar: str
    help: str

    @property
    def dest(self) -> str:
        """The argparse destination of the flag (``--merge-ulp`` -> ``merge_ulp``)."""
        return self.flag.lstrip("-").replace("-", "_")


KNOBS: tuple[Knob, ...] = (
    Knob("families", "--merge-checks", "checks", parse_families, None, "FAMILIES",
         "families of checks to run, comma-separated (default: every family that applies)"),
    Knob("ulp_tolerance", "--merge-ulp", "ulp_tolerance", parse_ulp, 1.0, "K",
         "allowed rounding error of changed tensors, in ULPs of the stored dtype"),
    Knob("examples", "--merge-examples", "examples", parse_examples, 20, "N",
         "hypothesis examples per behaviour property"),
    Knob("timeout", "--merge-timeout", "timeout", parse_timeout, None, "SECONDS",
         "fail a check that runs longer than this (default: no limit)"),
    Knob("device", "--merge-device", "device", parse_device, "cpu", "DEVICE",
         "device for forward passes and evaluation: cpu, cuda, cuda:1"),
    Knob("dtype", "--merge-dtype", "dtype", parse_dtype, None, "DTYPE",
         "dtype for forward passes (default: chosen for the device and the stored dtype)"),
    Knob("memory", "--merge-memory", "memory", parse_memory, None, "SIZE",
         "memory the forward passes may hold: weights in flight, adapter, cached layers and"
         " activations (default: 2 GiB, or what one streamed layer needs if more, at most 3/4"
         " of the available memory; on an accelerator 3/4 of its free memory)"),
)

#: Knob by field name.
BY_NAME: dict[str, Knob] = {knob.name: knob for knob in KNOBS}
