"""Endpoint routers of API v1."""
