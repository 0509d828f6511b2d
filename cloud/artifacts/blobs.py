"""Content-addressed blob store: streamed, size-limited uploads that land whole or not at all."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from fieldline.shared.schemas import SHA256_RE


class BlobError(Exception):
    """A refused upload; `status` is the HTTP status it maps to."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class BlobStore:
    """Blobs at ROOT/sha256/ab/<sha256>; uploads go through ROOT/tmp and a rename."""

    def __init__(self, root: Path):
        self.root = root
        self.tmp = root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        # Leftovers of a crash mid-upload are never valid blobs.
        for stale in self.tmp.iterdir():
            stale.unlink(missing_ok=True)

    def path(self, sha256: str) -> Path:
        if not SHA256_RE.match(sha256):
            raise ValueError("not a sha256")
        return self.root / "sha256" / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def size(self, sha256: str) -> int:
        return self.path(sha256).stat().st_size

    async def put_stream(self, chunks: AsyncIterator[bytes], *, max_bytes: int) -> tuple[str, int]:
        """Write a stream to a temp file while hashing; return (sha256, size) once it is stored.

        The size limit is checked as bytes arrive, so an oversize upload is cut off early.
        Any failure (limit, empty, client gone) removes the temp file.
        """
        h = hashlib.sha256()
        size = 0
        fd, tmp_name = tempfile.mkstemp(dir=self.tmp, prefix="upload-")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as f:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > max_bytes:
                        raise BlobError(
                            f"upload exceeds the limit of {max_bytes} bytes", status=413
                        )
                    h.update(chunk)
                    f.write(chunk)
                if size == 0:
                    raise BlobError("empty upload: the request body has no bytes", status=400)
                f.flush()
                os.fsync(f.fileno())
            sha = h.hexdigest()
            final = self.path(sha)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(tmp, 0o444)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
            return sha, size
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def read_chunks(self, sha256: str, *, offset: int, chunk_bytes: int) -> Iterator[bytes]:
        with self.path(sha256).open("rb") as f:
            f.seek(offset)
            while block := f.read(chunk_bytes):
                yield block

    def delete(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
