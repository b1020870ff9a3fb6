"""Structured logging: one structlog chain for our events and for stdlib records (uvicorn's included)."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from typing import Any, Literal

import orjson
import structlog
from structlog.typing import Processor

LogFormat = Literal["json", "console"]

# Libraries whose DEBUG output would repeat request options or headers; they never log below WARNING.
_QUIET_LOGGERS = ("openai", "httpx", "httpcore", "aiohttp", "asyncio")
# uvicorn's access log is replaced by our own canonical request line (api.middleware).
_UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")


class _CurrentStdout:
    """Writes to whatever `sys.stdout` is at write time (test capture and redirection replace it after setup)."""

    def write(self, text: str) -> int:
        return sys.stdout.write(text)

    def flush(self) -> None:
        sys.stdout.flush()


_STDOUT = _CurrentStdout()


def _shared_processors() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]


def _orjson_dumps(value: Any, default: Callable[[Any], Any] | None = None, **_: Any) -> str:
    # Non-string keys become strings (as json.dumps does); text stays UTF-8 rather than \u escapes.
    try:
        return orjson.dumps(value, default=default, option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:
        # What orjson refuses (an integer past 64 bits, a lone surrogate in an upstream's message) is written the way
        # the standard library writes it, ASCII-escaped: a log line must never be what fails a call.
        return json.dumps(value, default=default)


def _renderer(fmt: LogFormat) -> Processor:
    if fmt == "console":
        return structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())
    # structlog's own renderer (its fallback for unknown types: `__structlog__`, else repr), serialized by orjson.
    return structlog.processors.JSONRenderer(serializer=_orjson_dumps)


def configure_logging(*, level: str, fmt: LogFormat) -> None:
    """Route structlog and stdlib logging to stdout as one stream of JSON (or console) lines.

    Our own events go straight from structlog to stdout (no stdlib round trip on the hot path); stdlib records
    from uvicorn and libraries go through `ProcessorFormatter` with the same processors, so every line has the
    same shape. Idempotent: calling it again replaces the previous configuration.
    """
    numeric_level = logging.getLevelNamesMapping()[level.upper()]
    shared = _shared_processors()
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info,
            _renderer(fmt),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.WriteLoggerFactory(file=_STDOUT),  # type: ignore[arg-type]
        # Not cached: hot-path loggers are bound once by their owners (service, middleware) when the app is
        # built, and a reconfiguration (a new app in tests) must reach module-level loggers too.
        cache_logger_on_first_use=False,
    )

    handler = logging.StreamHandler(_STDOUT)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                _renderer(fmt),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(numeric_level)
    for name in _UVICORN_LOGGERS:
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers = []
        uvicorn_logger.propagate = True
    logging.getLogger("uvicorn.access").disabled = True
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(numeric_level, logging.WARNING))
