"""Everything one running cloud owns, built once at start and handed to the API and the tunnel."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fieldline.cloud.artifacts.blobs import BlobStore
from fieldline.cloud.desired import DesiredStateService
from fieldline.cloud.metrics import CloudMetrics
from fieldline.cloud.rollouts.controller import RolloutController
from fieldline.cloud.store import auth as auth_store
from fieldline.cloud.store.db import Database
from fieldline.cloud.tunnel.records import RecordIngestor
from fieldline.cloud.tunnel.sessions import SessionRegistry
from fieldline.shared.config import CloudSettings
from fieldline.shared.private_file import write_private
from fieldline.shared.signing import load_or_create_key, public_key_bytes

ADMIN_KEY_FILE = "admin.key"
MIN_BOOTSTRAP_KEY_CHARS = 32


class BootstrapKeyError(Exception):
    """The bootstrap admin key file is missing, unreadable or too weak."""


@dataclass
class CloudContext:
    settings: CloudSettings
    db: Database
    blobs: BlobStore
    signing_key: Ed25519PrivateKey
    metrics: CloudMetrics
    sessions: SessionRegistry
    desired: DesiredStateService
    records: RecordIngestor
    rollouts: RolloutController
    # The admin key's secret when this start created it (printed once), else None.
    new_admin_key: str | None = None
    # With TLS: the CA pin and enrollment port that tokens carry (shared/tls.py).
    tls_pin: str | None = None
    enroll_port: int | None = None

    @property
    def public_key(self) -> bytes:
        return public_key_bytes(self.signing_key)

    def close(self) -> None:
        self.db.close()


def open_context(settings: CloudSettings) -> CloudContext:
    """Open (and on first start create) the data directory: store, blobs, signing key, admin key."""
    data: Path = settings.data_dir
    data.mkdir(parents=True, exist_ok=True)
    os.chmod(data, 0o700)
    db = Database(data / "cloud.db")
    metrics = CloudMetrics()
    sessions = SessionRegistry()
    desired = DesiredStateService(db, sessions, metrics)
    ctx = CloudContext(
        settings=settings,
        db=db,
        blobs=BlobStore(data / "blobs"),
        signing_key=load_or_create_key(data / "signing.key"),
        metrics=metrics,
        sessions=sessions,
        desired=desired,
        records=RecordIngestor(db, metrics),
        rollouts=RolloutController(db, desired, sessions, tick_s=settings.rollout_tick_s),
    )
    if auth_store.count_api_keys(db) == 0:
        if settings.bootstrap_admin_key_file is not None:
            secret = _bootstrap_key(settings.bootstrap_admin_key_file)
            auth_store.create_api_key(
                db, name="admin (bootstrap)", role=auth_store.Role.admin, secret=secret
            )
            return ctx  # the operator holds it already; nothing to print or write
        _, secret = auth_store.create_api_key(db, name="admin", role=auth_store.Role.admin)
        key_file = data / ADMIN_KEY_FILE
        write_private(key_file, (secret + "\n").encode())
        ctx.new_admin_key = secret
    return ctx


def _bootstrap_key(path: Path) -> str:
    try:
        secret = path.read_text().strip()
    except OSError as exc:
        raise BootstrapKeyError(
            f"cannot read the bootstrap admin key {path}: {exc.strerror}"
        ) from exc
    if len(secret) < MIN_BOOTSTRAP_KEY_CHARS or any(c.isspace() for c in secret):
        raise BootstrapKeyError(
            f"the bootstrap admin key in {path} must be one word of {MIN_BOOTSTRAP_KEY_CHARS}+ "
            "random characters (e.g. `openssl rand -hex 32`)"
        )
    return secret
