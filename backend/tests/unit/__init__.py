"""Unit tests: pure functions, no app."""
