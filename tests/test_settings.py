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
