"""The admin HTTP API: FastAPI app, a route file per resource, request and response models."""
