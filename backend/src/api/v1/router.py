"""Assembles the routers of API v1 under `/api/v1`."""

from fastapi import APIRouter

from src.api.v1.endpoints import llm

api_router = APIRouter(prefix="/api/v1")
api_router.include_router(llm.router)
