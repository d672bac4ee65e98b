"""Regular expressions read from files (PEFT's rank_pattern / alpha_pattern keys, IA3's feedforward_modules), matched
with Python's own `re` (so the answer is exactly PEFT's) only after a bound on the work has been checked.

A backtracking engine is exponential on patterns such as `(a+)+b` or `(a|a)*b` and polynomial of high degree on
`.*.*.*x`. A pattern is accepted when no loop (a repeat of more than one) holds another repeat, a branch, a
lookaround or a back-reference; then the matcher's work on a name of n characters is at most the product, over the
pattern's sequence, of (n + 1) per loop and the branch counts (`steps`). A match whose bound exceeds MAX_STEPS is
refused, naming the pattern, instead of running for minutes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

try:  # Python ≥ 3.11
    from re import _constants as sre, _parser as sre_parse  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as sre  # type: ignore[no-redef]
    import sre_parse  # type: ignore[no-redef]

__all__ = ["MAX_PATTERN_CHARS", "MAX_STEPS", "UnsafePattern", "SafePattern", "compile_safe", "peft_rule",
           "first_match"]

MAX_STEPS = 10_000_000
"""The most backtracking steps (bounded as the module docstring says) one match of a file's pattern may take."""
MAX_PATTERN_CHARS = 1_000
"""The longest pattern read from a file."""

LOOPS = (sre.MAX_REPEAT, sre.MIN_REPEAT, getattr(sre, "POSSESSIVE_REPEAT", sre.MAX_REPEAT))
FORBIDDEN_IN_LOOP = (*LOOPS, sre.BRANCH, sre.ASSERT, sre.ASSERT_NOT, sre.GROUPREF, sre.GROUPREF_EXISTS)


class UnsafePattern(ValueError):
    """A pattern whose matching time has no small bound (nested or ambiguous loops, back-references, too long);
    its message is a predicate ("is not a regular expression (...)") to follow the pattern's name."""


def _children(op, av) -> list:
    """The sub-sequences of one parsed node."""
    if op in LOOPS:
        return [av[2]]
    if op is sre.SUBPATTERN:
        return [av[3]]
    if op is sre.BRANCH:
        return list(av[1])
    if op in (sre.ASSERT, sre.ASSERT_NOT):
        return [av[1]]
    if op is getattr(sre, "ATOMIC_GROUP", None):
        return [av]
    if op is sre.GROUPREF_EXISTS:
        return [x for x in av[1:] if x is not None]
    return []


def _check_loop_body(seq) -> None:
    for op, av in seq:
        if op in FORBIDDEN_IN_LOOP:
            raise UnsafePattern("has a repeated part that holds another repeat, a choice (|), a lookaround or a "
                                 "back-reference")
        for child in _children(op, av):
            _check_loop_body(child)


def _check(seq) -> None:
    for op, av in seq:
        if op in (sre.GROUPREF, sre.GROUPREF_EXISTS):
            raise UnsafePattern("uses a back-reference")
        if op in LOOPS and av[1] > 1:
            _check_loop_body(av[2])
        else:
            for child in _children(op, av):
                _check(child)


def _steps(seq, n: int) -> int:
    """The bound on backtracking steps of `seq` on n characters: loops (n + 1), optional parts 1 + body,
    branches the sum of their bounds, sequences the product."""
    total = 1
    for op, av in seq:
        if op in LOOPS:
            total *= (n + 1) if av[1] > 1 else 1 + _steps(av[2], n)
        elif op is sre.BRANCH:
            total *= sum(_steps(branch, n) for branch in av[1])
        else:
            for child in _children(op, av):
                total *= _steps(child, n)
    return total


@dataclass(frozen=True)
class SafePattern:
    """A compiled pattern that passed the structure check; `steps(n)` bounds its work on a name of n characters."""

    text: str
    regex: re.Pattern
    parsed: object

    def steps(self, n: int) -> int:
        return _steps(self.parsed, n)

    def match(self, name: str) -> bool:
        """re.match(self.text, name) is not None; UnsafePattern when the bound on its work is above MAX_STEPS."""
        if self.steps(len(name)) > MAX_STEPS:
            raise UnsafePattern(f"could take more than {MAX_STEPS:,} steps to match a name of {len(name):,} "
                                "characters")
        return self.regex.match(name) is not None

    def fullmatch(self, name: str) -> bool:
        """re.fullmatch(self.text, name) is not None, under the same bound as `match`."""
        return self.match(name) and self.regex.fullmatch(name) is not None


@lru_cache(maxsize=1024)
def compile_safe(text: str) -> SafePattern:
    """The SafePattern of `text`; UnsafePattern (with the reason) for a pattern that is too long, does not compile,
    or has no small bound on its matching time."""
    if len(text) > MAX_PATTERN_CHARS:
        raise UnsafePattern(f"is {len(text):,} characters long (at most {MAX_PATTERN_CHARS:,})")
    try:
        regex = re.compile(text)
        parsed = sre_parse.parse(text)
    except (re.error, RecursionError, OverflowError) as exc:
        raise UnsafePattern(f"is not a regular expression ({getattr(exc, 'msg', exc)})") from None
    _check(parsed)
    return SafePattern(text, regex, parsed)


def peft_rule(key: str) -> SafePattern:
    """PEFT's pattern for a rank_pattern / alpha_pattern key: `(.*\\.)?(key)$`, matched with re.match."""
    return compile_safe(rf"(.*\.)?({key})$")


def first_match(patterns: dict, module: str, default):
    """PEFT's rule (peft.utils.other.get_pattern_key): the value of the first key in dict order whose
    `re.match(rf"(.*\\.)?({key})$", module)` succeeds, else `default`. UnsafePattern names the key that cannot be
    matched within MAX_STEPS."""
    for key, value in (patterns or {}).items():
        try:
            hit = peft_rule(key).match(module)
        except UnsafePattern as exc:
            raise UnsafePattern(f"pattern {key!r} {exc}") from None
        if hit:
            return value
    return default
