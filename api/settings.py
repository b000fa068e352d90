"""Settings from environment variables, overridable by CLI flags, validated at start."""

from __future__ import annotations

import os
from decimal import Decimal
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "creditpool"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CREDITPOOL_", extra="ignore", populate_by_name=True)

    database_url: str | None = Field(
        default=None, validation_alias=AliasChoices("database_url", "DATABASE_URL"),
        description="PostgreSQL URL; unset means the embedded PostgreSQL in the data directory",
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    data_dir: Path = Field(default_factory=default_data_dir)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    workers: int = Field(default=1, ge=1, le=64)
    graphiql: bool = True
    db_pool_size: int = Field(default=10, ge=1, le=200)
    db_acquire_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    max_query_depth: int = Field(default=12, ge=2, le=100)
    max_aliases: int = Field(default=15, ge=1, le=1000)
    max_tokens: int = Field(default=2000, ge=100, le=100_000)
    # Share of a hold kept when a generation fails for a policy violation (technical failures
    # and cancellations are always free). Decimal, never float: it is on the money path.
    policy_violation_fee_percent: Decimal = Field(default=Decimal("10"), ge=0, le=100)
    # Holds older than this are released and their generation marked TIMED_OUT.
    hold_ttl_seconds: int = Field(default=3600, ge=60, le=30 * 86400)
    # How often each server process runs the scheduler (period closes, expiry, hold timeouts);
    # 0 turns it off (then run `creditpool tick` from cron).
    scheduler_interval_seconds: int = Field(default=30, ge=0, le=86400)
    # A pending overage request lapses after this many hours.
    overage_request_ttl_hours: int = Field(default=24, ge=1, le=24 * 90)
    # How live events cross processes: auto (in-process for one worker, PostgreSQL LISTEN/NOTIFY
    # for several), memory://, postgres (the service's own database), or redis://host:port.
    broadcast_url: str = "auto"
    live_recheck_seconds: float = Field(default=2.0, gt=0, le=60)
    # How often the listening connection (PostgreSQL) must answer a probe; one that does not is
    # replaced, as one that closed is.
    live_probe_seconds: float = Field(default=15.0, gt=0, le=300)
    balance_debounce_ms: int = Field(default=50, ge=0, le=5000)

    @field_validator("broadcast_url")
    @classmethod
    def _known_broadcast(cls, v: str) -> str:
        if v not in ("auto", "postgres", "memory://") and not v.startswith(("redis://", "rediss://")):
            raise ValueError("must be auto, postgres, memory:// or a redis:// URL")
        return v

    @field_validator("database_url", mode="before")
    @classmethod
    def _postgres_only(cls, v: object) -> object:
        if v is None or (isinstance(v, str) and not v.strip()):
            return None  # an empty DATABASE_URL= means unset: use the embedded PostgreSQL
        if isinstance(v, str) and not v.startswith(("postgresql://", "postgres://", "postgresql+asyncpg://")):
            raise ValueError("must start with postgresql://")
        return v

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, v: object) -> object:
        return v.lower() if isinstance(v, str) else v


ENV_NAMES = {
    "database_url": "DATABASE_URL",
    **{name: f"CREDITPOOL_{name.upper()}" for name in Settings.model_fields if name != "database_url"},
}


def load_settings(**overrides: object) -> Settings:
    """Environment, then CLI flags (those not None) on top. Raises SystemExit with a readable
    message naming the variable when a value is invalid."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else "?"
            lines.append(f"  {ENV_NAMES.get(field, field)} / --{field.replace('_', '-')}: {err['msg']}")
        raise SystemExit("invalid configuration:\n" + "\n".join(lines)) from None
