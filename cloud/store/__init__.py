"""The cloud store: all of its SQL, behind keyword-only functions that take and return typed rows."""
