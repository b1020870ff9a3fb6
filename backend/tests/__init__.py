"""Tests of the LLM chat service, mirroring backend/src."""
