"""Anchored globs for subjects, models and datasets.

The syntax is deliberately tiny:

* ``*`` matches any run of characters except ``/`` and ``:`` (possibly empty);
* ``**`` matches any run of characters, ``/`` and ``:`` included (possibly empty);
* ``?`` matches exactly one character except ``/`` and ``:``;
* every other character matches itself. There are no character classes, braces or escapes,
  and regex metacharacters are literal.

A glob always matches the *whole* value, never a part of it.

NOTE: ``*`` stops at ``/`` and ``:`` because those separate the fields of workload subjects
(``repo:acme/evals:ref:refs/heads/main``, ``system:serviceaccount:training:trainer``). If ``*``
crossed them, ``repo:acme/*:ref:refs/heads/main`` would also match
``repo:acme/x:environment:prod:ref:refs/heads/main`` — a subject an attacker can shape by naming
a repository or environment. Crossing separators has to be asked for explicitly with ``**``.
"""

from __future__ import annotations

import re

_STAR = "[^/:]*"
_DOUBLE_STAR = ".*"
_QUESTION = "[^/:]"


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
    # DOTALL: ``**`` means *any* character; a newline must not be a way to escape a pattern.
    return re.compile("".join(parts), re.DOTALL)


def glob_matches(pattern: re.Pattern[str], value: str) -> bool:
    """Whether the compiled glob ``pattern`` matches all of ``value``."""
    return pattern.fullmatch(value) is not None
