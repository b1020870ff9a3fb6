"""Settings, errors and the LLM service."""
