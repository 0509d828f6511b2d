"""Backing up and restoring the cloud data directory: `fieldline cloud backup|restore`.

A backup is one .tar.gz: a consistent snapshot of the SQLite store (SQLite's online backup, so
the cloud keeps running), the signing key, the TLS material and the artifact blobs. The keys
matter most: edges pin the signing key and the CA, so a cloud restored without them cannot
serve the fleet it had.
"""

from __future__ import annotations

import io
import json
import os
import sqlite3
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fieldline.shared.clock import utcnow
from fieldline.shared.private_file import private_file

DB_FILE = "cloud.db"
MANIFEST = "fieldline-backup.json"
# Copied as they are; the store goes through SQLite's backup API instead.
KEPT = ("signing.key", "admin.key", "tls", "blobs")
SKIPPED_BLOB_DIRS = ("tmp",)
FORMAT = 1


class BackupError(Exception):
    """A data directory or archive that cannot be backed up or restored; says why."""


@dataclass(frozen=True)
class BackupReport:
    path: Path
    files: int
    bytes: int


def _snapshot(db: Path, into: Path) -> None:
    src = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    dst = sqlite3.connect(into)
    try:
        src.backup(dst)
    finally:
        dst.close()
        src.close()


def backup(
    data_dir: Path, out: Path, *, progress: Callable[[int], None] | None = None
) -> BackupReport:
    """Write a backup of data_dir to out (mode 0600; it holds private keys)."""
    if not (data_dir / DB_FILE).exists():
        raise BackupError(f"{data_dir} holds no cloud store ({DB_FILE} is missing)")
    files = 0
    total = 0
    with (
        private_file(out) as raw,
        tarfile.open(fileobj=raw, mode="w:gz") as tar,
        tempfile.TemporaryDirectory() as tmp,
    ):
        snap = Path(tmp) / DB_FILE
        _snapshot(data_dir / DB_FILE, snap)
        tar.add(snap, arcname=DB_FILE)
        files, total = 1, snap.stat().st_size
        for name in KEPT:
            src = data_dir / name
            if not src.exists():
                continue
            for path in (
                [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
            ):
                rel = path.relative_to(data_dir)
                if (
                    rel.parts[0] == "blobs"
                    and len(rel.parts) > 1
                    and rel.parts[1] in SKIPPED_BLOB_DIRS
                ):
                    continue
                tar.add(path, arcname=str(rel))
                files += 1
                total += path.stat().st_size
                if progress is not None:
                    progress(path.stat().st_size)
        meta = json.dumps(
            {"format": FORMAT, "created": utcnow().isoformat(), "files": files}
        ).encode()
        info = tarfile.TarInfo(MANIFEST)
        info.size = len(meta)
        tar.addfile(info, io.BytesIO(meta))
    return BackupReport(out, files, total)


def restore(archive: Path, data_dir: Path) -> int:
    """Unpack a backup into an empty or missing data_dir; returns the number of files."""
    if data_dir.exists() and any(data_dir.iterdir()):
        raise BackupError(f"{data_dir} is not empty: restore into a new directory")
    try:
        with tarfile.open(archive, mode="r:gz") as tar:
            count = _unpack(tar, archive, data_dir)
    except (OSError, tarfile.TarError) as exc:
        raise BackupError(f"cannot restore {archive}: {exc}") from exc
    for key in ("signing.key", "admin.key", "tls/ca.key", "tls/server.key"):
        if (data_dir / key).exists():
            os.chmod(data_dir / key, 0o600)
    return count


def _unpack(tar: tarfile.TarFile, archive: Path, data_dir: Path) -> int:
    names = tar.getnames()
    if MANIFEST not in names or DB_FILE not in names:
        raise BackupError(f"{archive} is not a fieldline cloud backup")
    data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    count = 0
    for member in tar.getmembers():
        if member.name == MANIFEST:
            continue
        if not member.isfile():
            raise BackupError(f"{archive} holds {member.name!r}, which is not a file")
        # The "data" filter refuses absolute paths, "..", links and device files.
        tar.extract(member, data_dir, filter="data")
        count += 1
    return count
