"""Pydantic models of the public API."""
