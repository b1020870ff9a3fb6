"""The committed OpenAPI contract must be what the app serves (`make openapi` regenerates it)."""

from __future__ import annotations

from src.devtools.openapi import CONTRACT_PATH, render_openapi, to_yaml


def test_committed_openapi_matches_the_app() -> None:
    assert CONTRACT_PATH.read_text() == render_openapi(), "run `make openapi` and commit the result"


def test_yaml_emitter_quotes_strings_and_nests() -> None:
    assert to_yaml({"a": [{"b": 1, "c": None}], "d": {}, "e": "x: y"}) == (
        '"a":\n  - "b": 1\n    "c": null\n"d": {}\n"e": "x: y"\n'
    )
