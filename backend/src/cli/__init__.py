"""Command-line tools for a running service."""
