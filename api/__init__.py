"""The HTTP API: FastAPI routes that adapt jobs to HTTP (create_app in api.app)."""
