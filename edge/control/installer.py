"""Artifact installation: verify the signature, download with resume, check the hash, install atomically.

Layout under DATA/artifacts:
    .partial/<sha256>.part        bytes downloaded so far (resume point after a cut or kill -9)
    <name>/<version>/<name>       an installed version (read-only)
    <name>/active -> <version>    the version in use, switched by an atomic rename

Names that are part of this layout (`active`, `checkpoint`) are refused by the manifest's
schema; a name or version directory that is a symlink is refused here. What a kill leaves
between a step on disk and its store update is mended at start by `recover()`: the disk wins.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import structlog

from fieldline.edge.store import EdgeStore
from fieldline.shared.schemas import ArtifactManifest, ArtifactState, SignedManifest
from fieldline.shared.signing import SignatureError, verify_manifest

log = structlog.get_logger(__name__)

HASH_BLOCK = 1024 * 1024
# Fault tests set this to a crash point's name: the edge SIGKILLs itself there (a kill -9 at
# exactly that moment, which no timing from outside can hit reliably).
CRASH_AT_ENV = "FIELDLINE_TEST_CRASH_AT"

# (sha256, offset) -> chunks of bytes from that offset
Fetcher = Callable[[str, int], AsyncIterator[bytes]]


class InstallError(Exception):
    """An artifact that cannot be installed; the message goes into the observed state."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def crash_point(name: str) -> None:
    """Kill this process here when a fault test asked for it (CRASH_AT_ENV)."""
    if os.environ.get(CRASH_AT_ENV) == name:
        log.warning("crash point reached: SIGKILL", point=name)
        os.kill(os.getpid(), signal.SIGKILL)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


class ArtifactInstaller:
    def __init__(self, store: EdgeStore, public_key: bytes):
        self.store = store
        self.public_key = public_key
        self.root = store.data_dir / "artifacts"
        self.partial = self.root / ".partial"
        self.partial.mkdir(parents=True, exist_ok=True)

    def verify(self, signed: SignedManifest) -> ArtifactManifest:
        try:
            return verify_manifest(self.public_key, signed)
        except SignatureError as exc:
            raise InstallError(str(exc)) from exc
        except ValueError as exc:  # signed, but not a manifest this edge accepts (a name)
            raise InstallError(f"manifest refused: {exc}") from exc

    def version_dir(self, m: ArtifactManifest) -> Path:
        return self.root / m.name / m.version

    def installed_path(self, m: ArtifactManifest) -> Path:
        return self.version_dir(m) / m.name

    def is_installed(self, m: ArtifactManifest) -> bool:
        row = self.store.artifact(m.name, m.version)
        return (
            row is not None
            and row.sha256 == m.sha256
            and row.state in (ArtifactState.installed, ArtifactState.active)
            and self.installed_path(m).is_file()
        )

    async def install(
        self,
        signed: SignedManifest,
        fetch: Fetcher,
        on_progress: Callable[[int, int], Awaitable[None]] | None = None,
    ) -> ArtifactManifest:
        """Verify, download (resuming), check and install one artifact; does not activate it."""
        m = self.verify(signed)
        if self.is_installed(m):
            return m
        self.store.set_artifact(
            name=m.name,
            version=m.version,
            sha256=m.sha256,
            kind=m.kind.value,
            state=ArtifactState.downloading,
        )
        part = self.partial / f"{m.sha256}.part"
        have = part.stat().st_size if part.exists() else 0
        if have > m.size:  # cannot be a prefix of this artifact
            part.unlink()
            have = 0
        if have < m.size:
            log.info("downloading", artifact=m.ref, size=m.size, resume_from=have)
            with part.open("ab") as f:
                async for block in fetch(m.sha256, have):
                    f.write(block)
                    have += len(block)
                    if have > m.size:
                        break
                    if on_progress:
                        await on_progress(have, m.size)
                f.flush()
                os.fsync(f.fileno())
        if have != m.size:
            part.unlink(missing_ok=True)
            raise InstallError(f"{m.ref}: size {have} differs from the manifest's {m.size}")
        # Off the loop: hashing a large model takes seconds and would stall the watchdog.
        digest = await asyncio.to_thread(sha256_of, part)
        if digest != m.sha256:
            part.unlink(missing_ok=True)
            raise InstallError(
                f"{m.ref}: sha256 mismatch (got {digest[:12]}…, manifest {m.sha256[:12]}…); refused"
            )
        target_dir = self._checked_dir(m)
        target_dir.mkdir(parents=True, exist_ok=True)
        target = self.installed_path(m)
        os.chmod(part, 0o444)
        os.replace(part, target)
        _fsync_dir(target_dir)
        crash_point("after-rename")
        self.store.set_artifact(
            name=m.name,
            version=m.version,
            sha256=m.sha256,
            kind=m.kind.value,
            state=ArtifactState.installed,
            path=str(target),
        )
        log.info("installed", artifact=m.ref, path=str(target))
        return m

    def _checked_dir(self, m: ArtifactManifest) -> Path:
        """The version directory, refused when it or its name directory is a symlink (writing
        through one would land outside the layout, over another version's file)."""
        for path in (self.root / m.name, self.version_dir(m)):
            if path.is_symlink():
                raise InstallError(f"{m.ref}: {path} is a symlink; refused")
            if path.exists() and not path.is_dir():
                raise InstallError(f"{m.ref}: {path} is not a directory; refused")
        return self.version_dir(m)

    async def recover(self) -> list[str]:
        """Mend what a kill between a step on disk and its store update left, from the disk:
        a verified file in place is installed, and the `active` link says which is active.
        Returns what it mended (logged)."""
        mended: list[str] = []
        for row in self.store.artifacts():
            path = self.root / row.name / row.version / row.name
            if row.state != ArtifactState.downloading or not path.is_file():
                continue
            if await asyncio.to_thread(sha256_of, path) != row.sha256:
                continue  # not the file the store expects: the reconciler fetches it again
            self.store.set_artifact(
                name=row.name,
                version=row.version,
                sha256=row.sha256,
                kind=row.kind,
                state=ArtifactState.installed,
                path=str(path),
            )
            mended.append(f"{row.name}@{row.version}: installed (file in place)")
        for row in self.store.artifacts():
            link = self.root / row.name / "active"
            if not link.is_symlink() or os.readlink(link) != row.version:
                continue
            if row.state != ArtifactState.installed or not row.path:
                continue  # active already, or not a verified install
            if not Path(row.path).is_file():
                continue
            self._record_switch(row.name, row.version, row.sha256, row.kind, row.path)
            mended.append(f"{row.name}@{row.version}: active (the link points at it)")
        for line in mended:
            log.warning("recovered an interrupted install", what=line)
        return mended

    def activate(self, m: ArtifactManifest) -> None:
        """Point <name>/active at this version (atomic rename), keep the previous, drop older ones."""
        self._switch(m.name, m.version, m.sha256, m.kind.value, str(self.installed_path(m)))

    def reactivate(self, name: str, version: str) -> bool:
        """Make an installed version active again (a rollback); False when it is not installed."""
        row = self.store.artifact(name, version)
        if (
            row is None
            or row.state not in (ArtifactState.installed, ArtifactState.active)
            or not row.path
            or not Path(row.path).is_file()
        ):
            return False
        self._switch(name, version, row.sha256, row.kind, row.path)
        return True

    def _switch(self, name: str, version: str, sha256: str, kind: str, path: str) -> None:
        name_dir = self.root / name
        link = name_dir / "active"
        tmp = name_dir / ".active.tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(version, tmp)
        os.replace(tmp, link)
        _fsync_dir(name_dir)
        self._record_switch(name, version, sha256, kind, path)

    def _record_switch(self, name: str, version: str, sha256: str, kind: str, path: str) -> None:
        """The store's side of a switch the link already made."""
        replaced = self.store.set_active(name, version)
        crash_point("after-switch")  # the link and the store's pointer moved, the row did not
        old = self.store.artifact(name, replaced) if replaced else None
        if old is not None:  # kept, installed but not active, for rollback
            self.store.set_artifact(
                name=old.name,
                version=old.version,
                sha256=old.sha256,
                kind=old.kind,
                state=ArtifactState.installed,
                path=old.path,
            )
        self.store.set_artifact(
            name=name,
            version=version,
            sha256=sha256,
            kind=kind,
            state=ArtifactState.active,
            path=path,
        )
        self._prune(name)
        log.info("activated", artifact=f"{name}@{version}", previous=replaced)

    def _prune(self, name: str) -> None:
        """Keep the active and the previous version of `name`; delete the rest."""
        keep = {self.store.active().get(name), self.store.previous(name)}
        for row in self.store.artifacts():
            if (
                row.name == name
                and row.version not in keep
                and row.state != ArtifactState.downloading
            ):
                shutil.rmtree(self.root / name / row.version, ignore_errors=True)
                self.store.delete_artifact(name, row.version)

    def mark_failed(self, signed: SignedManifest, error: str) -> None:
        try:
            m = signed.manifest
        except ValueError:
            return
        self.store.set_artifact(
            name=m.name,
            version=m.version,
            sha256=m.sha256,
            kind=m.kind.value,
            state=ArtifactState.failed,
            error=error,
        )
