"""Service keys: who may call, by name, with which models and limits (SERVICE_KEYS_FILE, SERVICE_API_KEYS).

The keys file is TOML and holds only each key's SHA-256, never the key, so it can be committed:

    [[keys]]
    name = "web-frontend"            # in logs, metrics and the ledger; never the key itself
    sha256 = "<hex sha256 of the key>"
    models = ["gpt-5-mini"]          # optional allowlist (else LLM_ALLOWED_MODELS applies)
    requests_per_minute = 600        # each limit optional
    tokens_per_minute = 200000
    tokens_per_day = 5000000         # a budget, reset at 00:00 UTC

Keys from SERVICE_API_KEYS are unlimited and named `SERVICE_API_KEYS#1`, `#2`, ... in that order. A presented
bearer is hashed and looked up by its digest: the lookup's timing depends on a SHA-256 the caller cannot steer.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from src.core.limits import KeyLimits

KEY_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
SHA256_PATTERN = re.compile(r"[0-9a-fA-F]{64}")
ENV_KEY_NAME = "SERVICE_API_KEYS#{index}"
# The name calls get when the service has no keys; no key may take it (logs, metrics and the ledger would mix).
ANONYMOUS_NAME = "anonymous"
LIMIT_FIELDS = ("requests_per_minute", "tokens_per_minute", "tokens_per_day")
KNOWN_FIELDS = frozenset({"name", "sha256", "models", *LIMIT_FIELDS})


class KeysFileError(ValueError):
    """The keys file cannot be used; the message names the file, the line and the field."""


@dataclass(frozen=True, slots=True)
class ServiceKey:
    """A caller's key as the service knows it: its name, its model allowlist (empty: the service's) and limits."""

    name: str
    models: frozenset[str] = frozenset()
    limits: KeyLimits = field(
        default_factory=lambda: KeyLimits(requests_per_minute=None, tokens_per_minute=None, tokens_per_day=None)
    )


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyRing:
    """Every accepted bearer key, by the SHA-256 of the key."""

    def __init__(self, keys: Mapping[str, ServiceKey]) -> None:
        self._by_digest = dict(keys)

    @classmethod
    def load(cls, *, keys_file: Path | None, plain_keys: Iterable[str]) -> KeyRing:
        keys: dict[str, ServiceKey] = {}
        for index, key in enumerate(plain_keys, start=1):
            keys[key_digest(key)] = ServiceKey(name=ENV_KEY_NAME.format(index=index))
        if keys_file is not None:
            for digest, service_key in parse_keys_file(keys_file).items():
                if digest in keys:
                    raise KeysFileError(f"{keys_file}: key {service_key.name!r} is also in SERVICE_API_KEYS")
                keys[digest] = service_key
        return cls(keys)

    def __bool__(self) -> bool:
        return bool(self._by_digest)

    def __len__(self) -> int:
        return len(self._by_digest)

    def find(self, presented: str) -> ServiceKey | None:
        return self._by_digest.get(key_digest(presented))


def parse_keys_file(path: Path) -> dict[str, ServiceKey]:
    """The keys of a keys file by digest; a malformed file raises KeysFileError naming the line and field."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise KeysFileError(f"{path}: cannot read the keys file ({exc.strerror})") from exc
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise KeysFileError(f"{path}: not valid TOML: {exc}") from exc
    unknown_tables = sorted(set(document) - {"keys"})
    if unknown_tables:
        raise KeysFileError(f"{path}: unknown top-level field {unknown_tables[0]!r} (only [[keys]] tables)")
    entries = document.get("keys", [])
    if not isinstance(entries, list):
        raise KeysFileError(f"{path}: `keys` must be an array of tables ([[keys]])")
    locator = _Locator(path, text)
    keys: dict[str, ServiceKey] = {}
    names: set[str] = set()
    for index, entry in enumerate(entries):
        service_key, digest = _service_key(entry, index, locator)
        if service_key.name in names:
            raise locator.error(index, "name", f"duplicate key name {service_key.name!r}")
        if digest in keys:
            raise locator.error(index, "sha256", f"the same key appears twice ({keys[digest].name!r})")
        names.add(service_key.name)
        keys[digest] = service_key
    return keys


def _service_key(entry: Any, index: int, locator: _Locator) -> tuple[ServiceKey, str]:
    if not isinstance(entry, dict):
        raise locator.error(index, None, "each [[keys]] entry must be a table")
    for name in sorted(set(entry) - KNOWN_FIELDS):
        raise locator.error(index, name, f"unknown field (known: {', '.join(sorted(KNOWN_FIELDS))})")
    name = entry.get("name")
    if not isinstance(name, str) or not KEY_NAME_PATTERN.fullmatch(name):
        raise locator.error(index, "name", "required: 1-64 characters of letters, digits and . _ : -")
    if name == ANONYMOUS_NAME:
        raise locator.error(index, "name", f"{ANONYMOUS_NAME!r} is reserved for callers of an open service")
    digest = entry.get("sha256")
    if not isinstance(digest, str) or not SHA256_PATTERN.fullmatch(digest):
        raise locator.error(index, "sha256", "required: the key's SHA-256 as 64 hex digits (never the key itself)")
    models = entry.get("models", [])
    if not isinstance(models, list) or not all(isinstance(model, str) and model for model in models):
        raise locator.error(index, "models", "must be a list of model names")
    limits: dict[str, int | None] = {}
    for limit in LIMIT_FIELDS:
        value = entry.get(limit)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise locator.error(index, limit, "must be a whole number >= 1 (leave it out for no limit)")
        limits[limit] = value
    service_key = ServiceKey(
        name=name,
        models=frozenset(models),
        limits=KeyLimits(
            requests_per_minute=limits["requests_per_minute"],
            tokens_per_minute=limits["tokens_per_minute"],
            tokens_per_day=limits["tokens_per_day"],
        ),
    )
    return service_key, digest.lower()


class _Locator:
    """Line numbers for messages: tomllib reports them for syntax errors only, so find the field in the text."""

    def __init__(self, path: Path, text: str) -> None:
        self._path = path
        self._lines = text.splitlines()
        self._tables = [number for number, line in enumerate(self._lines, start=1) if line.strip() == "[[keys]]"]

    def error(self, index: int, field_name: str | None, message: str) -> KeysFileError:
        start = self._tables[index] if index < len(self._tables) else 1
        end = self._tables[index + 1] if index + 1 < len(self._tables) else len(self._lines) + 1
        line = start
        if field_name is not None:
            pattern = re.compile(rf"\s*{re.escape(field_name)}\s*=")
            line = next((n for n in range(start, end) if pattern.match(self._lines[n - 1])), start)
        where = f"{self._path}:{line}: [[keys]] #{index + 1}"
        return KeysFileError(f"{where}: field {field_name!r}: {message}" if field_name else f"{where}: {message}")


ANONYMOUS = ServiceKey(name=ANONYMOUS_NAME)
ADMIN_KEY_NAME = "ADMIN_API_KEYS#{index}"


@dataclass(frozen=True, slots=True)
class Access:
    """Who may call what: chat keys (SERVICE_KEYS_FILE, SERVICE_API_KEYS) and operator keys (ADMIN_API_KEYS)."""

    chat: KeyRing
    admin: KeyRing

    @property
    def open(self) -> bool:
        """No keys at all: a local setup (`make demo`) where chat and the operator endpoints are open."""
        return not self.chat and not self.admin


def load_access(*, keys_file: Path | None, service_api_keys: Iterable[str], admin_api_keys: Iterable[str]) -> Access:
    """Both key rings; a key may not be both a chat key and an operator key."""
    chat = KeyRing.load(keys_file=keys_file, plain_keys=service_api_keys)
    admin_keys: dict[str, ServiceKey] = {}
    for index, key in enumerate(admin_api_keys, start=1):
        if chat.find(key) is not None:
            raise KeysFileError(f"ADMIN_API_KEYS #{index} is also a chat key: operator keys must differ from chat keys")
        admin_keys[key_digest(key)] = ServiceKey(name=ADMIN_KEY_NAME.format(index=index))
    return Access(chat=chat, admin=KeyRing(admin_keys))
