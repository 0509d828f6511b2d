"""The tunnel edges dial: node auth, enrollment, the control stream, records ingest, sessions, limits."""
