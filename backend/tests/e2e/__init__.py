"""End-to-end tests: real processes under uvicorn, real sockets, real SSE."""
