"""Settings: environment first, CLI flags on top, clear errors naming the variable."""

import pytest

from api.settings import load_settings


def test_empty_database_url_means_the_embedded_postgres(monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "")
    assert load_settings().database_url is None


def test_flags_override_the_environment(monkeypatch):
    monkeypatch.setenv("CREDITPOOL_PORT", "9000")
    monkeypatch.setenv("CREDITPOOL_LOG_LEVEL", "WARNING")
    settings = load_settings(port="9100")
    assert settings.port == 9100 and settings.log_level == "warning"


def test_policy_violation_fee_must_be_a_percentage(monkeypatch):
    monkeypatch.setenv("CREDITPOOL_POLICY_VIOLATION_FEE_PERCENT", "150")
    with pytest.raises(SystemExit, match="CREDITPOOL_POLICY_VIOLATION_FEE_PERCENT"):
        load_settings()


def test_live_events_cross_processes_through_postgres_when_there_are_several_workers():
    from api.live import broadcast_url

    db = "postgresql+asyncpg://u@/db?host=/tmp/x"
    assert broadcast_url("auto", db, workers=1) == "memory://"
    assert broadcast_url("auto", db, workers=4) == "postgresql://u@/db?host=/tmp/x"
    assert broadcast_url("postgres", db, workers=1) == "postgresql://u@/db?host=/tmp/x"
    assert broadcast_url("redis://r:6379", db, workers=4) == "redis://r:6379"


def test_an_unknown_broadcaster_is_refused(monkeypatch):
    monkeypatch.setenv("CREDITPOOL_BROADCAST_URL", "kafka://x")
    with pytest.raises(SystemExit, match="CREDITPOOL_BROADCAST_URL"):
        load_settings()
