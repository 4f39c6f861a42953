"""Webhook notifications for approval requests: opened and resolved.

A background thread delivers them with retries, so a slow or broken webhook never delays an
exchange or a review. Each is signed per the Standard Webhooks specification (``webhook-id``,
``webhook-timestamp``, ``webhook-signature``: HMAC-SHA256 of ``id.timestamp.body``) by the
``standardwebhooks`` package, so a receiver can tell the broker's notifications from anyone
else's. NOTE: bodies carry the request's public view only; never a token.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import queue
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
from standardwebhooks import Webhook

from broker.policy.model import WebhookConfig

log = logging.getLogger("broker.webhook")
_STOP = object()


class Notifier(Protocol):
    def notify(self, event: str, approval: dict[str, Any], *, at: str) -> None: ...


@dataclass(frozen=True, slots=True)
class _Message:
    id: str
    """``webhook-id``: the same for every attempt, so a receiver can drop duplicates."""
    event: str
    approval_id: str | None
    body: str


class WebhookNotifier:
    def __init__(self, config: WebhookConfig, secret: str, *, backoff: float = 0.5) -> None:
        """``secret`` is the Standard Webhooks secret (``whsec_`` + base64) that the policy
        loader read from ``secret_file``."""
        self._config = config
        self._signer = Webhook(secret)
        self._backoff = backoff
        self._queue: queue.Queue[object] = queue.Queue(maxsize=10_000)
        self._http = httpx.Client(timeout=config.timeout, follow_redirects=False)
        self._thread = threading.Thread(target=self._run, name="broker-webhook", daemon=True)
        self._thread.start()

    def notify(self, event: str, approval: dict[str, Any], *, at: str) -> None:
        """Queue one notification; drops it (with a log line) when the queue is full."""
        body = json.dumps({"event": event, "at": at, "approval": approval}, sort_keys=True)
        message = _Message("msg_" + secrets.token_hex(16), event, approval.get("id"), body)
        try:
            self._queue.put_nowait(message)
        except queue.Full:
            log.error("webhook queue full: dropped %s for %s", event, message.approval_id)

    def _run(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            assert isinstance(item, _Message)
            self._deliver(item)

    def signed_headers(self, message_id: str, body: str) -> dict[str, str]:
        """The Standard Webhooks headers for ``body`` sent now (each attempt is signed anew,
        so a retry after a backoff is not refused as too old)."""
        now = dt.datetime.fromtimestamp(int(time.time()), dt.UTC)
        return {
            "webhook-id": message_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": self._signer.sign(message_id, now, body),
            "content-type": "application/json",
        }

    def _deliver(self, message: _Message) -> None:
        # NOTE: the bytes sent are exactly the bytes signed (never re-serialised by httpx).
        content = message.body.encode("utf-8")
        for attempt in range(self._config.retries + 1):
            headers = self.signed_headers(message.id, message.body)
            try:
                resp = self._http.post(self._config.url, content=content, headers=headers)
                if resp.status_code < 300:
                    return
                problem = f"HTTP {resp.status_code}"
            except httpx.HTTPError as exc:
                problem = type(exc).__name__
            if attempt < self._config.retries:
                time.sleep(self._backoff * 2**attempt)
        log.error("webhook %s failed after %d attempts: %s", message.event, attempt + 1, problem)

    def close(self, timeout: float = 10.0) -> None:
        """Deliver what is queued (up to ``timeout``), then stop."""
        self._queue.put(_STOP)
        self._thread.join(timeout)
        self._http.close()
