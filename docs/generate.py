"""Render the reference sections of the docs from the code, between marker comments.

    python docs/generate.py           # rewrite every generated section in README.md and docs/
    python docs/generate.py --check   # change nothing; exit 1 naming the pages that are stale

A page marks a generated section with two HTML comments (invisible once rendered)::

    <!-- generated: options -->
    ...whatever the renderer returns...
    <!-- end generated -->

Each name maps to a renderer in :data:`SECTIONS`. To add a section (a table of bad-input cases,
say), write a function that returns markdown, register it with ``@section("name")`` and put the
two markers in a page: ``tests/test_docs.py`` then fails whenever the page and the code disagree.
The renderers read the tables the code itself runs on (the plugin's options, ``KNOBS``, the
configuration keys, the check registry, ``action.yml``), so a new option or check appears here
by running this script, never by typing it.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# The generator documents the harness of this checkout, whatever is installed.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402  (PyYAML: a dependency of mkdocs and of transformers)

from harness.architectures import CONFIG_ALLOWED, LEFTOVER_MARKERS  # noqa: E402
from harness.checks import FAMILIES, build_suite  # noqa: E402
from harness.cli import COMMANDS  # noqa: E402
from harness.deltas import REGISTRY  # noqa: E402
from harness.oracle.diagnosis import SUSPECTS  # noqa: E402
from harness.run.config import (  # noqa: E402
    BENCHMARK_KEYS,
    KEYS,
    PERPLEXITY_KEYS,
    THRESHOLD_KEYS,
    BenchmarkConfig,
    GateConfig,
    PerplexityConfig,
    Threshold,
)
from harness.run.knobs import KNOBS, Knob  # noqa: E402
from harness.run.result import Family  # noqa: E402
from harness.run.settings import Settings  # noqa: E402

#: The pages that may hold generated sections.
PAGES: tuple[Path, ...] = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))
BEGIN = re.compile(r"^<!-- generated: ([a-z0-9-]+) -->$")
END = "<!-- end generated -->"

Renderer = Callable[[], str]
#: section name -> renderer; the registry the markers refer to.
SECTIONS: dict[str, Renderer] = {}


def section(name: str) -> Callable[[Renderer], Renderer]:
    """Register ``renderer`` as the generated section ``name``."""

    def register(renderer: Renderer) -> Renderer:
        if name in SECTIONS:
            raise ValueError(f"section {name!r} registered twice")
        SECTIONS[name] = renderer
        return renderer

    return register


# ----------------------------------------------------------------------------- markdown


def code(text: str) -> str:
    """``text`` as an inline code span (longer fences when it holds backticks)."""
    fence = "``" if "`" in text else "`"
    pad = " " if "`" in text else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def prose(text: str) -> str:
    """``text`` with ``<`` escaped outside code spans (it would open an HTML tag)."""
    parts = re.split(r"(`+[^`]*`+)", text)
    return "".join(
        p if p.startswith("`") else p.replace("<", "&lt;") for p in parts
    )


def cell(text: str) -> str:
    """One table cell: a single line, pipes escaped, prose safe from HTML."""
    return prose(" ".join(text.split())).replace("|", "\\|")


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def from_rst(text: str) -> str:
    """Docstring markup as markdown: ``:func:`~a.b``` -> `b`, double backticks -> single."""
    text = re.sub(r":[a-z]+:`~[\w.]*?\.?(\w+)`", r"`\1`", text)
    text = re.sub(r":[a-z]+:`([^`]+)`", r"`\1`", text)
    return text.replace("``", "`")


def docstring(obj: object) -> str:
    """The cleaned docstring of ``obj`` as markdown paragraphs."""
    return from_rst(inspect.cleandoc(obj.__doc__ or ""))


def first_line(obj: object) -> str:
    """The first line of a docstring, as markdown."""
    return docstring(obj).split("\n", 1)[0]


def value(default: Any) -> str:
    """A default value as the user would type it."""
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, float):
        return f"{default:g}"
    return str(default)


# ----------------------------------------------------------------------------- options


class RecordingParser:
    """Stands in for pytest's parser: records what the plugin's ``pytest_addoption`` adds."""

    def __init__(self) -> None:
        self.options: list[tuple[tuple[str, ...], dict[str, Any]]] = []
        self.ini: list[tuple[str, str, str]] = []

    def getgroup(self, name: str, description: str = "", after: str | None = None) -> Any:
        """Every option goes to one list, whatever its group."""
        return self

    def addoption(self, *names: str, **attrs: Any) -> None:
        """Record a command-line option."""
        self.options.append((names, attrs))

    def addini(self, name: str, help: str, type: Any = None, default: Any = None) -> None:
        """Record an ini key."""
        self.ini.append((name, help, type or "string"))


def registered() -> RecordingParser:
    """The options and ini keys the plugin registers, exactly as pytest would receive them."""
    from harness.plugin import pytest_addoption

    parser = RecordingParser()
    pytest_addoption(parser)  # type: ignore[arg-type]
    return parser


def _knob(dest: str | None) -> Knob | None:
    return next((k for k in KNOBS if k.dest == dest), None)


def _accepts(knob: Knob) -> str:
    """What a knob's value may be: its parser's docstring after the colon."""
    return first_line(knob.parse).split(": ", 1)[-1].rstrip(".")


@section("options")
def options_table() -> str:
    """Every command-line option of the plugin."""
    rows = []
    for names, attrs in registered().options:
        flag = ", ".join(names)
        metavar = attrs.get("metavar")
        usage = f"{flag} {metavar}" if metavar and attrs.get("action") is None else flag
        knob = _knob(attrs.get("dest"))
        if knob is not None:
            default = "—" if knob.default is None else code(value(knob.default))
            meaning = f"{knob.help}. Value: {_accepts(knob)}."
            key = code(knob.key)
        else:
            default = "off" if attrs.get("action") == "store_true" else "—"
            meaning = str(attrs.get("help", ""))
            key = "—"
        rows.append((code(usage), default, key, code(str(attrs.get("dest"))), meaning))
    return table(("option", "default", "config key", "`getoption()` name", "meaning"), rows)


@section("ini")
def ini_table() -> str:
    """Every ini key of the plugin."""
    rows = [(code(name), type_, help_) for name, help_, type_ in registered().ini]
    return table(("ini key", "type", "meaning"), rows)


# ----------------------------------------------------------------------------- configuration


@section("config-keys")
def config_keys_table() -> str:
    """Top-level keys of ``[tool.merge-harness]``."""
    knobs = {k.key: k for k in KNOBS}
    rows = []
    for key, text in KEYS.items():
        knob = knobs.get(key)
        if knob is None:
            rows.append((code(key), "—", text))
            continue
        default = "" if knob.default is None else f" (default {value(knob.default)})"
        rows.append(
            (code(key), code(knob.flag), f"{knob.help}{default}. Value: {_accepts(knob)}.")
        )
    return table(("key", "command line (wins)", "meaning"), rows)


def _keys(keys: dict[str, str], prefix: str) -> str:
    return table(("key", "meaning"), [(code(prefix + k), text) for k, text in keys.items()])


@section("config-benchmark")
def benchmark_keys_table() -> str:
    """Keys of ``[tool.merge-harness.benchmark]``."""
    return _keys(BENCHMARK_KEYS, "")


@section("config-thresholds")
def threshold_keys_table() -> str:
    """Keys of one metric's thresholds."""
    return _keys(THRESHOLD_KEYS, "")


@section("config-perplexity")
def perplexity_keys_table() -> str:
    """Keys of ``[tool.merge-harness.perplexity]``."""
    return _keys(PERPLEXITY_KEYS, "")


# ----------------------------------------------------------------------------- checks

#: What each family needs and catches. Prose the code does not hold; the generator refuses to
#: run when a family is missing here, so a new family cannot go undocumented.
FAMILY_NOTES: dict[Family, tuple[str, str]] = {
    Family.STRUCTURE: (
        "merged; base for the comparisons",
        "unreadable or hostile files, stale shards and index, adapter leftovers, NaN/Inf,"
        " changed names/shapes/dtypes/parameter count/size, config changes outside the"
        " allow-list, tied embeddings that disagree with the weights",
    ),
    Family.SECURITY: (
        "merged",
        "custom code (`auto_map`, `custom_pipelines`, shipped `.py` files) unless allowed",
    ),
    Family.WEIGHTS: (
        "merged, base, adapter",
        "an adapter not applied, wrong scale (rsLoRA, patterns), transposed or sign-flipped"
        " deltas, a skipped or wrong layer, a different adapter, dropped DoRA magnitudes,"
        " unwritten `modules_to_save`, any stray change to an untouched tensor",
    ),
    Family.HASH: (
        "merged, base",
        "a merge whose content digest equals the base's (adapter never applied, or all zeros)",
    ),
    Family.BEHAVIOUR: (
        "merged (base and adapter for the comparisons); the `models` extra",
        "heads left random, fp16 overflow, configs that re-tie embeddings, behaviour changes"
        " beyond rounding noise on generated inputs, diverging greedy decoding, changed"
        " tokenizer or generation files",
    ),
    Family.LOCK: (
        "a lock file (present, named, or `--update-merge-lock`)",
        "a merged, base or adapter digest that differs from the approved one",
    ),
    Family.BENCHMARK: (
        "a `benchmark` or `perplexity` table in the configuration; the `eval` extra for lm-eval",
        "metrics below their floor, a drop against the base, a difference from the unmerged"
        " adapter model, with sample-size-aware statistics",
    ),
    Family.EXPORT: (
        "merged, one `--export FILE.gguf` per export (base for provenance); the `gguf` extra",
        "an export converted from the base or a twice or partly merged model, weights that"
        " differ from the merged ones (the first differing block), a tokenizer, chat template or"
        " architecture parameter that did not come along, a truncated or hostile file",
    ),
}

#: Inputs a check needs, where they differ from its family's first need.
CHECK_NEEDS: dict[str, str] = {
    "merge::structure::loads": "merged",
    "merge::structure::index_valid": "merged",
    "merge::structure::no_adapter_leftovers": "merged",
    "merge::structure::all_finite": "merged",
    "merge::structure::tied_embeddings": "merged",
    "merge::behaviour::loads": "merged",
    "merge::behaviour::sidecars": "merged, base or adapter",
    "merge::benchmark::perplexity": "merged, adapter (base for `max_base_ratio`); a `perplexity`"
    " table",
    "merge::benchmark::<task>.<metric>": "merged (base for `max_drop`, adapter for"
    " `max_adapter_diff`); a `benchmark` table; the `eval` extra",
}
_FAMILY_NEEDS: dict[Family, str] = {
    Family.STRUCTURE: "merged, base",
    Family.SECURITY: "merged",
    Family.WEIGHTS: "merged, base, adapter",
    Family.HASH: "merged, base",
    Family.BEHAVIOUR: "merged, base, adapter",
    Family.LOCK: "merged; a lock file",
    Family.BENCHMARK: "merged",
    Family.EXPORT: "merged, an export",
}


def every_check_settings() -> Settings:
    """Settings under which every family contributes every check it can.

    All inputs given (one export, ``<export>.gguf``), every family selected, the lock check
    asked for (``update_lock``), and a configuration with a perplexity gate and one benchmark
    metric named ``<task>.<metric>``.
    """
    benchmark = BenchmarkConfig(
        include_path=(Path("tasks"),),
        tasks={"<task>": {"<metric>": Threshold()}},
        models=("merged",),
    )
    config = GateConfig(benchmark=benchmark, perplexity=PerplexityConfig(text=Path("text.txt")))
    return Settings(
        merged=Path("merged"),
        base=Path("base"),
        adapter=Path("adapter"),
        exports=(Path("<export>.gguf"),),
        families=None,
        update_lock=True,
        config=config,
    )


def every_check() -> list[Any]:
    """The full suite; refuses to document a family that contributed nothing."""
    suite = build_suite(every_check_settings())
    silent = [f.value for f in FAMILIES if not any(c.family is f for c in suite)]
    if silent:
        raise SystemExit(
            f"docs/generate.py: famil(ies) {', '.join(silent)} contributed no check: teach"
            " every_check_settings() what they need"
        )
    undocumented = [f.value for f in Family if f not in FAMILY_NOTES]
    if undocumented:
        raise SystemExit(
            f"docs/generate.py: describe famil(ies) {', '.join(undocumented)} in FAMILY_NOTES"
        )
    return suite


@section("bad-inputs")
def bad_inputs_table() -> str:
    """Every bad-input case of the test suite: what the user sees for it."""
    tests = str(ROOT / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from support.badinput import render_case_table

    return render_case_table()


@section("families")
def families_table() -> str:
    """One row per family: marker, needs, what it catches, number of checks."""
    suite = every_check()
    rows = []
    for family in FAMILIES:
        needs, catches = FAMILY_NOTES[family]
        count = sum(1 for c in suite if c.family is family)
        rows.append((code(family.value), needs, catches, str(count)))
    return table(("family (`-m` marker)", "needs", "catches", "checks"), rows)


@section("checks")
def checks_table() -> str:
    """Every check id the suite can hold, in run order."""
    rows = [
        (code(c.id), CHECK_NEEDS.get(c.id, _FAMILY_NEEDS[c.family]), c.description)
        for c in every_check()
    ]
    return table(("check", "needs", "passes when"), rows)


@section("config-allowed")
def config_allowed() -> str:
    """The ``config.json`` keys a merge may change without ``config_allow``."""
    return ", ".join(code(k) for k in sorted(CONFIG_ALLOWED))


@section("leftover-markers")
def leftover_markers() -> str:
    """The tensor-name fragments that only an unmerged PEFT model has."""
    return ", ".join(code(m) for m in LEFTOVER_MARKERS)


# ----------------------------------------------------------------------------- weights


@section("adapter-types")
def adapter_types() -> str:
    """The ``peft_type`` values the weight oracle and the merger verify."""
    return "Verifiable adapter types: " + ", ".join(code(t) for t in sorted(REGISTRY)) + "."


@section("suspects")
def suspects_list() -> str:
    """The diagnosis registry, in the order suspects are tried."""
    return "\n".join(f"{i}. {s.name}" for i, s in enumerate(SUSPECTS, start=1))


# ----------------------------------------------------------------------------- command line


def _usage(parser: argparse.ArgumentParser, name: str) -> str:
    parts = [f"merge-harness {name}"]
    for action in parser._actions:  # argparse keeps no public list of its arguments
        if isinstance(action, argparse._HelpAction):
            continue
        meta = action.metavar or action.dest.upper()
        if not action.option_strings:
            parts.append({"+": f"{meta} [{meta} ...]", "*": f"[{meta} ...]"}.get(
                str(action.nargs), str(meta)))
        elif action.nargs == 0:
            parts.append(f"[{action.option_strings[0]}]")
        else:
            parts.append(f"[{action.option_strings[0]} {meta}]")
    return " ".join(parts)


@section("cli")
def cli_reference() -> str:
    """Every ``merge-harness`` subcommand: usage and arguments."""
    blocks = []
    for name, command in COMMANDS.items():
        parser = argparse.ArgumentParser(prog=f"merge-harness {name}")
        command.add_arguments(parser)
        rows = []
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            label = ", ".join(action.option_strings) or str(action.metavar or action.dest)
            if action.option_strings and action.nargs != 0:
                label += f" {action.metavar or action.dest.upper()}"
            rows.append((code(label), str(action.help or "")))
        blocks.append(
            f"### `merge-harness {name}`\n\n{command.help[:1].upper()}{command.help[1:]}.\n\n"
            f"```text\n{_usage(parser, name)}\n```\n\n{table(('argument', 'meaning'), rows)}"
        )
    return "\n\n".join(blocks)


# ----------------------------------------------------------------------------- GitHub Action


def _action() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "action.yml").read_text(encoding="utf-8"))
    return data


@section("action-inputs")
def action_inputs() -> str:
    """The composite action's inputs, from ``action.yml``."""
    rows = []
    for name, spec in _action()["inputs"].items():
        default = str(spec.get("default", ""))
        rows.append((code(name), code(default) if default else "(empty)", spec["description"]))
    return table(("input", "default", "meaning"), rows)


@section("action-outputs")
def action_outputs() -> str:
    """The composite action's outputs, from ``action.yml``."""
    rows = [(code(n), spec["description"]) for n, spec in _action()["outputs"].items()]
    return table(("output", "meaning"), rows)


# ----------------------------------------------------------------------------- Python API


def _signature(function: Callable[..., Any]) -> str:
    """``name(*, a, b=1)`` without annotations (they are strings under postponed evaluation)."""
    parts: list[str] = []
    star = False
    for p in inspect.signature(function).parameters.values():
        if p.kind is p.KEYWORD_ONLY and not star:
            parts.append("*")
            star = True
        text = p.name if p.default is p.empty else f"{p.name}={p.default!r}"
        if p.kind is p.VAR_POSITIONAL:
            text, star = f"*{p.name}", True
        elif p.kind is p.VAR_KEYWORD:
            text = f"**{p.name}"
        parts.append(text)
    return f"{function.__name__}({', '.join(parts)})"


@section("strategies")
def strategies_reference() -> str:
    """Every public function of ``harness.strategies``: signature and docstring."""
    import harness.strategies as strategies

    functions, constants = [], []
    for name in strategies.__all__:
        obj = getattr(strategies, name)
        if inspect.isfunction(obj):
            functions.append(
                f"### `{name}`\n\n```python\n{_signature(obj)}\n```\n\n{docstring(obj)}"
            )
        else:
            constants.append(f"- `{name}` = {code(repr(obj))}")
    return "\n\n".join(functions + (["Constants:\n\n" + "\n".join(constants)] if constants else []))


def _members(cls: type) -> list[tuple[str, str]]:
    """Public fields, properties and methods of a class, with their docstrings' first lines."""
    rows: list[tuple[str, str]] = []
    fields = getattr(cls, "__dataclass_fields__", {})
    for name in fields:
        if not name.startswith("_"):
            rows.append((code(name), "field"))
    for name, member in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(member, property):
            rows.append((code(name), f"property: {first_line(member)}"))
        elif inspect.isfunction(member):
            rows.append((code(_signature(member).replace("(self, ", "(").replace("(self)", "()")),
                         first_line(member)))
    return rows


@section("merge-case")
def merge_case_reference() -> str:
    """``harness.case.MergeCase``: its fields, properties and methods."""
    from harness.case import MergeCase

    head = f"```python\nfrom harness.case import MergeCase\n```\n\n{docstring(MergeCase)}"
    return head + "\n\n" + table(("member", "what it is"), _members(MergeCase))


@section("merger")
def merger_reference() -> str:
    """``harness.merger.merge_checkpoint``: signature and docstring."""
    from harness.merger import merge_checkpoint

    return (
        f"```python\nfrom harness.merger import merge_checkpoint\n\n"
        f"{_signature(merge_checkpoint)}\n```\n\n{docstring(merge_checkpoint)}"
    )


@section("fixtures")
def fixtures_reference() -> str:
    """The fixtures the plugin provides, with their docstrings."""
    import harness.plugin.fixtures as fixtures

    return "\n\n".join(
        f"### `{name}`\n\n{docstring(getattr(fixtures, name))}" for name in fixtures.__all__
    )


# ----------------------------------------------------------------------------- pages


class MarkerError(ValueError):
    """A page whose markers are unbalanced or name no known section."""


def fenced_lines(lines: Sequence[str]) -> set[int]:
    """Indices of the lines that open, close or lie inside a fenced code block."""
    inside: set[int] = set()
    fence: str | None = None
    for index, line in enumerate(lines):
        opener = re.match(r"^\s*(`{3,}|~{3,})", line)
        if fence is not None or opener is not None:
            inside.add(index)
        if opener is None:
            continue
        if fence is None:
            fence = opener.group(1)
        elif opener.group(1).startswith(fence):
            fence = None
    return inside


def render(text: str, where: str = "page") -> str:
    """``text`` with every generated section rendered afresh.

    Markers inside fenced code blocks are examples (like the one in this module's docstring),
    not sections.
    """
    lines = text.split("\n")
    fenced = fenced_lines(lines)
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        out.append(line)
        match = None if i in fenced else BEGIN.match(line)
        i += 1
        if match is None:
            if line == END and i - 1 not in fenced:
                raise MarkerError(f"{where}:{i}: {END} without a start marker")
            continue
        name = match.group(1)
        if name not in SECTIONS:
            known = ", ".join(SECTIONS)
            raise MarkerError(f"{where}:{i}: unknown section {name!r} (known: {known})")
        end = next((j for j in range(i, len(lines)) if lines[j] == END), None)
        if end is None:
            raise MarkerError(f"{where}:{i}: section {name!r} has no {END}")
        out += ["", SECTIONS[name]().rstrip("\n"), "", END]
        i = end + 1
    return "\n".join(out)


def used_sections(text: str) -> list[str]:
    """The section names a page's markers refer to (outside code blocks)."""
    lines = text.split("\n")
    fenced = fenced_lines(lines)
    return [
        m.group(1)
        for i, line in enumerate(lines)
        if i not in fenced and (m := BEGIN.match(line)) is not None
    ]


def stale_pages(pages: Iterable[Path] = PAGES) -> dict[Path, str]:
    """Pages whose generated sections differ from what the code renders -> fresh text."""
    stale: dict[Path, str] = {}
    for page in pages:
        text = page.read_text(encoding="utf-8")
        fresh = render(text, str(page.relative_to(ROOT)))
        if fresh != text:
            stale[page] = fresh
    return stale


def main(argv: Sequence[str] | None = None) -> int:
    """Rewrite the stale pages, or with ``--check`` only report them (exit 1)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="report stale pages, change none")
    args = parser.parse_args(argv)
    stale = stale_pages()
    for page, fresh in stale.items():
        name = page.relative_to(ROOT)
        if args.check:
            print(f"stale: {name} (run python docs/generate.py)")
        else:
            page.write_text(fresh, encoding="utf-8")
            print(f"wrote {name}")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    raise SystemExit(main())
