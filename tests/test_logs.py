"""Log line formats: JSON objects with the request id, text with it appended."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator

import pytest

from broker.logs import (
    QUIET_LIBRARIES,
    REQUEST_ID,
    JsonFormatter,
    TextFormatter,
    configure_logging,
)


def record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    made = logging.LogRecord("broker.test", logging.WARNING, __file__, 1, message, args, None)
    for key, value in extra.items():
        setattr(made, key, value)
    return made


def test_a_json_line_has_time_level_logger_message_and_the_request_id() -> None:
    token = REQUEST_ID.set("req-1")
    try:
        line = json.loads(JsonFormatter().format(record("revoked %s", "g_1")))
    finally:
        REQUEST_ID.reset(token)
    assert line.pop("time").endswith("+00:00")
    assert line == {
        "level": "WARNING",
        "logger": "broker.test",
        "message": "revoked g_1",
        "request_id": "req-1",
    }
    outside = json.loads(JsonFormatter().format(record("no request")))
    assert "request_id" not in outside


def test_a_json_line_carries_the_exception_and_the_given_fields() -> None:
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        made = logging.LogRecord("b", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    made.fields = {"status": 500, "path": "/x"}  # type: ignore[attr-defined]
    text = JsonFormatter().format(made)
    assert "\n" not in text  # one line, whatever the traceback
    line = json.loads(text)
    assert "ValueError: boom\nsecond line" in line["exception"]
    assert line["status"] == 500 and line["path"] == "/x"


def test_a_text_line_appends_the_request_id_to_its_first_line() -> None:
    formatter = TextFormatter()
    assert formatter.format(record("plain")) == "WARNING broker.test: plain"
    token = REQUEST_ID.set("abc")
    try:
        assert formatter.format(record("in a request")).endswith(": in a request request_id=abc")
    finally:
        REQUEST_ID.reset(token)


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    quiet = {name: logging.getLogger(name).level for name in QUIET_LIBRARIES}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, was in quiet.items():
        logging.getLogger(name).setLevel(was)


@pytest.mark.usefixtures("restore_root")
def test_configure_logging_installs_one_handler_and_replaces_it() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging("text", stream=first)
    configure_logging("json", "WARNING", stream=second)
    logging.getLogger("broker.somewhere").warning("once")
    logging.getLogger("broker.somewhere").info("below the level")
    assert first.getvalue() == ""
    lines = second.getvalue().splitlines()
    assert [json.loads(line)["message"] for line in lines] == ["once"]


@pytest.mark.usefixtures("restore_root")
def test_client_libraries_stay_quiet_even_at_debug() -> None:
    stream = io.StringIO()
    configure_logging("json", "DEBUG", stream=stream)
    logging.getLogger("httpx").info("HTTP Request: POST https://hooks.example/x?key=SECRET")
    logging.getLogger("botocore.parsers").debug("Response body: b'<SecretAccessKey>...'")
    logging.getLogger("broker.api").debug("the broker's own debug line")
    logging.getLogger("httpx").warning("a warning still shows")
    messages = [json.loads(line)["message"] for line in stream.getvalue().splitlines()]
    assert messages == ["the broker's own debug line", "a warning still shows"]
