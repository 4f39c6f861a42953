"""``broker agent``: keeps a job's credential fresh in a sink file, as Vault Agent does.

NOTE: lean like :mod:`broker.client`: a sidecar imports nothing of the server.
"""

from broker.agent.run import Agent
from broker.agent.sinks import FORMATS, Sink, SinkError

__all__ = ["FORMATS", "Agent", "Sink", "SinkError"]
