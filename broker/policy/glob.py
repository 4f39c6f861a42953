"""Anchored globs for subjects, models and datasets.

The syntax is deliberately tiny:

* ``*`` matches any run of characters except ``/`` and ``:`` (possibly empty);
* ``**`` matches any run of characters, ``/`` and ``:`` included (possibly empty);
* ``?`` matches exactly one character except ``/`` and ``:``;
* no wildcard ever matches a control character (U+0000-U+001F, U+007F-U+009F);
* every other character matches itself. There are no character classes, braces or escapes,
  and regex metacharacters are literal.

A glob always matches the *whole* value, never a part of it.

NOTE: ``*`` stops at ``/`` and ``:`` because those separate the fields of workload subjects
(``repo:acme/evals:ref:refs/heads/main``, ``system:serviceaccount:training:trainer``). If ``*``
crossed them, ``repo:acme/*:ref:refs/heads/main`` would also match
``repo:acme/x:environment:prod:ref:refs/heads/main`` — a subject an attacker can shape by naming
a repository or environment. Crossing separators has to be asked for explicitly with ``**``.

NOTE: no wildcard matches a control character either: a newline, NUL or DEL in a subject (or a
model or dataset name) is never what a pattern's author meant, and such a value would read
differently in logs and terminals than it compares (``evals\nrepo:acme/prod`` shown on two
lines). A control character in the pattern itself still matches itself.
"""

from __future__ import annotations

import re

_CONTROL = r"\x00-\x1f\x7f-\x9f"
_STAR = f"[^/:{_CONTROL}]*"
_DOUBLE_STAR = f"[^{_CONTROL}]*"
_QUESTION = f"[^/:{_CONTROL}]"


def is_glob(pattern: str) -> bool:
    """Whether ``pattern`` contains a wildcard (``*`` or ``?``) rather than being a literal."""
    return "*" in pattern or "?" in pattern


def compile_glob(pattern: str) -> re.Pattern[str]:
    """Compile ``pattern`` to a regular expression; use it with ``fullmatch``.

    Never raises for any input string: every character without a glob meaning is escaped.
    """
    parts: list[str] = []
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**", i):
            parts.append(_DOUBLE_STAR)
            # A third star adds nothing to ``**``; swallow any run of stars.
            while i < len(pattern) and pattern[i] == "*":
                i += 1
            continue
        if char == "*":
            parts.append(_STAR)
        elif char == "?":
            parts.append(_QUESTION)
        else:
            parts.append(re.escape(char))
        i += 1
    return re.compile("".join(parts))


def glob_matches(pattern: re.Pattern[str], value: str) -> bool:
    """Whether the compiled glob ``pattern`` matches all of ``value``."""
    return pattern.fullmatch(value) is not None
