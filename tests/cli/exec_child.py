"""The command ``broker agent --exec`` runs in tests/cli/test_agent_exec.py: it logs to the file
in argv[1] what it saw (its pid, the credential's grant in its environment, the grant in
$BROKER_CREDENTIAL_FILE at each SIGHUP, SIGTERM), then waits; ``exit N`` as argv[2] exits N."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from types import FrameType

out = Path(sys.argv[1])


def note(line: str) -> None:
    with out.open("a") as f:
        f.write(line + "\n")


def on_hup(_signum: int, _frame: FrameType | None) -> None:
    text = Path(os.environ["BROKER_CREDENTIAL_FILE"]).read_text()
    note(f"hup {json.loads(text)['grant_id']}")


def on_term(_signum: int, _frame: FrameType | None) -> None:
    note("term")
    sys.exit(0)


signal.signal(signal.SIGHUP, on_hup)
signal.signal(signal.SIGTERM, on_term)
jwt = os.environ.get("BROKER_JWT", "")
note(f"pid {os.getpid()}")
note(f"start {os.environ['BROKER_GRANT_ID']} {'jwt' if jwt.count('.') == 2 else 'no-jwt'}")
note(f"file {os.environ['BROKER_CREDENTIAL_FILE']}")
if len(sys.argv) > 3 and sys.argv[2] == "exit":
    sys.exit(int(sys.argv[3]))
while True:
    signal.pause()
