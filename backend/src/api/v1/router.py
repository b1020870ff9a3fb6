"""Assembles the routers of API v1 under `/api/v1`: chat (for callers) and usage (for operators); and the
OpenAI-compatible API under `/v1` (for callers, with the chat keys).

Each gets its auth dependency from `create_app`, only when keys are configured (see api/deps.py).
"""

from fastapi import APIRouter

from src.api.v1.endpoints import llm, openai_compat, usage

chat_router = APIRouter(prefix="/api/v1")
chat_router.include_router(llm.router)

operator_router = APIRouter(prefix="/api/v1")
operator_router.include_router(usage.router)

openai_router = openai_compat.router
