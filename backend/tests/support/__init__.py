"""Test support: real servers (nginx, a forward proxy) and a throwaway TLS CA, started by fixtures."""
