"""The agent's loop: exchange, write the sink, sleep until the refresh is due, again.

- A refresh is due at about two thirds of the credential's lifetime, with jitter
  (:func:`broker.client.credentials.refresh_delay`).
- A failed exchange is retried with exponential backoff (with jitter); the sink keeps the last
  good credential until it expires, then is removed: no credential rather than an expired one.
- An action that needs approval: the agent names the request to review and polls it with
  backoff; once approved it exchanges with it; denied (or cancelled, expired) ends the agent.
- ``exit_after_auth`` (an init container): return after the first credential is written; a
  refusal ends the agent at once instead of being retried.
- ``refusal_ends_before_first`` (``--exec``): a refusal before the first credential ends the
  agent at once too (the job's command cannot start without one); once there is one, failed
  refreshes are retried as usual.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import threading
from collections.abc import Callable

from broker.agent.sinks import Sink, SinkError
from broker.client.credentials import Credential, Provider
from broker.client.http import ClientError

log = logging.getLogger("broker.agent")

EXIT_OK, EXIT_REFUSED, EXIT_CONFIG = 0, 1, 2
BACKOFF_FIRST_S, BACKOFF_MAX_S = 1.0, 60.0
APPROVAL_POLL_MAX_S = 30.0


class Agent:
    def __init__(
        self,
        provider: Provider,
        sink: Sink,
        *,
        exit_after_auth: bool = False,
        refusal_ends_before_first: bool = False,
        stop: threading.Event | None = None,
        on_credential: Callable[[Credential], None] | None = None,
        backoff_first: float = BACKOFF_FIRST_S,
        backoff_max: float = BACKOFF_MAX_S,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.provider, self.sink, self.exit_after_auth = provider, sink, exit_after_auth
        self.refusal_ends_before_first = refusal_ends_before_first
        self.written = False
        self.stop = stop or threading.Event()
        self.on_credential = on_credential
        self.backoff_first, self.backoff_max, self.rand = backoff_first, backoff_max, rand
        self.current: Credential | None = None

    def _pause(self, failures: int, most: float) -> float:
        """Exponential backoff with jitter: between half and all of first * 2**failures."""
        pause: float = min(self.backoff_first * 2.0**failures, most)
        return pause * (0.5 + 0.5 * self.rand())

    def run(self) -> int:
        """Run until stopped (0), or with ``exit_after_auth`` until the sink is written (0);
        1 when an approval ended otherwise than approved, or (``exit_after_auth``) the broker
        refused; 2 when the credential does not fit the sink's format."""
        failures, approval_id = 0, None
        while not self.stop.is_set():
            try:
                credential, delay = self.provider.exchange(approval_id)
            except ClientError as exc:
                approval_id = None
                if exc.code == "approval_required" and exc.fields.get("approval_id"):
                    outcome = self._await_approval(str(exc.fields["approval_id"]))
                    if outcome is None:
                        continue  # stopped
                    if outcome != "approved":
                        return EXIT_REFUSED
                    approval_id = str(exc.fields["approval_id"])
                    continue
                refused = exc.status is not None and exc.status < 500
                first = self.refusal_ends_before_first and not self.written
                if refused and (self.exit_after_auth or first):
                    log.error("the broker refused: %s: %s", exc.code, exc.description)
                    return EXIT_REFUSED
                self._failed(f"{exc.code}: {exc.description}", failures)
                failures += 1
                continue
            except (ValueError, OSError) as exc:  # the token source
                self._failed(str(exc), failures)
                failures += 1
                continue
            failures, approval_id = 0, None
            try:
                self.sink.write(credential)
            except SinkError as exc:
                log.error("%s", exc)
                return EXIT_CONFIG
            self.current, self.written = credential, True
            log.info(
                "wrote %r to %s (%s); next refresh in %.0f s",
                credential,
                self.sink.path,
                self.sink.format,
                delay,
            )
            if self.on_credential:
                self.on_credential(credential)
            if self.exit_after_auth:
                return EXIT_OK
            self.stop.wait(delay)
        log.info("stopped")
        return EXIT_OK

    def _failed(self, why: str, failures: int) -> None:
        """Log the failure, drop an expired credential from the sink, and back off."""
        now = dt.datetime.now(dt.UTC)
        pause = self._pause(failures, self.backoff_max)
        if self.current is not None and now >= self.current.expires_at:
            log.error("%r expired with no new credential: removed %s", self.current, self.sink.path)
            self.sink.remove()
            self.current = None
        kept = f"; keeping {self.current!r} meanwhile" if self.current else ""
        log.warning("exchange failed: %s; retrying in %.1f s%s", why, pause, kept)
        self.stop.wait(pause)

    def _await_approval(self, approval_id: str) -> str | None:
        """Poll the request until it is decided: its status, or None when stopped."""
        log.warning(
            "approval required: request %s awaits review "
            "(broker approvals show %s); waiting for a decision",
            approval_id,
            approval_id,
        )
        polls = 0
        while not self.stop.wait(self._pause(polls, APPROVAL_POLL_MAX_S)):
            polls += 1
            try:
                view = self.provider.client.get_approval(approval_id, bearer=self.provider.source())
            except (ClientError, ValueError, OSError) as exc:
                log.warning("could not look at approval %s: %s", approval_id, exc)
                continue
            status = str(view.get("status"))
            if status == "pending":
                continue
            if status == "approved":
                log.info("approval %s approved: exchanging", approval_id)
            else:
                log.error("approval %s is %s: giving up", approval_id, status)
            return status
        return None
