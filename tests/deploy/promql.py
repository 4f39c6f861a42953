"""Reading the metric names out of a PromQL expression (for the deploy/ files' tests)."""

from __future__ import annotations

import re

PROMQL_WORDS = {
    # functions, aggregations and keywords the dashboard and the alerts may use
    *("sum", "max", "min", "avg", "count", "rate", "irate", "increase", "deriv"),
    *("histogram_quantile", "by", "without", "on", "ignoring", "group_left", "group_right"),
    *("and", "or", "unless", "bool", "offset"),
}
STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
MATCHERS = re.compile(r"\{[^}]*\}")
RANGE = re.compile(r"\[[^\]]*\]")
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def names_in(expr: str) -> set[str]:
    """The metric names (and PromQL words) of ``expr``: label matchers, ranges, strings and
    grouping label lists taken out first."""
    for pattern in (STRING, MATCHERS, RANGE, GROUPING):
        expr = pattern.sub(" ", expr)
    return set(IDENTIFIER.findall(expr))
