"""Fixtures shared with the e2e tests (a cloud process with TLS)."""

from tests.e2e.conftest import tls_fleet  # noqa: F401
