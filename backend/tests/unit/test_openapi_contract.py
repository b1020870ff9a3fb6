"""The committed OpenAPI contract must be what the app serves (`make openapi` regenerates it)."""

from __future__ import annotations

import yaml

from src.devtools.openapi import CONTRACT_PATH, render_openapi
from src.main import create_app
from tests.conftest import make_settings


def test_committed_openapi_matches_the_app() -> None:
    assert CONTRACT_PATH.read_text() == render_openapi(), "run `make openapi` and commit the result"


def test_committed_openapi_is_the_apps_document_as_yaml() -> None:
    committed = yaml.safe_load(CONTRACT_PATH.read_text())
    assert committed == create_app(make_settings()).openapi()
