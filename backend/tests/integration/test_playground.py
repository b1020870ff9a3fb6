"""GET /playground in-process: off by default (404 in the envelope), and the page's security headers when on."""

from __future__ import annotations

import base64
import hashlib
from html.parser import HTMLParser

from src.api.playground import PAGE_PATH, load_page
from src.core.config import REPO_ROOT
from tests.conftest import SERVICE_KEY, OpenClient, make_settings


class _PageScan(HTMLParser):
    """The page's inline `<script>`/`<style>` texts, and every attribute that could load something."""

    def __init__(self) -> None:
        super().__init__()
        self.inline: dict[str, list[str]] = {"script": [], "style": []}
        self.loads: list[str] = []
        self._open: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.inline:
            assert not attrs, f"<{tag}> with attributes: {attrs}"
            self._open = tag
            self.inline[tag].append("")
        self.loads += [value or "" for name, value in attrs if name in {"src", "href", "action", "srcset"}]

    def handle_endtag(self, tag: str) -> None:
        if tag == self._open:
            self._open = None

    def handle_data(self, data: str) -> None:
        if self._open is not None:
            self.inline[self._open][-1] += data


def _sha256_source(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


async def test_playground_is_not_found_when_disabled(app_client: OpenClient) -> None:
    async with app_client(make_settings()) as (client, app, _):
        response = await client.get(PAGE_PATH)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    assert PAGE_PATH not in {getattr(route, "path", None) for route in app.routes}


async def test_playground_page_has_a_strict_policy_matching_its_inline_code(app_client: OpenClient) -> None:
    async with app_client(make_settings(playground_enabled=True)) as (client, _, _):
        response = await client.get(PAGE_PATH)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert response.headers["x-content-type-options"] == "nosniff"
    policy = {}
    for directive in response.headers["content-security-policy"].split("; "):
        name, _, sources = directive.partition(" ")
        policy[name] = sources
    scan = _PageScan()
    scan.feed(response.text)
    assert len(scan.inline["script"]) == 1
    assert len(scan.inline["style"]) == 1
    # Exactly the page's own blocks may run: no 'unsafe-inline', no other source.
    assert policy["script-src"] == _sha256_source(scan.inline["script"][0])
    assert policy["style-src"] == _sha256_source(scan.inline["style"][0])
    assert policy["default-src"] == "'none'"
    assert policy["connect-src"] == "'self'"
    assert policy["img-src"] == "data:"
    assert policy["frame-ancestors"] == "'none'"
    # Nothing is loaded from anywhere: the only loadable attribute is the empty data: icon.
    assert scan.loads == ["data:,"]


async def test_playground_is_open_when_service_keys_are_set(app_client: OpenClient) -> None:
    """The page holds no secret; the chat calls it makes carry the key typed into it."""
    settings = make_settings(playground_enabled=True, service_api_keys=[SERVICE_KEY])
    async with app_client(settings) as (client, _, _):
        page = await client.get(PAGE_PATH)
        chat = await client.post("/api/v1/llm/chat", json={"messages": [{"role": "user", "content": "hi"}]})
    assert page.status_code == 200
    assert chat.status_code == 401


async def test_playground_is_not_in_the_openapi_document(app_client: OpenClient) -> None:
    async with app_client(make_settings(playground_enabled=True)) as (client, _, _):
        document = (await client.get("/openapi.json")).json()
    assert PAGE_PATH not in document["paths"]


def test_readme_stream_parser_is_the_pages_own() -> None:
    """The README's JavaScript reference for frontend developers is the code the page runs, not a second copy."""

    def parser(text: str) -> str:
        start = text.index("async function* readServerSentEvents(body) {")
        return text[start : text.index("\n}\n", start)]

    assert parser((REPO_ROOT / "README.md").read_text()) == parser(load_page().html)
