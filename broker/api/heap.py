"""The garbage collector of a serving process (``broker serve``), told what the broker's
start-up built.

NOTE: why (docs/performance.md, "Results after the lean signing"): besides its frequent young
collections, CPython's cycle collector now and then runs a full one, which walks every object
the process holds, and most of those were built at start-up and live as long as it does
(SQLAlchemy's, pydantic's and FastAPI's structures, the policy, the keys): 0.12-0.44 s of one
worker's event loop per 6,000 exchanges, measured. So once its start-up is done, and before its
maintenance thread starts, a serving process collects once and moves what is left out of the
collector's sight (``gc.freeze``); full collections then walk only what was made since. The
young collections are left as CPython sets them: a threshold ten times higher (fewer of them)
made exchanges slower, measured, as the garbage they leave for later spreads the heap.

Tests build many apps in one process and never call this: the cycle collector never frees a
frozen object (reference counting still does), so their cyclic garbage would stay.
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger(__name__)


def settle() -> None:
    """Collect once, then freeze what survives (the start-up's heap)."""
    gc.collect()
    gc.freeze()
    log.info(
        "start-up heap frozen: %d objects left out of garbage collection", gc.get_freeze_count()
    )
