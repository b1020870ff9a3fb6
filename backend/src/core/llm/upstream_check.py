"""The startup check of the upstream: one `GET {base}/models`, classified and logged in one line.

It never blocks startup or fails it (the upstream may come up later); `/health/ready` reports its last result.
"""

from __future__ import annotations

import json

import openai
import structlog

from src.core.llm.client import OpenAIClient
from src.core.llm.upstream_errors import is_untrusted_certificate
from src.models.llm import UpstreamState

CHECK_TIMEOUT_SECONDS = 5.0
_KEY_REJECTED_STATUSES = frozenset({401, 403})
_DETAILS: dict[UpstreamState, str] = {
    "ok": "The upstream answered its models list.",
    "key_rejected": "The upstream rejected OPENAI_API_KEY (401/403): chat will answer 500 llm_auth_error.",
    "unreachable": "The upstream could not be reached (connection refused, DNS or timeout).",
    "tls_untrusted": "The upstream's TLS certificate was not trusted (check SSL_CERT_FILE / the OS trust store).",
    "not_openai_compatible": "The upstream did not answer GET /models like an OpenAI-compatible API "
    "(check OPENAI_BASE_URL, e.g. its /v1).",
}


async def check_upstream(client: OpenAIClient) -> UpstreamState:
    """Classify the upstream by its answer to the models list, and log the result once."""
    state, status = await _probe(client)
    log = structlog.get_logger("startup")
    emit = log.info if state == "ok" else log.warning
    emit("upstream_check", state=state, upstream=client.base_url, upstream_status=status, detail=_DETAILS[state])
    return state


async def _probe(client: OpenAIClient) -> tuple[UpstreamState, int | None]:
    try:
        response = await client.list_models(timeout_seconds=CHECK_TIMEOUT_SECONDS)
    except openai.APIStatusError as exc:
        state: UpstreamState = "key_rejected" if exc.status_code in _KEY_REJECTED_STATUSES else "not_openai_compatible"
        return state, exc.status_code
    except openai.APIConnectionError as exc:
        return ("tls_untrusted" if is_untrusted_certificate(exc) else "unreachable"), None
    try:
        listing = json.loads(response.content)
    except ValueError:
        return "not_openai_compatible", response.status_code
    if isinstance(listing, dict) and isinstance(listing.get("data"), list):
        return "ok", response.status_code
    return "not_openai_compatible", response.status_code
