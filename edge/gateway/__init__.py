"""The local HTTP gateway: FastAPI app, OpenAI-compatible routes, request schemas, HTTP metrics."""
