"""Who is calling and through which route, and what the answer must carry back (the key's rate-limit headers)."""

from __future__ import annotations

from dataclasses import dataclass, field

from src.core.keys import ServiceKey


@dataclass(slots=True)
class CallContext:
    request_id: str
    caller: ServiceKey
    # Which API served the call ("chat": /api/v1/llm/chat; "openai": /v1/chat/completions), for logs and the ledger.
    route: str = "chat"
    # Filled by the service: OpenAI's x-ratelimit-* headers for a limited key, for every answer.
    response_headers: dict[str, str] = field(default_factory=dict)
