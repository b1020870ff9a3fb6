"""The OpenAPI document, made to say exactly what this instance accepts and answers.

FastAPI's generated document, plus what it cannot know by itself: the named events of the chat stream (with
their schemas, as OpenAPI 3.2's `itemSchema` describes an event stream), the allowed models when an allowlist is
configured (`model` becomes an enum), and the chat routes' bearer when chat keys are configured (those routes check
it themselves, not through a dependency FastAPI would see: api/deps.py). Installed the way FastAPI's docs extend
OpenAPI: by giving the app its own `openapi()`.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.encoders import jsonable_encoder
from fastapi.openapi.utils import get_openapi
from fastapi.routing import iter_route_contexts
from pydantic import BaseModel

from src.api.deps import ChatKeyRoute, require_chat_key
from src.core.config import Settings
from src.models.llm import ErrorEnvelope, StreamDelta, StreamDone, StreamError, StreamRefusal

CHAT_PATH = "/api/v1/llm/chat"
RESUME_PATH = "/api/v1/llm/chat/streams/{stream_id}"
EVENT_STREAM = "text/event-stream"
STREAM_EVENTS: dict[str, type[BaseModel]] = {
    "delta": StreamDelta,
    "refusal": StreamRefusal,
    "done": StreamDone,
    "error": StreamError,
}
_REF_TEMPLATE = "#/components/schemas/{model}"


def error_doc(description: str) -> dict[str, Any]:
    """An error response of a route, for its `responses=`: the envelope, and which codes mean what."""
    return {"model": ErrorEnvelope, "description": description}


def install_openapi(app: FastAPI, settings: Settings, *, chat_keys: bool) -> None:
    allowed_models = list(settings.llm_allowed_models)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, routes=app.routes)
            _describe_stream_events(document)
            if chat_keys:
                _declare_chat_bearer(document, app)
            if allowed_models:
                _restrict_models(document, allowed_models)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _declare_chat_bearer(document: dict[str, Any], app: FastAPI) -> None:
    """The chat key's scheme, and a requirement of it on every chat route: what FastAPI writes for a security
    dependency (the scheme as `HTTPBearer` describes itself), written here for the routes of `ChatKeyRoute`."""
    name = require_chat_key.scheme_name
    scheme = jsonable_encoder(require_chat_key.model, by_alias=True, exclude_none=True)
    document.setdefault("components", {}).setdefault("securitySchemes", {})[name] = scheme
    for route in iter_route_contexts(app.routes):
        if isinstance(route.original_route, ChatKeyRoute) and route.include_in_schema:
            operations = document["paths"][route.path_format]
            for method in route.methods or ():
                operations[method.lower()].setdefault("security", []).append({name: []})


def _describe_stream_events(document: dict[str, Any]) -> None:
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    variants = []
    for name, model in STREAM_EVENTS.items():
        schema = model.model_json_schema(ref_template=_REF_TEMPLATE)
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
        variants.append(
            {
                "type": "object",
                "required": ["event", "data"],
                "properties": {
                    "event": {"const": name},
                    "data": {
                        "type": "string",
                        "contentMediaType": "application/json",
                        "contentSchema": {"$ref": _REF_TEMPLATE.format(model=model.__name__)},
                    },
                    "id": {
                        "type": "string",
                        "pattern": "^[1-9][0-9]*$",
                        "description": "The event's number in its stream (1, 2, 3, ...); resume after it with "
                        "`Last-Event-ID`.",
                    },
                },
            }
        )
    for path, method in ((CHAT_PATH, "post"), (RESUME_PATH, "get")):
        stream = document["paths"][path][method]["responses"]["200"]["content"][EVENT_STREAM]
        stream["itemSchema"] = {"oneOf": variants}


def _restrict_models(document: dict[str, Any], allowed_models: list[str]) -> None:
    model = document["components"]["schemas"]["LLMRequest"]["properties"]["model"]
    model["anyOf"] = [{"type": "string", "enum": allowed_models}, {"type": "null"}]
