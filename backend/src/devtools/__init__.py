"""Developer tools: the bundled offline OpenAI-compatible upstream."""
