"""Cross-cutting helpers (logging)."""
