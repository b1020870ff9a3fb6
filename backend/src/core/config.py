"""Service settings: one validated, cached object read from the environment and the repository's `.env`."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# backend/src/core/config.py -> the repository root, so `.env` is found whatever the working directory.
REPO_ROOT = Path(__file__).resolve().parents[3]
ENV_FILE = REPO_ROOT / ".env"
# Names another settings file, or none at all when empty: test servers and `make demo` set it empty so that a
# developer's `.env` cannot change what they run.
ENV_FILE_VARIABLE = "LLM_ENV_FILE"
# The usage ledger when DATABASE_URL is unset: a SQLite file, created on start.
DEFAULT_DATABASE_URL = f"sqlite:///{REPO_ROOT / 'data' / 'llm-service.db'}"

CommaList = Annotated[list[str], NoDecode]


def _split_commas(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    """Every setting of the service; each one is documented in `.env.example`."""

    model_config = SettingsConfigDict(
        env_file=ENV_FILE,
        env_file_encoding="utf-8",
        extra="ignore",
        case_sensitive=False,
        # `OPENAI_API_KEY=` in a .env means "unset", not "the empty key".
        env_ignore_empty=True,
    )

    openai_api_key: SecretStr | None = None
    openai_base_url: str | None = None
    llm_default_model: str = Field(default="gpt-5-mini", min_length=1)
    llm_allowed_models: CommaList = Field(default_factory=list)
    # Reasoning models think for minutes before a batch answer or a first token; see README "Timeouts".
    llm_timeout_seconds: float = Field(default=600.0, gt=0)
    llm_connect_timeout_seconds: float = Field(default=5.0, gt=0)
    llm_max_retries: int = Field(default=2, ge=0, le=10)
    llm_max_retry_wait_seconds: float = Field(default=5.0, ge=0)
    llm_max_connections: int = Field(default=1000, ge=1)
    llm_pool_timeout_seconds: float = Field(default=1.0, ge=0)
    llm_stream_keepalive_seconds: float = Field(default=15.0, gt=0)
    llm_stream_send_timeout_seconds: float = Field(default=30.0, gt=0)
    llm_shutdown_grace_seconds: float = Field(default=20.0, ge=0)
    llm_startup_check: bool = True
    service_api_keys: CommaList = Field(default_factory=list, repr=False)
    service_keys_file: Path | None = None
    admin_api_keys: CommaList = Field(default_factory=list, repr=False)
    # Tokens reserved against a key's limits for a call that sets no max_tokens (settled to the real usage after).
    llm_default_token_reserve: int = Field(default=4096, ge=1)
    # Resumable streams: how long a stream's events are kept after it ends, and the memory they may take.
    llm_resume_ttl_seconds: float = Field(default=600.0, gt=0)
    llm_resume_max_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    llm_resume_total_bytes: int = Field(default=256 * 1024 * 1024, ge=1024)
    database_url: str = Field(default=DEFAULT_DATABASE_URL, min_length=1, repr=False)
    redis_url: str | None = Field(default=None, repr=False)
    metrics_dir: Path | None = None
    cors_allow_origins: CommaList = Field(default_factory=list)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_format: Literal["json", "console"] = "json"
    log_prompts: bool = False
    # Room for a few phone photos as data URLs (base64 adds a third): 32 MiB.
    max_request_bytes: int = Field(default=32 * 1024 * 1024, ge=1)
    llm_demo_upstream: bool = False

    @field_validator("llm_allowed_models", "service_api_keys", "admin_api_keys", "cors_allow_origins", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        return _split_commas(value)

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _normalise_case(cls, value: object) -> object:
        if isinstance(value, str):
            return (
                value.upper() if value.lower() in {"debug", "info", "warning", "error", "critical"} else value.lower()
            )
        return value

    @field_validator("openai_api_key", "redis_url", "service_keys_file", "metrics_dir", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():
            return None
        return value


def settings_file() -> Path | None:
    """The settings file: `LLM_ENV_FILE` when it is set (empty: none), else the repository's `.env`."""
    configured = os.environ.get(ENV_FILE_VARIABLE)
    if configured is None:
        return ENV_FILE
    return Path(configured) if configured.strip() else None


@lru_cache
def get_settings() -> Settings:
    return Settings(_env_file=settings_file())
