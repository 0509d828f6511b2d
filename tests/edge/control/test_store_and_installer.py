"""The edge's local store, installer and backoff on local data: modes, generations, refusals, resume."""

from __future__ import annotations

import random
import stat
from pathlib import Path

import pytest

from fieldline.edge.control.backoff import Backoff
from fieldline.edge.control.installer import ArtifactInstaller, InstallError
from fieldline.edge.store import Credential, EdgeStore
from fieldline.shared.config import BackoffSettings
from fieldline.shared.schemas import DesiredState, SignedManifest
from fieldline.shared.signing import generate_key, public_key_bytes
from tests.support.artifacts import Fetcher, signed_blob


def test_store_is_private_and_generations_never_go_back(tmp_path: Path) -> None:
    store = EdgeStore(tmp_path / "edge")
    assert stat.S_IMODE((tmp_path / "edge").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "edge" / "edge.db").stat().st_mode) == 0o600
    store.save_credential(Credential("node_x", "s3cret", b"k" * 32), cloud="c:1", labels={})
    assert store.save_desired(DesiredState(node_id="node_x", generation=5))
    assert not store.save_desired(DesiredState(node_id="node_x", generation=4))
    store.close()
    again = EdgeStore(tmp_path / "edge", read_only=True)
    assert again.desired().generation == 5  # type: ignore[union-attr]
    assert again.credential() == Credential("node_x", "s3cret", b"k" * 32)


async def _install(installer: ArtifactInstaller, signed: SignedManifest, fetch: Fetcher) -> None:
    m = await installer.install(signed, fetch)
    installer.activate(m)


def test_install_resumes_refuses_tamper_and_foreign_keys(tmp_path: Path) -> None:
    import asyncio

    key = generate_key()
    store = EdgeStore(tmp_path / "edge")
    installer = ArtifactInstaller(store, public_key_bytes(key))
    v1 = random.Random(1).randbytes(10_500)
    asyncio.run(_install(installer, signed_blob(key, v1, "1"), Fetcher(v1)))
    assert (tmp_path / "edge/artifacts/model/active/model").read_bytes() == v1

    # Resume: half of v2 is already on disk; only the rest is fetched.
    v2 = random.Random(2).randbytes(10_500)
    s2 = signed_blob(key, v2, "2")
    part = tmp_path / "edge/artifacts/.partial" / f"{s2.manifest.sha256}.part"
    part.write_bytes(v2[:6000])
    fetch = Fetcher(v2)
    asyncio.run(_install(installer, s2, fetch))
    assert fetch.sent == len(v2) - 6000
    assert (tmp_path / "edge/artifacts/model/active/model").read_bytes() == v2
    assert store.previous("model") == "1"

    # Tampered bytes: refused, nothing half-installed, v2 stays active.
    v3 = random.Random(3).randbytes(2000)
    bad = bytearray(v3)
    bad[7] ^= 1
    with pytest.raises(InstallError, match="sha256 mismatch"):
        asyncio.run(_install(installer, signed_blob(key, v3, "3"), Fetcher(bytes(bad))))
    assert store.active() == {"model": "2"}
    assert not any((tmp_path / "edge/artifacts/.partial").iterdir())

    # Signed by another key: refused before any byte is fetched.
    fetch = Fetcher(v3)
    with pytest.raises(InstallError, match="signature"):
        asyncio.run(_install(installer, signed_blob(generate_key(), v3, "3"), fetch))
    assert fetch.sent == 0


def test_backoff_grows_to_its_cap_with_jitter() -> None:
    backoff = Backoff(
        BackoffSettings(initial_s=0.5, max_s=8, multiplier=2, jitter=0.5), random.Random(0)
    )
    delays = [backoff.next_delay() for _ in range(10)]
    assert all(0 < d <= 8 for d in delays)
    assert delays[-1] >= 4  # at the cap, minus at most half for jitter
    assert len({round(d, 6) for d in delays[-4:]}) > 1  # jittered, not lock-step
    backoff.reset()
    assert backoff.next_delay() <= 0.5
