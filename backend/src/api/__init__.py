"""HTTP layer: routers, dependencies, middleware and the wire formats (JSON, Server-Sent Events)."""
