"""The policy: which workload identities may do which actions on which models.

:func:`load_policy` reads and checks a policy file (the only I/O here); :func:`decide` is the
pure engine that answers one request with a :class:`Decision` and its reasons.
"""

from broker.policy.engine import Decision, Outcome, RuleMiss, decide
from broker.policy.loader import LoadedPolicy, load_policy, parse_policy

__all__ = [
    "Decision",
    "LoadedPolicy",
    "Outcome",
    "RuleMiss",
    "decide",
    "load_policy",
    "parse_policy",
]
