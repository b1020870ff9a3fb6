"""Settings sources and validation; the logging chain for our events and for uvicorn's records."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import structlog
from pydantic import ValidationError

from src.core import config
from src.core.config import Settings
from src.utils.logging import configure_logging


def test_defaults_match_the_contract() -> None:
    settings = Settings(_env_file=None)
    assert settings.openai_api_key is None
    assert settings.llm_default_model == "gpt-5-mini"
    assert settings.llm_allowed_models == []
    assert settings.llm_timeout_seconds == 600
    assert settings.llm_connect_timeout_seconds == 5
    assert settings.llm_max_retries == 2
    assert settings.llm_max_retry_wait_seconds == 5
    assert settings.llm_stream_keepalive_seconds == 15
    assert settings.llm_stream_send_timeout_seconds == 30
    assert settings.llm_shutdown_grace_seconds == 20
    assert settings.service_api_keys == []
    assert (settings.log_level, settings.log_format, settings.log_prompts) == ("INFO", "json", False)
    assert settings.max_request_bytes == 32 * 1024 * 1024
    assert (settings.llm_resume_ttl_seconds, settings.llm_resume_max_bytes) == (600, 8 * 1024 * 1024)
    assert settings.llm_resume_total_bytes == 256 * 1024 * 1024


def test_env_file_at_repo_root_is_read_whatever_the_cwd_and_env_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("OPENAI_API_KEY=sk-from-file\nLLM_DEFAULT_MODEL=from-file\nLLM_ALLOWED_MODELS=a, b,,c\n")
    monkeypatch.setitem(Settings.model_config, "env_file", env_file)
    monkeypatch.chdir(tmp_path.parent)
    monkeypatch.setenv("LLM_DEFAULT_MODEL", "from-env")

    settings = Settings()

    assert settings.openai_api_key is not None
    assert settings.openai_api_key.get_secret_value() == "sk-from-file"
    assert settings.llm_default_model == "from-env"
    assert settings.llm_allowed_models == ["a", "b", "c"]


def test_env_file_default_location_is_the_repository_root() -> None:
    assert config.ENV_FILE == config.REPO_ROOT / ".env"
    assert (config.REPO_ROOT / ".env.example").is_file()


def test_every_setting_is_documented_in_env_example() -> None:
    documented = (config.REPO_ROOT / ".env.example").read_text()
    for name in Settings.model_fields:
        assert f"{name.upper()}=" in documented, name


def test_blank_api_key_counts_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "  ")
    assert Settings(_env_file=None).openai_api_key is None


@pytest.mark.parametrize(
    ("name", "value"),
    [("LOG_FORMAT", "xml"), ("LOG_LEVEL", "LOUD"), ("LLM_TIMEOUT_SECONDS", "0"), ("MAX_REQUEST_BYTES", "lots")],
)
def test_invalid_setting_fails_loudly(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=name.lower()):
        Settings(_env_file=None)


def test_secrets_are_not_in_settings_repr() -> None:
    settings = Settings(_env_file=None, openai_api_key="sk-very-secret", service_api_keys="svc-secret")
    assert "sk-very-secret" not in repr(settings)
    assert "svc-secret" not in repr(settings)


def test_uvicorn_records_are_rendered_as_json_and_access_log_is_off(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(level="INFO", fmt="json")
    logging.getLogger("uvicorn.error").info("Started server process [%d]", 42)
    logging.getLogger("uvicorn.access").info("127.0.0.1 - GET / 200")
    structlog.get_logger("x").info("ours", n=1)

    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    assert [line["event"] for line in lines] == ["Started server process [42]", "ours"]
    assert all(line["level"] == "info" and "timestamp" in line for line in lines)


def test_json_lines_keep_text_as_utf8_and_render_any_value(capsys: pytest.CaptureFixture[str]) -> None:
    """orjson renders the lines: text as is, non-string keys as strings, unknown types by structlog's repr fallback."""
    configure_logging(level="INFO", fmt="json")

    class Opaque:
        def __repr__(self) -> str:
            return "<opaque>"

    structlog.get_logger("x").info("héllo ✓", counts={1: "one"}, thing=Opaque())
    out = capsys.readouterr().out
    assert "héllo ✓" in out
    line = json.loads(out)
    assert (line["event"], line["counts"], line["thing"]) == ("héllo ✓", {"1": "one"}, "<opaque>")
    # orjson refuses integers past 64 bits and lone surrogates; the line is written anyway, and can be printed.
    structlog.get_logger("x").info("usage", prompt_tokens=10**30, message="broken \ud83d emoji")
    out = capsys.readouterr().out
    out.encode("utf-8")
    assert json.loads(out)["prompt_tokens"] == 10**30
    assert json.loads(out)["message"] == "broken \ud83d emoji"


def test_console_format_is_not_json(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(level="INFO", fmt="console")
    structlog.get_logger("x").info("hello", n=1)
    out = capsys.readouterr().out
    assert "hello" in out
    assert not out.startswith("{")
    configure_logging(level="INFO", fmt="json")
