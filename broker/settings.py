"""Broker settings from flags and ``BROKER_*`` environment variables (pydantic-settings)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from broker.errors import ConfigError
from broker.keys.kek import require_shared_kek
from broker.logs import LogFormat
from broker.store.db import sqlite_url

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
WorkerAffinity = Literal["auto", "off"]
EXAMPLE_POLICY = Path(__file__).resolve().parents[1] / "examples" / "policy.yaml"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _EnvWithoutDev(EnvSettingsSource):
    """``BROKER_*`` variables, except that ``BROKER_DEV`` is refused.

    NOTE: dev mode lets anyone who reaches the broker mint admin tokens. A variable left in a
    shell profile, a unit file or a container image would turn it on without anyone seeing it
    on the command line, so it comes from ``--dev`` only.
    """

    def __call__(self) -> dict[str, Any]:
        values = super().__call__()
        if "dev" in values:
            raise ConfigError(
                "BROKER_DEV is set: dev mode is never taken from the environment; unset "
                "BROKER_DEV and pass --dev on the command line if you mean it"
            )
        return values


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BROKER_", extra="ignore", populate_by_name=True)

    policy: Path | None = None
    data_dir: Path = Path(".broker")
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    database_url: str | None = None
    issuer_url: str | None = None
    kek_file: Path | None = None
    """The key-encryption key (base64 of 32 random bytes) that seals every key in the store;
    replicas share it. Unset: ``<data_dir>/kek``, created on first start (SQLite, or --dev)."""
    kek_transit_key: str | None = None
    """The KEK file holds a transit ciphertext that this OpenBao/Vault transit key unwraps at
    start-up (VAULT_ADDR and the broker's Vault auth; :mod:`broker.keys.transit`)..."""
    kek_transit_mount: str = "transit"
    """...under this mount."""
    dev: bool = False
    """Dev mode: from ``--dev`` only (``BROKER_DEV`` is refused, see :class:`_EnvWithoutDev`)."""
    sqlite_synchronous: Literal["FULL", "NORMAL"] = "FULL"
    vault_addr: str | None = Field(default=None, validation_alias=AliasChoices("VAULT_ADDR"))
    """Enables the vault backend (the Vault ecosystem's own variable)."""
    vault_token: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("VAULT_TOKEN")
    )
    vault_cacert: str | None = Field(default=None, validation_alias=AliasChoices("VAULT_CACERT"))
    vault_jwt_role: str | None = None
    """Log in to Vault with JWT auth as this role (instead of VAULT_TOKEN)..."""
    vault_jwt_file: Path | None = None
    """...presenting the broker's own identity token read from this file (re-read each login)."""
    vault_jwt_mount: str = "jwt"
    reconcile_interval: float = Field(default=300.0, gt=0)
    """Seconds between reconciler runs (backend credentials without an active grant)."""
    checkpoint_interval: float = Field(default=60.0, gt=0)
    """Seconds between maintenance rounds: expiry sweep and a new checkpoint if the log grew."""
    lease_ttl: float = Field(default=30.0, gt=0)
    """Seconds a broker process holds the maintenance lease without renewing it: the singleton
    jobs move to another replica or worker within about 4/3 of this after the holder dies."""
    refusal_burst: int = Field(default=100, ge=1)
    """Unverifiable attempts a client address may make at once (docs/security.md)..."""
    refusal_rate: float = Field(default=10.0, gt=0)
    """...and per second after that, before it is answered 429."""
    trusted_proxies: str = ""
    """Addresses or networks (comma-separated) whose X-Forwarded-For names the client."""
    worker_affinity: WorkerAffinity = "auto"
    """``serve --workers N``: ``auto`` pins each worker to a CPU of its own when the process may
    run on at least N; ``off`` leaves the scheduler free (docs/deployment.md)."""
    audit_publish_s3: str | None = None
    """``s3://bucket[/prefix]``: publish every signed checkpoint there (docs/audit.md)..."""
    audit_publish_s3_retention_days: int | None = Field(default=None, ge=1)
    """...with a COMPLIANCE Object Lock retention of this many days (else the bucket's default)."""
    audit_publish_url: str | None = None
    """An http(s) URL to POST every signed checkpoint to."""
    log_format: LogFormat = "text"
    """``json``: one JSON object per log line (docs/observability.md)."""
    log_level: LogLevel = "INFO"
    access_log: bool = False
    """One log line per HTTP request (no query string, body or header)."""

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        """``BROKER_LOG_FORMAT=JSON`` means json."""
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        """``BROKER_LOG_LEVEL=debug`` means DEBUG."""
        return value.strip().upper() if isinstance(value, str) else value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, _EnvWithoutDev(settings_cls), dotenv_settings, file_secret_settings

    def resolved(self) -> Settings:
        """Fill derived defaults and refuse unsafe combinations. Raises ConfigError."""
        policy = self.policy
        if policy is None:
            if not self.dev:
                raise ConfigError("no policy: pass --policy FILE or set BROKER_POLICY")
            policy = EXAMPLE_POLICY
        if self.dev and not is_loopback(self.host):
            raise ConfigError(
                f"--dev refuses to bind {self.host}: dev mode hands out tokens for any identity, "
                "so it listens on loopback only (127.0.0.1, ::1)"
            )
        issuer_url = (self.issuer_url or f"http://{self.host}:{self.port}").rstrip("/")
        database_url = self.database_url or sqlite_url(self.data_dir)
        require_shared_kek(database_url, self.kek_file, dev=self.dev)
        return self.model_copy(
            update={"policy": policy, "issuer_url": issuer_url, "database_url": database_url}
        )
