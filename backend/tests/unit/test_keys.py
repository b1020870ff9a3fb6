"""Service keys: the keys file (hashes only), its error messages, SERVICE_API_KEYS, admin keys, the `keys` CLI."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from src.cli import keys as keys_cli
from src.core.keys import KeyRing, KeysFileError, key_digest, load_access, parse_keys_file

FRONTEND_KEY = "llmsvc-frontend-secret"
BATCH_KEY = "llmsvc-batch-secret"


def _file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "keys.toml"
    path.write_text(text)
    return path


def test_a_keys_file_names_keys_with_their_models_and_limits(tmp_path: Path) -> None:
    path = _file(
        tmp_path,
        f"""
[[keys]]
name = "web-frontend"
sha256 = "{key_digest(FRONTEND_KEY)}"
models = ["gpt-5-mini"]
requests_per_minute = 600
tokens_per_minute = 200000
tokens_per_day = 5000000

[[keys]]
name = "batch-jobs"
sha256 = "{key_digest(BATCH_KEY).upper()}"
""",
    )
    ring = KeyRing.load(keys_file=path, plain_keys=["plain-one", "plain-two"])
    frontend = ring.find(FRONTEND_KEY)
    assert frontend is not None
    assert frontend.name == "web-frontend"
    assert frontend.models == frozenset({"gpt-5-mini"})
    assert (frontend.limits.requests_per_minute, frontend.limits.tokens_per_minute) == (600, 200_000)
    assert frontend.limits.tokens_per_day == 5_000_000
    batch = ring.find(BATCH_KEY)
    assert batch is not None
    assert batch.name == "batch-jobs"
    assert not batch.limits.limited
    assert not batch.models
    second_plain = ring.find("plain-two")
    assert second_plain is not None
    assert second_plain.name == "SERVICE_API_KEYS#2"
    assert ring.find("not-a-key") is None
    assert ring.find(key_digest(FRONTEND_KEY)) is None  # the digest itself is not a key
    assert len(ring) == 4


MALFORMED = {
    "limit_not_a_number": (
        '[[keys]]\nname = "a"\nsha256 = "{digest}"\nrequests_per_minute = "ten"\n',
        4,
        "requests_per_minute",
    ),
    "limit_zero": ('[[keys]]\nname = "a"\nsha256 = "{digest}"\n\ntokens_per_day = 0\n', 5, "tokens_per_day"),
    "plain_key_instead_of_hash": ('[[keys]]\nname = "a"\nsha256 = "llmsvc-the-key-itself"\n', 3, "sha256"),
    "missing_name": ('[[keys]]\nsha256 = "{digest}"\n', 1, "name"),
    "unknown_field": ('[[keys]]\nname = "a"\nsha256 = "{digest}"\nrpm = 5\n', 4, "rpm"),
    "reserved_name": ('[[keys]]\nname = "anonymous"\nsha256 = "{digest}"\n', 2, "name"),
    "models_not_a_list": ('[[keys]]\nname = "a"\nsha256 = "{digest}"\nmodels = "gpt-5"\n', 4, "models"),
    "duplicate_name": (
        '[[keys]]\nname = "a"\nsha256 = "{digest}"\n[[keys]]\nname = "a"\nsha256 = "{other}"\n',
        5,
        "name",
    ),
}


@pytest.mark.parametrize(("text", "line", "field"), MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_keys_file_is_refused_naming_the_line_and_field(
    tmp_path: Path, text: str, line: int, field: str
) -> None:
    path = _file(tmp_path, text.format(digest=key_digest("k1"), other=key_digest("k2")))
    with pytest.raises(KeysFileError) as raised:
        parse_keys_file(path)
    message = str(raised.value)
    assert f"{path}:{line}:" in message
    assert f"'{field}'" in message


def test_invalid_toml_says_where(tmp_path: Path) -> None:
    with pytest.raises(KeysFileError, match=r"line 2"):
        parse_keys_file(_file(tmp_path, '[[keys]]\nname = "a\n'))


def test_a_missing_keys_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(KeysFileError, match="cannot read"):
        parse_keys_file(tmp_path / "nope.toml")


def test_admin_keys_are_separate_from_chat_keys(tmp_path: Path) -> None:
    access = load_access(keys_file=None, service_api_keys=["chat-1"], admin_api_keys=["admin-1"])
    assert access.chat.find("chat-1") is not None
    assert access.chat.find("admin-1") is None
    assert access.admin.find("admin-1") is not None
    assert access.admin.find("chat-1") is None
    assert not access.open
    assert load_access(keys_file=None, service_api_keys=[], admin_api_keys=[]).open
    with pytest.raises(KeysFileError, match="ADMIN_API_KEYS #1 is also a chat key") as raised:
        load_access(keys_file=None, service_api_keys=["same"], admin_api_keys=["same"])
    assert "same" not in str(raised.value).replace("#1 is also", "")


def test_the_cli_prints_a_fresh_key_once_and_its_toml_block(tmp_path: Path) -> None:
    out = io.StringIO()
    assert keys_cli.main(["new", "web-frontend"], out=out) == 0
    printed = out.getvalue()
    key = re.search(r"(llmsvc-[A-Za-z0-9_-]{40,})", printed)
    assert key is not None
    assert printed.count(key.group(1)) == 1
    block = printed.split("# append to SERVICE_KEYS_FILE:\n", 1)[1]
    found = KeyRing.load(keys_file=_file(tmp_path, block), plain_keys=[]).find(key.group(1))
    assert found is not None
    assert found.name == "web-frontend"
    second = io.StringIO()
    keys_cli.main(["new", "other"], out=second)
    assert key.group(1) not in second.getvalue()


def test_the_cli_refuses_a_bad_name() -> None:
    err = io.StringIO()
    assert keys_cli.main(["new", "has space"], out=io.StringIO(), err=err) == 2
    assert "invalid name" in err.getvalue()
