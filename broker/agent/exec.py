"""``broker agent --exec``: run the job's command as the agent's child, with the credential in
its environment, as Vault Agent's exec mode does.

- The child starts once the first credential is there, with the variables of ``--format env``
  (``AWS_ACCESS_KEY_ID``…, ``VAULT_TOKEN``, ``BROKER_JWT``…) added to the agent's environment, and
  ``BROKER_CREDENTIAL_FILE`` naming the sink, which always holds the current credential.
- After each refresh the sink is rewritten, then the child gets the refresh signal (SIGHUP by
  default): an environment cannot change from outside, so the child re-reads the file then.
- SIGTERM and SIGINT to the agent are passed on to the child; the agent then waits for the child
  and exits with its exit code (128 + N when signal N ended it). When the child ends by itself
  the agent stops and exits with the child's code.
- The child never outlives the agent: on Linux it is started with the parent-death signal set
  to SIGKILL, so even a SIGKILL of the agent takes it along; on every other way out the agent
  stops it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence

from broker.client.credentials import Credential

log = logging.getLogger("broker.agent")

CREDENTIAL_FILE_ENV = "BROKER_CREDENTIAL_FILE"
"""The child's variable naming the sink that holds the current credential."""
_PR_SET_PDEATHSIG = 1


def _die_with(parent: int) -> Callable[[], None]:
    def before_exec() -> None:  # pragma: no cover (runs in the forked child)
        """The kernel sends SIGKILL when the agent's thread ends; and if the agent already
        died between the fork and here, the child goes at once."""
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(137)

    return before_exec


def exit_code(returncode: int) -> int:
    """A child's exit status as a shell reports it: 128 + N when signal N ended it."""
    return 128 - returncode if returncode < 0 else returncode


class Child:
    """The command the agent runs; ``stop`` (the agent's) is set when it exits."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        credential_file: str,
        refresh_signal: signal.Signals | None = signal.SIGHUP,
        stop: threading.Event | None = None,
    ) -> None:
        if not argv:
            raise ValueError("--exec needs a command after --")
        self.argv, self.credential_file = list(argv), credential_file
        self.refresh_signal = refresh_signal
        self.stop = stop or threading.Event()
        self._ended = threading.Event()
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None
        """The child's exit status once it ended (126/127 when it could not start)."""
        self.stopping = False

    def on_credential(self, credential: Credential) -> None:
        """The agent wrote ``credential`` to the sink: start the child the first time, signal
        it every later time."""
        if self.proc is None:
            self._start(credential)
        elif self.refresh_signal is not None and self.proc.poll() is None:
            log.info("signalled %s to the command: %r", self.refresh_signal.name, credential)
            self.proc.send_signal(self.refresh_signal)

    def _start(self, credential: Credential) -> None:
        env = {**os.environ, **credential.env(), CREDENTIAL_FILE_ENV: self.credential_file}
        # NOTE: prctl's parent-death signal is Linux's; elsewhere only the agent's own stop path
        # (forwarded signals, Child.finish on every way out of cli.agent) ends the child.
        preexec = _die_with(os.getpid()) if sys.platform == "linux" else None
        try:
            self.proc = subprocess.Popen(self.argv, env=env, preexec_fn=preexec)  # noqa: PLW1509, S603
        except OSError as exc:
            # The command cannot run (not found, not executable): what a shell answers.
            log.error("--exec %s: %s", self.argv[0], exc.strerror or exc)
            self.returncode = 127 if isinstance(exc, FileNotFoundError) else 126
            self._ended.set()
            self.stop.set()
            return
        log.info("started %s (pid %d) with %r", self.argv[0], self.proc.pid, credential)
        threading.Thread(target=self._wait, name="broker-agent-child", daemon=True).start()

    def _wait(self) -> None:
        assert self.proc is not None
        self.returncode = self.proc.wait()
        log.info("%s exited with %d", self.argv[0], exit_code(self.returncode))
        self._ended.set()
        self.stop.set()

    def forward(self, signum: int) -> None:
        """Pass a stop signal on to the running child."""
        self.stopping = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signum)

    def finish(self) -> int | None:
        """Wait for the child to end (stopping it first if it still runs, e.g. the agent gave
        up); its exit code, or None when it never started."""
        if self.proc is None and self.returncode is None:
            return None
        if self.proc is not None and not self.stopping and self.proc.poll() is None:
            log.info("stopping %s (pid %d)", self.argv[0], self.proc.pid)
            self.proc.terminate()
        self._ended.wait()
        assert self.returncode is not None
        return exit_code(self.returncode)
