"""``broker serve``: one process, or ``--workers N`` processes of one broker sharing its store.

With several workers, uvicorn's supervisor binds the socket once and runs N worker processes
that accept on it; each builds its own broker from the same settings (passed as ``BROKER_*``
variables: :func:`app_from_env`), and the store is what they share: grants, spent tokens, the
log, the leases (one worker at a time runs the singleton maintenance, see
:mod:`broker.maintenance`). The supervisor restarts a worker that dies. Each worker pins itself
to a CPU of its own (:func:`plan_affinity`, :func:`claim_cpu`) unless told not to.

Nothing of the server is imported until a server is started (the CLI stays light).
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

APP = "broker.cli.serve:app_from_env"
DEV_APP = "broker.cli.serve:dev_app_from_env"
UVICORN: dict[str, Any] = {
    "log_level": "warning",
    # NOTE: uvicorn's own access log prints query strings (a token may be in one): it stays
    # off; BROKER_ACCESS_LOG turns on the broker's (docs/observability.md).
    "access_log": False,
    # uvicorn's lines go through the handler configure_logging set up, in the same format.
    "log_config": None,
    # NOTE: uvicorn would believe X-Forwarded-For from any loopback peer; the broker reads it
    # itself, from BROKER_TRUSTED_PROXIES only (docs/security.md).
    "proxy_headers": False,
}
"""How ``serve`` runs uvicorn, with one worker or several."""
SLOTS_ENV = "BROKER_WORKER_SLOTS"
"""Set by the supervisor for its workers: the directory of per-CPU slot files (not a setting)."""

log = logging.getLogger(__name__)
_claimed: list[int] = []  # the descriptor of this worker's slot, held until the process ends


def serve(
    *,
    policy: Path | None,
    data_dir: Path | None,
    host: str | None,
    port: int | None,
    dev: bool,
    workers: int,
) -> None:
    """Run the broker until it is stopped. Raises ConfigError/PolicyError before serving."""
    import uvicorn  # noqa: PLC0415 (see the module's docstring)

    from broker.logs import configure_logging  # noqa: PLC0415
    from broker.settings import Settings  # noqa: PLC0415

    overrides: dict[str, Any] = {
        k: v
        for k, v in {"policy": policy, "data_dir": data_dir, "host": host, "port": port}.items()
        if v is not None
    }
    if dev:
        overrides["dev"] = True
    settings = Settings(**overrides)
    configure_logging(settings.log_format, settings.log_level)
    if workers == 1:
        from broker.api.app import create_app  # noqa: PLC0415

        app = create_app(settings, serving=True)
        resolved = app.state.broker.settings
        uvicorn.run(app, host=resolved.host, port=resolved.port, **UVICORN)
        return
    resolved = prepare(settings)
    # NOTE: the workers are new processes (spawned): they read their settings from the
    # environment, as replicas do. Dev mode never comes from there (BROKER_DEV is refused), so
    # it is the choice of factory, made here from --dev.
    for name, value in (
        ("BROKER_POLICY", resolved.policy),
        ("BROKER_DATA_DIR", resolved.data_dir),
        ("BROKER_HOST", resolved.host),
        ("BROKER_PORT", resolved.port),
        ("BROKER_ISSUER_URL", resolved.issuer_url),
        ("BROKER_DATABASE_URL", resolved.database_url),
    ):
        os.environ[name] = str(value)
    slots = plan_affinity(resolved.worker_affinity, workers)
    os.environ.pop(SLOTS_ENV, None)
    if slots is not None:
        os.environ[SLOTS_ENV] = str(slots)
    try:
        uvicorn.run(
            DEV_APP if dev else APP,
            factory=True,
            workers=workers,
            host=resolved.host,
            port=resolved.port,
            **UVICORN,
        )
    finally:
        if slots is not None:
            shutil.rmtree(slots, ignore_errors=True)


def plan_affinity(affinity: str, workers: int) -> Path | None:
    """The supervisor's part of pinning: a new directory with one slot file per CPU the workers
    will take, or None when they are not pinned (``off``, one worker, or fewer CPUs allowed
    than workers).

    NOTE: one CPU per worker, measured: the threads of a process (event loop, exchange threads,
    group-commit writer) hand the GIL to each other, and on two CPUs each hand-off is also a
    cross-CPU wake-up; pinned, two workers did ~10-20 % more exchanges/s with a p99 a third as
    long (docs/performance.md)."""
    if affinity == "off" or workers < 2 or not hasattr(os, "sched_getaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < workers:
        log.info("%d workers on %d CPUs: the workers are not pinned", workers, len(cpus))
        return None
    slots = Path(tempfile.mkdtemp(prefix="broker-workers-"))
    for cpu in cpus[:workers]:
        (slots / f"cpu-{cpu}").touch(mode=0o600)
    return slots


def claim_cpu(slots: Path) -> int | None:
    """A worker's part: take the first free slot in ``slots`` (an flock held until this process
    ends, so the worker the supervisor starts in place of a dead one gets the dead one's CPU)
    and pin every thread of this process to its CPU. None when no slot is free."""
    for path in sorted(slots.glob("cpu-*")):
        fd = os.open(path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        cpu = int(path.name.removeprefix("cpu-"))
        try:
            os.sched_setaffinity(0, {cpu})  # this thread first: the ones it starts inherit it
        except OSError as exc:  # the CPU left this process's set meanwhile: run unpinned
            log.warning("cannot pin this worker to CPU %d (%s): not pinned", cpu, exc)
            os.close(fd)
            return None
        for tid in os.listdir("/proc/self/task"):
            try:
                os.sched_setaffinity(int(tid), {cpu})
            except OSError:  # a thread that ended meanwhile
                continue
        _claimed.append(fd)
        return cpu
    return None


def prepare(settings: Any) -> Any:
    """Build the broker once and close it before the workers start: the configuration is
    checked (an error stops ``serve`` with one message, not N), and the data dir, the keys
    and the schema are made by one process, not raced for. Returns the resolved settings."""
    from broker.runtime import build_broker  # noqa: PLC0415

    broker = build_broker(settings)
    broker.close()
    return broker.settings


def _configured(**extra: Any) -> Any:
    from broker.api.app import create_app  # noqa: PLC0415
    from broker.logs import configure_logging  # noqa: PLC0415
    from broker.settings import Settings  # noqa: PLC0415

    settings = Settings(**extra)
    # Spawned workers do not inherit the supervisor's handler: each configures its own.
    configure_logging(settings.log_format, settings.log_level)
    slots = os.environ.get(SLOTS_ENV)
    if slots and not _claimed:
        cpu = claim_cpu(Path(slots))
        if cpu is None:
            log.warning("no free CPU slot in %s: this worker is not pinned", slots)
        else:
            log.info("worker %d pinned to CPU %d", os.getpid(), cpu)
    return create_app(settings, serving=True)


def app_from_env() -> Any:
    """The app of one worker, from ``BROKER_*`` (uvicorn's ``--factory``)."""
    return _configured()


def dev_app_from_env() -> Any:
    """The app of one worker of ``broker serve --dev --workers N``."""
    return _configured(dev=True)
