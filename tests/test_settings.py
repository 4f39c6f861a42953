"""Dev mode is loopback-only and unreachable outside --dev."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from broker.api.app import create_app
from broker.cli.main import main
from broker.errors import ConfigError, PolicyError
from broker.runtime import build_broker
from broker.settings import EXAMPLE_POLICY, Settings


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "example.com", "::"])
def test_dev_mode_refuses_non_loopback_binds(host: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="loopback"):
        Settings(dev=True, host=host, data_dir=tmp_path).resolved()


def test_dev_mode_allows_loopback(tmp_path: Path) -> None:
    for host in ("127.0.0.1", "::1", "localhost"):
        assert Settings(dev=True, host=host, data_dir=tmp_path).resolved().dev


def test_example_policy_is_refused_outside_dev_mode(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="--dev"):
        create_app(Settings(policy=EXAMPLE_POLICY, data_dir=tmp_path))


def test_no_dev_routes_outside_dev_mode(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "issuers:\n"
        "  - {name: ci, issuer: 'https://ci.example.com', audiences: [model-broker], jwks_uri: 'https://ci.example.com/jwks'}\n"
        "actions:\n  evaluate: {tier: low, max_ttl: 1h}\n"
        "models:\n  m: {}\n"
    )
    with TestClient(create_app(Settings(policy=policy, data_dir=tmp_path / "d"))) as client:
        assert client.post("/dev/token", json={"sub": "x"}).status_code == 404
        assert client.get("/healthz").status_code == 200


def test_serving_without_a_policy_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="policy"):
        Settings(data_dir=tmp_path).resolved()


@pytest.mark.parametrize("value", ["true", "1", "false"])
def test_dev_mode_never_comes_from_the_environment(
    value: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BROKER_DEV", value)
    with pytest.raises(ConfigError, match=r"BROKER_DEV is set.*pass --dev"):
        Settings(data_dir=tmp_path)
    with pytest.raises(ConfigError, match="BROKER_DEV"):
        Settings(dev=True, data_dir=tmp_path)


def test_the_cli_refuses_broker_dev_as_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("broker_dev", "true")  # variable names are case-insensitive
    assert main(["reconcile", "--data-dir", str(tmp_path)]) == 2
    assert "BROKER_DEV" in capsys.readouterr().err
    assert not (tmp_path / "broker.db").exists()


def test_other_settings_still_come_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BROKER_PORT", "9123")
    assert Settings(data_dir=tmp_path).port == 9123


def test_log_settings_come_from_the_environment_in_any_case(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BROKER_LOG_FORMAT", "JSON")
    monkeypatch.setenv("BROKER_LOG_LEVEL", "debug")
    monkeypatch.setenv("BROKER_ACCESS_LOG", "true")
    settings = Settings(data_dir=tmp_path)
    assert (settings.log_format, settings.log_level, settings.access_log) == ("json", "DEBUG", True)
    assert Settings(data_dir=tmp_path, log_format="text", log_level="info").log_level == "INFO"


@pytest.mark.parametrize(("name", "value"), [("log_format", "xml"), ("log_level", "loud")])
def test_an_unknown_log_setting_is_refused(tmp_path: Path, name: str, value: str) -> None:
    with pytest.raises(ValidationError, match=name):
        Settings(data_dir=tmp_path, **{name: value})


def test_the_kek_settings_come_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BROKER_KEK_FILE", str(tmp_path / "kek"))
    monkeypatch.setenv("BROKER_KEK_TRANSIT_KEY", "broker-kek")
    settings = Settings(data_dir=tmp_path)
    assert settings.kek_file == tmp_path / "kek" and settings.kek_transit_key == "broker-kek"


def test_a_shared_database_without_a_kek_file_is_refused_before_it_is_opened(
    tmp_path: Path,
) -> None:
    url = "postgresql+psycopg://broker:pw@127.0.0.1:9/broker"  # nothing listens: never reached
    with pytest.raises(ConfigError, match="BROKER_KEK_FILE is not set"):
        build_broker(Settings(data_dir=tmp_path, policy=EXAMPLE_POLICY, database_url=url))
    assert not (tmp_path / "kek").exists()
