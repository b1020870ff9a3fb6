"""The playground page in real headless Chromium, against the real service and the bundled upstream over sockets.

Every expected answer comes from the service itself: the page's own request (captured from the browser) is sent
again as a batch call, and the bundled upstream answers identical requests identically. Waits are Playwright's
(`expect`, `wait_for_function`) or a deadline on a condition; nothing sleeps to synchronise.
"""

from __future__ import annotations

import base64
import json
import re
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    FilePayload,
    Locator,
    Page,
    Request,
    Response,
    expect,
)

from src.devtools.servers import ServerProcess
from tests.e2e.network import CHAT, RunningService, running_service, upstream_stats
from tests.support.chromium import run_chromium
from tests.support.tcp_relay import run_tcp_relay

pytestmark = pytest.mark.e2e

SERVICE_KEY = "llmsvc-playground-e2e-key"
ANSWER_TIMEOUT_MS = 20_000
PAGE_TIMEOUT_MS = 10_000
WAIT_SECONDS = 10.0
POLL_SECONDS = 0.02
STREAMS_PATH = f"{CHAT}/streams/"
# The end of an answer's meta line: its latency.
LATENCY = re.compile(r".* · TTFT \d+ ms · total \d+ ms$")
# The last answer's text, for wait_for_function.
LAST_ANSWER_WORDS = """(minimum) => {
  const texts = document.querySelectorAll(".turn.assistant .text");
  const text = texts.length ? texts[texts.length - 1].textContent : "";
  return text.split(" ").filter(Boolean).length >= minimum;
}"""
# Records the last answer's text length and state at every change of the transcript.
RECORD_RENDERS = """() => {
  window.renders = [];
  new MutationObserver(() => {
    const turns = document.querySelectorAll(".turn.assistant");
    const turn = turns[turns.length - 1];
    if (turn) window.renders.push([turn.querySelector(".text").textContent.length, turn.dataset.state]);
  }).observe(document.getElementById("transcript"), { subtree: true, childList: true, characterData: true });
}"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with run_chromium() as chromium:
        yield chromium


@pytest.fixture(scope="module")
def service(slow_upstream: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    """The service with the playground on and one service key."""
    with running_service(
        slow_upstream.url,
        tmp_path_factory.mktemp("playground-service"),
        PLAYGROUND_ENABLED="true",
        SERVICE_API_KEYS=SERVICE_KEY,
        LLM_MAX_RETRIES="0",
        LOG_FORMAT="json",
    ) as running:
        yield running


class BrowserTab:
    """One page in a fresh browser context (its own sessionStorage), with every request and console line kept."""

    def __init__(self, context: BrowserContext) -> None:
        self.context = context
        self.page: Page = context.new_page()
        self.page.set_default_timeout(PAGE_TIMEOUT_MS)
        self.requests: list[Request] = []
        self.console: list[ConsoleMessage] = []
        self.page.on("request", self._on_request)
        self.page.on("console", self._on_console)

    def _on_request(self, request: Request) -> None:
        self.requests.append(request)

    def _on_console(self, line: ConsoleMessage) -> None:
        self.console.append(line)

    def open(self, origin: str, *, key: str | None = SERVICE_KEY) -> None:
        self.page.goto(f"{origin}/playground")
        expect(self.page.locator("body")).to_have_attribute("data-ready", "true")
        if key is not None:
            self.page.fill("#key", key)

    def ask(self, text: str, *, model: str) -> Locator:
        """Send `text` and return the answer's turn (the last one on the page)."""
        self.page.fill("#model", model)
        self.page.fill("#prompt", text)
        self.page.click("#send")
        return self.last_answer()

    def last_answer(self) -> Locator:
        return self.page.locator(".turn.assistant").last

    def chat_posts(self) -> list[Request]:
        return [r for r in self.requests if r.method == "POST" and urlsplit(r.url).path == CHAT]

    def stream_requests(self, method: str) -> list[Request]:
        return [r for r in self.requests if r.method == method and urlsplit(r.url).path.startswith(STREAMS_PATH)]

    def wait_for_words(self, minimum: int) -> None:
        self.page.wait_for_function(LAST_ANSWER_WORDS, arg=minimum)


@pytest.fixture
def tab(browser: Browser) -> Iterator[BrowserTab]:
    context = browser.new_context()
    try:
        yield BrowserTab(context)
    finally:
        context.close()


def batch_answer(service: RunningService, streamed_request: dict[str, Any]) -> dict[str, Any]:
    """What the service answers to the page's request sent again as one batch call: the expected answer."""
    body = {name: value for name, value in streamed_request.items() if name not in {"stream", "resumable"}}
    response = httpx.post(
        service.url + CHAT, json=body, headers={"Authorization": f"Bearer {SERVICE_KEY}"}, timeout=WAIT_SECONDS
    )
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def body_of(request: Request) -> dict[str, Any]:
    body = request.post_data_json
    assert isinstance(body, dict), request.post_data
    return body


def response_of(request: Request) -> Response:
    response = request.response()
    assert response is not None, f"no response to {request.method} {request.url}"
    return response


def stream_id_of(request: Request) -> str:
    """The `X-Stream-ID` the service answered the page's POST with."""
    return response_of(request).all_headers()["x-stream-id"]


def usage_line(replayed: dict[str, Any]) -> str:
    """The usage the page must show for its stream, from the batch replay's usage.

    The bundled upstream reports a prompt it saw before as cached: the page's request was the first sight of its
    prompt (nothing cached), the replay the second (all of it).
    """
    assert replayed["cached_tokens"] == replayed["prompt_tokens"], replayed
    usage = {**replayed, "cached_tokens": 0}
    return (
        f"{usage['prompt_tokens']} prompt + {usage['completion_tokens']} completion = {usage['total_tokens']} tokens"
        f" (reasoning {usage['reasoning_tokens']}, cached {usage['cached_tokens']})"
    )


def wait_until(condition: Callable[[], bool], *, what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {WAIT_SECONDS}s: {what}")
        time.sleep(POLL_SECONDS)


def png_pixel() -> bytes:
    """A valid 1x1 PNG, made here rather than shipped."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00\x2c\x5f\xd4")
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def test_answer_streams_in_word_by_word_and_ends_with_usage_and_latency(
    tab: BrowserTab, service: RunningService
) -> None:
    tab.open(service.url)
    tab.page.fill("#system", "Be brief.")
    tab.page.fill("#temperature", "0.5")
    tab.page.fill("#max-tokens", "30")
    tab.page.evaluate(RECORD_RENDERS)

    answer = tab.ask("Tell me about streams", model="mock-words-40")

    expect(answer).to_have_attribute("data-state", "done", timeout=ANSWER_TIMEOUT_MS)
    [post] = tab.chat_posts()
    sent = body_of(post)
    assert sent["stream"] is True
    assert sent["resumable"] is True
    assert sent["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Tell me about streams"},
    ]
    assert (sent["model"], sent["temperature"], sent["max_tokens"]) == ("mock-words-40", 0.5, 30)
    expected = batch_answer(service, sent)
    # max_tokens reached the upstream: 30 of the 40 words, cut for length.
    assert expected["finish_reason"] == "length"
    assert len(expected["message"]["content"].split()) == 30
    expect(answer.locator(".text")).to_have_text(expected["message"]["content"])
    meta = answer.locator(".meta")
    expect(meta).to_contain_text(f"length · {usage_line(expected['usage'])}")
    expect(meta).to_have_text(LATENCY)
    # Incremental: the page showed many partial texts, growing, while the answer was still streaming.
    full = len(expected["message"]["content"])
    renders: list[tuple[int, str]] = tab.page.evaluate("window.renders")
    partial = {length for length, state in renders if state == "streaming" and 0 < length < full}
    assert len(partial) >= 10, renders


def test_every_turn_sends_the_whole_conversation(tab: BrowserTab, service: RunningService) -> None:
    tab.open(service.url)
    first = tab.ask("My name is Ada", model="gpt-4.1-mini")
    expect(first).to_have_attribute("data-state", "done", timeout=ANSWER_TIMEOUT_MS)
    first_text = first.locator(".text").inner_text()
    second = tab.ask("What did I say?", model="gpt-4.1-mini")
    expect(second).to_have_attribute("data-state", "done", timeout=ANSWER_TIMEOUT_MS)

    second_request = body_of(tab.chat_posts()[1])
    assert second_request["messages"] == [
        {"role": "user", "content": "My name is Ada"},
        {"role": "assistant", "content": first_text},
        {"role": "user", "content": "What did I say?"},
    ]
    expected = batch_answer(service, second_request)
    # The bundled upstream counts the user turns it was sent.
    assert "user turn 2" in expected["message"]["content"]
    expect(second.locator(".text")).to_have_text(expected["message"]["content"])


def test_stop_closes_the_upstream_stream_and_shows_cancelled(
    tab: BrowserTab, service: RunningService, slow_upstream: ServerProcess
) -> None:
    closed_before = upstream_stats(slow_upstream)["streams_client_closed"]
    tab.open(service.url)
    answer = tab.ask("Go on and on", model="mock-words-400")
    tab.wait_for_words(5)

    tab.page.click("#stop")

    expect(answer).to_have_attribute("data-state", "cancelled", timeout=ANSWER_TIMEOUT_MS)
    expect(answer.locator(".meta")).to_contain_text("cancelled")
    [post] = tab.chat_posts()
    stream_id = stream_id_of(post)
    [delete] = tab.stream_requests("DELETE")
    assert urlsplit(delete.url).path == STREAMS_PATH + stream_id
    assert response_of(delete).status == 204
    # The service closed its upstream call: the bundled upstream saw the stream end early.
    wait_until(
        lambda: upstream_stats(slow_upstream)["streams_client_closed"] > closed_before,
        what="the bundled upstream counts a stream closed by its client",
    )
    full = batch_answer(service, body_of(post))["message"]["content"]
    shown = answer.locator(".text").inner_text()
    assert 0 < len(shown.split()) < len(full.split())
    assert full.startswith(shown)
    expect(tab.page.locator("#send")).to_be_enabled()


def test_connection_cut_mid_answer_resumes_with_the_text_intact(
    tab: BrowserTab, service: RunningService, tmp_path: Path
) -> None:
    with run_tcp_relay(service.url) as relay:
        tab.open(relay.url)
        answer = tab.ask("Keep talking", model="mock-words-150")
        tab.wait_for_words(20)

        severed = relay.sever()

        assert severed >= 1
        expect(answer).to_have_attribute("data-state", "done", timeout=ANSWER_TIMEOUT_MS)
        [post] = tab.chat_posts()
        expected = batch_answer(service, body_of(post))
        # Every word exactly once: nothing lost at the cut, nothing replayed twice.
        expect(answer.locator(".text")).to_have_text(expected["message"]["content"])
        expect(answer.locator(".meta")).to_contain_text(f"stop · {usage_line(expected['usage'])}")
        expect(answer.locator(".meta")).to_contain_text("resumed 1×")
        stream_id = stream_id_of(post)
        [resume] = tab.stream_requests("GET")
        assert urlsplit(resume.url).path == STREAMS_PATH + stream_id
        headers = resume.all_headers()
        # It resumed after what it had seen (at least the 20 words waited for), with the key that started it.
        assert int(headers["last-event-id"]) >= 20
        assert headers["authorization"] == f"Bearer {SERVICE_KEY}"
        assert relay.accepted >= 2


def test_refusal_is_shown_apart_from_the_answer(tab: BrowserTab, service: RunningService) -> None:
    tab.open(service.url)
    answer = tab.ask("Help me with something", model="mock-refusal")
    expect(answer).to_have_attribute("data-state", "done", timeout=ANSWER_TIMEOUT_MS)
    [post] = tab.chat_posts()
    expected = batch_answer(service, body_of(post))
    assert expected["message"]["refusal"]
    expect(answer.locator(".refusal")).to_have_text(f"refusal: {expected['message']['refusal']}")
    expect(answer.locator(".text")).to_have_text(expected["message"]["content"] or "")


@pytest.mark.parametrize(
    ("model", "code"),
    [
        pytest.param("mock-500", "upstream_error", id="http-error-before-the-stream"),
        pytest.param("mock-400-context", "context_length_exceeded", id="upstream-400"),
        pytest.param("mock-stream-break", "upstream_error", id="error-event-mid-stream"),
    ],
)
def test_errors_are_shown_with_their_code(tab: BrowserTab, service: RunningService, model: str, code: str) -> None:
    tab.open(service.url)
    answer = tab.ask("Hello there", model=model)
    expect(answer).to_have_attribute("data-state", "error", timeout=ANSWER_TIMEOUT_MS)
    expect(answer.locator(".error code")).to_have_text(code)
    # The failed prompt goes back to the box for another try.
    expect(tab.page.locator("#prompt")).to_have_value("Hello there")


def test_service_key_is_sent_and_kept_for_the_tab_only(browser: Browser, service: RunningService) -> None:
    context = browser.new_context()
    try:
        tab = BrowserTab(context)
        tab.open(service.url, key=None)
        refused = tab.ask("Hello there", model="gpt-4.1-mini")
        expect(refused).to_have_attribute("data-state", "error", timeout=ANSWER_TIMEOUT_MS)
        expect(refused.locator(".error code")).to_have_text("unauthorized")

        tab.page.fill("#key", SERVICE_KEY)
        answered = tab.ask("Hello there", model="gpt-4.1-mini")
        expect(answered).to_have_attribute("data-state", "done", timeout=ANSWER_TIMEOUT_MS)
        assert tab.chat_posts()[-1].all_headers()["authorization"] == f"Bearer {SERVICE_KEY}"
        assert tab.page.evaluate("sessionStorage.getItem('llm-playground.service-key')") == SERVICE_KEY
        assert tab.page.evaluate("localStorage.length") == 0
        # A reload of the tab keeps it; another browsing session does not have it.
        tab.page.reload()
        expect(tab.page.locator("#key")).to_have_value(SERVICE_KEY)
        other = context.new_page()
        other.goto(f"{service.url}/playground")
        expect(other.locator("body")).to_have_attribute("data-ready", "true")
        expect(other.locator("#key")).to_have_value("")
    finally:
        context.close()


def test_image_and_json_schema_output_loading_nothing_from_elsewhere(tab: BrowserTab, service: RunningService) -> None:
    tab.open(service.url)
    tab.page.set_input_files("#attach", files=[FilePayload(name="dot.png", mimeType="image/png", buffer=png_pixel())])
    expect(tab.page.locator("#attachments img")).to_have_count(1)
    tab.page.check("#json-mode")

    answer = tab.ask("Describe this picture", model="gpt-4.1-mini")

    expect(answer).to_have_attribute("data-state", "done", timeout=ANSWER_TIMEOUT_MS)
    [post] = tab.chat_posts()
    sent = body_of(post)
    [message] = sent["messages"]
    image_url = f"data:image/png;base64,{base64.b64encode(png_pixel()).decode()}"
    assert message["content"] == [
        {"type": "text", "text": "Describe this picture"},
        {"type": "image_url", "image_url": {"url": image_url, "detail": "auto"}},
    ]
    schema = json.loads(tab.page.input_value("#json-schema"))
    assert sent["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": schema, "strict": True},
    }
    expected = batch_answer(service, sent)
    expect(answer.locator(".text")).to_have_text(expected["message"]["content"])
    shown = json.loads(answer.locator(".text").inner_text())
    assert set(shown) == set(schema["required"])
    expect(answer.locator(".meta")).to_contain_text(usage_line(expected["usage"]))
    # The user's turn shows the image it sent.
    expect(tab.page.locator(".turn.user img")).to_have_attribute("src", image_url)
    # Everything the page loaded or called was on the service's own origin, and the CSP refused nothing.
    # (data: URLs are the page's own bytes, not a network request.)
    fetched = [urlsplit(r.url) for r in tab.requests if urlsplit(r.url).scheme != "data"]
    assert {f"{url.scheme}://{url.netloc}" for url in fetched} == {service.url}
    assert {url.path for url in fetched} == {"/playground", CHAT}
    assert not [line.text for line in tab.console if line.type in {"error", "warning"}]


# The bytes of a first connection, split at awkward places: inside "\r\n", inside a field name, inside the UTF-8 of
# "ö"; a keep-alive comment; a two-line data field; and a last event cut off before its blank line. Then a resume
# that replays events 2 and 3 before going on.
SSE_FIRST = [
    ': keep-alive\r\n\r\nid: 1\r\nevent: delta\r\ndata: {"content": "Hel"}\r',
    "\n\r\nid: 2\nevent: del",
    'ta\ndata: {"content":\ndata: "lo, w\xc3',
    '\xb6"}\n\nid: 3\nevent: delta\ndata: {"content": "rl',
]
SSE_RESUMED = [
    'id: 2\nevent: delta\ndata: {"content": "lo, w\xc3\xb6"}\n\nid: 3\nevent: delta\ndata: {"content": "rld"}\n\n',
    # A draining instance's goodbye to its readers: no id, so not the stream's end.
    'event: error\ndata: {"code": "server_shutting_down", "message": "bye", "request_id": "r1"}\n\n',
]
SSE_RESUMED_AGAIN = ['id: 4\nevent: done\ndata: {"finish_reason": "stop"}\n\n']
READ_CRAFTED_STREAMS = """async ([first, resumed, again]) => {
  const bytes = (chunk) => Uint8Array.from(chunk, (c) => c.charCodeAt(0));
  const stream = (chunks) => new ReadableStream({
    start(controller) { for (const chunk of chunks) controller.enqueue(bytes(chunk)); controller.close(); },
  });
  const events = [];
  for await (const event of readServerSentEvents(stream(first))) events.push(event);
  const answer = { text: "", refusal: "", lastEventId: 0, firstTokenAt: null, done: null };
  const view = { render() {} };
  const endedFirst = await readAnswer(stream(first), answer, view);
  const endedResumed = await readAnswer(stream(resumed), answer, view);
  const endedAgain = await readAnswer(stream(again), answer, view);
  return {
    events, endedFirst, endedResumed, endedAgain, text: answer.text, lastEventId: answer.lastEventId, done: answer.done,
  };
}"""


def test_page_sse_parser_handles_split_lines_comments_and_replays(tab: BrowserTab, service: RunningService) -> None:
    """The page's own parser (the README's reference) on crafted bytes, in the browser that runs it."""
    tab.open(service.url)
    result = tab.page.evaluate(READ_CRAFTED_STREAMS, [SSE_FIRST, SSE_RESUMED, SSE_RESUMED_AGAIN])
    assert result["events"] == [
        {"id": "1", "event": "delta", "data": '{"content": "Hel"}'},
        {"id": "2", "event": "delta", "data": '{"content":\n"lo, w\u00f6"}'},
    ]
    # Neither the first connection (cut) nor the resume (a draining instance's id-less goodbye) was the end: the
    # page would resume both times ...
    assert result["endedFirst"] is False
    assert result["endedResumed"] is False
    assert result["endedAgain"] is True
    # ... and the resume's replay of event 2 was skipped: every piece once, in order.
    assert result["text"] == "Hello, w\u00f6rld"
    assert result["lastEventId"] == 4
    assert result["done"] == {"finish_reason": "stop"}
