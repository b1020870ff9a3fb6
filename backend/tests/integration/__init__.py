"""In-process tests: the app with its lifespan, respx on the SDK's HTTP calls."""
