"""Webhook notifications for approval requests: opened and resolved.

A background thread delivers them with retries, so a slow or broken webhook never delays an
exchange or a review. NOTE: bodies carry the request's public view only; never a token.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Protocol

import httpx

from broker.policy.model import WebhookConfig

log = logging.getLogger("broker.webhook")
_STOP = object()


class Notifier(Protocol):
    def notify(self, event: str, approval: dict[str, Any], *, at: str) -> None: ...


class WebhookNotifier:
    def __init__(self, config: WebhookConfig, *, backoff: float = 0.5) -> None:
        self._config = config
        self._backoff = backoff
        self._queue: queue.Queue[object] = queue.Queue(maxsize=10_000)
        self._http = httpx.Client(timeout=config.timeout, follow_redirects=False)
        self._thread = threading.Thread(target=self._run, name="broker-webhook", daemon=True)
        self._thread.start()

    def notify(self, event: str, approval: dict[str, Any], *, at: str) -> None:
        """Queue one notification; drops it (with a log line) when the queue is full."""
        try:
            self._queue.put_nowait({"event": event, "at": at, "approval": approval})
        except queue.Full:
            log.error("webhook queue full: dropped %s for %s", event, approval.get("id"))

    def _run(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            assert isinstance(item, dict)
            self._deliver(item)

    def _deliver(self, body: dict[str, Any]) -> None:
        for attempt in range(self._config.retries + 1):
            try:
                resp = self._http.post(self._config.url, json=body)
                if resp.status_code < 300:
                    return
                problem = f"HTTP {resp.status_code}"
            except httpx.HTTPError as exc:
                problem = type(exc).__name__
            if attempt < self._config.retries:
                time.sleep(self._backoff * 2**attempt)
        log.error("webhook %s failed after %d attempts: %s", body["event"], attempt + 1, problem)

    def close(self, timeout: float = 10.0) -> None:
        """Deliver what is queued (up to ``timeout``), then stop."""
        self._queue.put(_STOP)
        self._thread.join(timeout)
        self._http.close()
