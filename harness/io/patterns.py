r"""The regexes of an adapter config, compiled and matched as peft does, in bounded time.

peft reads several config values as regular expressions and matches them with ``re`` against
module names: ``target_modules`` and ``exclude_modules`` given as a string (``re.fullmatch``),
the keys of ``rank_pattern`` and ``alpha_pattern`` (``re.match(rf"(.*\.)?({key})$", name)``),
every ``modules_to_save`` entry, ``layers_pattern`` and IA3's ``feedforward_modules``. A
pattern such as ``(a+)+$`` or ``(.|.|.)*Z`` backtracks for hours on a long name, holding the
GIL the whole time; peft itself would hang on it.

Every such pattern is compiled with a one-line cause for what ``re`` refuses (a syntax error,
nesting too deep for its parser, a repeat count above its limit) and every match runs against a
budget of :data:`PATTERN_SECONDS` per adapter:

- on the main thread, with ``re`` itself (peft's engine: the same answers) under a
  :func:`harness.limits.time_limit`, which interrupts it mid-backtrack;
- elsewhere, where no signal can interrupt ``re``, with the ``regex`` package and its
  ``timeout`` (the same syntax and answers for the patterns ``re`` compiles).

:func:`screen` replays peft's own matches of every pattern against the base model's module
names, so that an adapter peft would hang on is refused before peft ever loads it.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterable, Iterator
from typing import Any

from harness.errors import AdapterError
from harness.limits import Expired, Limit, enforceable, time_limit
from harness.text import bounded

#: Seconds all the pattern matching of one adapter may take (ordinary patterns need microseconds
#: per module name: a 70B model's thousand names take milliseconds).
PATTERN_SECONDS = 2.0
#: Deepest nesting of groups accepted (peft's own patterns nest two or three levels). ``re``
#: parses groups recursively: far deeper ones exhaust the interpreter's recursion limit.
MAX_PATTERN_DEPTH = 100
#: Longest pattern quoted in a message.
_SHOWN = 80


def group_depth(pattern: str) -> int:
    """How deeply the groups of ``pattern`` nest (escapes and character classes skipped)."""
    depth = deepest = 0
    escaped = in_class = False
    for char in pattern:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
        elif char == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif char == ")":
            depth = max(depth - 1, 0)
    return deepest


def _shown(pattern: str) -> str:
    return repr(bounded(pattern, _SHOWN))


class PatternMatcher:
    """Compiles and matches one adapter's patterns against a shared time budget."""

    def __init__(self, where: str, seconds: float = PATTERN_SECONDS) -> None:
        self.where = where
        self.seconds = seconds
        self.spent = 0.0
        self._compiled: dict[str, re.Pattern[str]] = {}
        #: The time limit of a :meth:`session` in progress (its matches arm no timer of their own).
        self._session: Limit | None = None
        self._failure: tuple[str, str] | None = None

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Many matches under one timer (arming one per match would cost more than the match)."""
        if self._session is not None or not enforceable():
            yield
            return
        started = time.perf_counter()
        mine: list[Limit | None] = []
        try:
            with time_limit(max(self.seconds - self.spent, 1e-3)) as limit:
                mine.append(limit)
                self._session = limit
                yield
        except Expired as exc:
            if not mine or exc.limit is not mine[0]:
                raise
            pattern, what = self._failure or ("?", "a pattern")
            raise self._too_slow(pattern, what) from None
        finally:
            self._session = None
            self.spent += time.perf_counter() - started

    def compile(self, pattern: str, what: str, template: str = "{}") -> re.Pattern[str]:
        """``template.format(pattern)`` compiled by ``re``; AdapterError saying why it cannot be.

        The message names ``pattern`` as the config writes it, not the template around it.
        """
        full = template.format(pattern)
        cached = self._compiled.get(full)
        if cached is not None:
            return cached
        depth = group_depth(pattern)
        if depth > MAX_PATTERN_DEPTH:
            # refused before re recurses into it (a RecursionError deep in its parser is noisy)
            raise AdapterError(
                f"{self.where}: {what} {_shown(pattern)} nests groups {depth} levels deep (at"
                f" most {MAX_PATTERN_DEPTH})"
            )
        try:
            compiled: re.Pattern[str] = self._bounded(lambda: re.compile(full), pattern, what)
        except re.error as exc:
            raise AdapterError(
                f"{self.where}: {what} {_shown(pattern)} is not a regex: {exc}"
            ) from None
        except RecursionError:
            raise AdapterError(
                f"{self.where}: {what} {_shown(pattern)} is nested too deeply for Python's re"
                f" ({len(pattern)} characters)"
            ) from None
        except OverflowError:
            raise AdapterError(
                f"{self.where}: {what} {_shown(pattern)} has a repeat count of 2**32 - 1 or more,"
                " more than Python's re allows"
            ) from None
        self._compiled[full] = compiled
        return compiled

    def match(self, pattern: str, text: str, what: str, *, template: str = "{}",
              full: bool = False) -> bool:
        """Whether ``template.format(pattern)`` matches ``text`` (``re.match``/``fullmatch``)."""
        compiled = self.compile(pattern, what, template)
        method = compiled.fullmatch if full else compiled.match
        found: bool = self._bounded(lambda: method(text) is not None, pattern, what,
                                    compiled=compiled, text=text, full=full)
        return found

    def _bounded(self, compute: Any, pattern: str, what: str, *,
                 compiled: re.Pattern[str] | None = None, text: str = "",
                 full: bool = False) -> Any:
        """Run ``compute`` within the rest of the budget; AdapterError when it runs out."""
        if self._session is not None:
            self._failure = (pattern, what)  # named if the session's timer rings in here
            return compute()
        left = self.seconds - self.spent
        if left <= 0:
            raise self._too_slow(pattern, what)
        started = time.perf_counter()
        try:
            if enforceable():
                mine: list[Any] = []
                try:
                    with time_limit(left) as limit:
                        mine.append(limit)
                        return compute()
                except Expired as exc:
                    if mine and exc.limit is mine[0]:
                        raise self._too_slow(pattern, what) from None
                    raise
            if compiled is None:
                return compute()
            return _regex_fallback(compiled, text, full, left, lambda: self._too_slow(pattern,
                                                                                      what))
        finally:
            self.spent += time.perf_counter() - started

    def _too_slow(self, pattern: str, what: str) -> AdapterError:
        self.spent = self.seconds
        return AdapterError(
            f"{self.where}: {what} {_shown(pattern)} takes more than {self.seconds:g} s to match"
            " the module names (catastrophic backtracking); refusing it (peft would hang on it)"
        )


def _regex_fallback(compiled: re.Pattern[str], text: str, full: bool, left: float,
                    too_slow: Any) -> bool:
    """Off the main thread: the ``regex`` package, which can stop itself after ``left`` s."""
    import regex

    other = regex.compile(compiled.pattern, compiled.flags)
    try:
        found = (other.fullmatch if full else other.match)(text, timeout=left)
    except TimeoutError:
        raise too_slow() from None
    return found is not None


# ---- peft's uses of patterns --------------------------------------------------------------------

#: ``rank_pattern``/``alpha_pattern`` keys, as peft's ``get_pattern_key`` wraps them.
PATTERN_KEY = r"(.*\.)?({})$"
#: A ``modules_to_save`` entry, as peft's ``check_target_module_exists`` wraps it.
SAVED_MODULE = r"(^|.*\.){}($|\..*)"
#: A ``layers_pattern`` entry, as peft wraps it to find the layer index.
LAYERS = r"(?:^|.*?\.){}\.(?P<idx>\d+)\."


def pattern_key(
    patterns: dict[str, Any], module: str, matcher: PatternMatcher | None = None,
    what: str = "pattern key",
) -> str | None:
    r"""The ``rank_pattern``/``alpha_pattern`` key that applies to ``module``, as peft matches it.

    peft's ``get_pattern_key`` returns the first key (in the pattern's order) for which
    ``re.match(rf"(.*\.)?({key})$", module)`` succeeds: a regex anchored at the end and at a
    module-path boundary.
    """
    bound = matcher if matcher is not None else PatternMatcher("adapter_config.json")
    for key in patterns:
        if bound.match(key, module, what, template=PATTERN_KEY):
            return key
    return None


def module_names(tensor_names: Iterable[str]) -> list[str]:
    """Every module path of a model from its tensor names, as ``named_modules`` lists them."""
    names: set[str] = set()
    for tensor in tensor_names:
        parts = tensor.split(".")[:-1]
        for end in range(1, len(parts) + 1):
            names.add(".".join(parts[:end]))
    return sorted(names)


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, str)]
    return []


def screen(config: dict[str, Any], names: Iterable[str], matcher: PatternMatcher) -> None:
    """Replay peft's matches of every pattern in ``config`` against ``names``, within budget.

    Raises :class:`AdapterError` for a pattern that does not compile or that would take peft
    longer than the budget to match. Which modules match does not matter here: only that
    peft's matching ends.
    """
    with matcher.session():
        _replay(config, list(names), matcher)


def _replay(config: dict[str, Any], modules: list[str], matcher: PatternMatcher) -> None:
    targets = config.get("target_modules")
    for name in modules:
        if isinstance(targets, str):
            matcher.match(targets, name, "target_modules", full=True)
        exclude = config.get("exclude_modules")
        if isinstance(exclude, str):
            matcher.match(exclude, name, "exclude_modules", full=True)
        feedforward = config.get("feedforward_modules")
        if isinstance(feedforward, str):
            matcher.match(feedforward, name, "feedforward_modules", full=True)
        for saved in _strings(config.get("modules_to_save")):
            matcher.match(saved, name, "modules_to_save", template=SAVED_MODULE)
        if config.get("layers_to_transform") is not None:
            for layer in _strings(config.get("layers_pattern")):
                matcher.match(layer, name, "layers_pattern", template=LAYERS)
        for field in ("rank_pattern", "alpha_pattern"):
            patterns = config.get(field)
            if isinstance(patterns, dict):
                for key in patterns:
                    if isinstance(key, str):
                        matcher.match(key, name, f"{field} key", template=PATTERN_KEY)
