"""Assembles the routers of API v1 under `/api/v1`: chat (for callers) and usage (for operators); and the
OpenAI-compatible API under `/v1` (for callers, with the chat keys).

The chat routes check chat keys through their route class (`ChatKeyRoute`, on every chat router, this one
included, so a route added here is checked too); the operator routes get their auth dependency from `create_app`,
only when keys are configured (see api/deps.py).
"""

from fastapi import APIRouter

from src.api.deps import ChatKeyRoute
from src.api.v1.endpoints import llm, openai_compat, usage

chat_router = APIRouter(prefix="/api/v1", route_class=ChatKeyRoute)
chat_router.include_router(llm.router)

operator_router = APIRouter(prefix="/api/v1")
operator_router.include_router(usage.router)

openai_router = openai_compat.router
