"""LLM chat service: FastAPI backend in front of OpenAI-compatible chat models."""
