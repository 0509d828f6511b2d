"""Signed artifacts made in the test, a fetcher that serves their bytes from an offset in chunks
(what the tunnel's FetchArtifact gives the installer), counting what it sent, and a GNU sparse
tar (issue 13's decompression bomb)."""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

from fieldline.shared.clock import utcnow
from fieldline.shared.schemas import ArtifactManifest, SignedManifest
from fieldline.shared.signing import sign_manifest

CHUNK = 1000


def signed_blob(key, data: bytes, version: str = "1", name: str = "model") -> SignedManifest:  # type: ignore[no-untyped-def]
    manifest = ArtifactManifest(
        name=name,
        version=version,
        kind="file",
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        created=utcnow(),
    )
    return sign_manifest(key, manifest)


class Fetcher:
    """Serves bytes from an offset in chunks and counts what it sent (as the cloud's metric does)."""

    def __init__(self, data: bytes):
        self.data = data
        self.sent = 0

    async def __call__(self, sha256: str, offset: int) -> AsyncIterator[bytes]:
        for i in range(offset, len(self.data), CHUNK):
            block = self.data[i : i + CHUNK]
            self.sent += len(block)
            yield block


def gnu_sparse_tar(tmp: Path, claimed: int) -> Path:
    """A checkpoint tar (GNU tar --sparse) whose weights member claims `claimed` bytes of
    zeros while the tar itself stays a few KiB: the reproduction of issue 13."""
    d = tmp / "sparse-src"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "llama"}')
    with (d / "model.safetensors").open("wb") as f:
        f.truncate(claimed)  # a hole: no blocks on disk
    out = tmp / "sparse.tar"
    subprocess.run(
        ["tar", "--sparse", "--format=gnu", "-cf", str(out), "-C", str(d), "config.json",
         "model.safetensors"],
        check=True,
    )  # fmt: skip
    return out
