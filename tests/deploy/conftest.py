"""The e2e fleet fixture (a cloud process) for the deploy tests that run daemons."""

from tests.e2e.conftest import fleet  # noqa: F401
