"""Fixtures every test folder may use; folder-specific ones live in that folder's conftest.py."""
