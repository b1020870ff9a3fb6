"""The upstream client and the service that wraps it."""
