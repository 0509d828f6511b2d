"""LLM artifacts: deterministic packing, a safe unpack, and refusals with clear messages."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from fieldline.shared.llm_artifact import (
    LLMArtifactError,
    inspect_tar,
    pack_checkpoint,
    unpack_checkpoint,
)
from tests.support.artifacts import gnu_sparse_tar


def checkpoint(d: Path) -> Path:
    d.mkdir(parents=True)
    (d / "config.json").write_text('{"model_type": "llama"}')
    (d / "model.safetensors").write_bytes(b"\x00" * 1000)
    (d / "tokenizer.json").write_text("{}")
    (d / ".DS_Store").write_text("junk")  # hidden: left out
    return d


def test_same_directory_packs_to_same_bytes_and_round_trips(tmp_path: Path) -> None:
    src = checkpoint(tmp_path / "ck")
    seen: list[int] = []
    names = pack_checkpoint(src, tmp_path / "a.tar", on_progress=seen.append)
    assert names == ["config.json", "model.safetensors", "tokenizer.json"]
    assert sum(seen) == 1000 + len('{"model_type": "llama"}') + 2
    (src / "tokenizer.json").touch()  # a newer mtime must not change the artifact
    pack_checkpoint(src, tmp_path / "b.tar")
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    out = unpack_checkpoint(tmp_path / "a.tar", tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == [".source.json", *names]
    assert (out / "model.safetensors").read_bytes() == b"\x00" * 1000
    # unpacking again keeps the complete directory
    assert unpack_checkpoint(tmp_path / "a.tar", tmp_path / "out") == out


def test_directories_that_are_not_checkpoints_are_refused(tmp_path: Path) -> None:
    with pytest.raises(LLMArtifactError, match="not a directory"):
        pack_checkpoint(tmp_path / "missing", tmp_path / "x.tar")
    d = tmp_path / "noweights"
    d.mkdir()
    (d / "config.json").write_text("{}")
    with pytest.raises(LLMArtifactError, match="safetensors"):
        pack_checkpoint(d, tmp_path / "x.tar")
    e = tmp_path / "noconfig"
    e.mkdir()
    (e / "model.safetensors").write_bytes(b"1")
    with pytest.raises(LLMArtifactError, match=r"config\.json"):
        pack_checkpoint(e, tmp_path / "x.tar")


def _tar_with(path: Path, members: list[tarfile.TarInfo]) -> Path:
    with tarfile.open(path, "w") as tar:
        for info in members:
            data = b"x" * info.size if info.isfile() else None
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


@pytest.mark.parametrize(
    "member",
    [
        "../evil.safetensors",
        "/etc/passwd",
        "sub/config.json",
    ],
)
def test_unsafe_member_names_are_refused_and_leave_nothing(tmp_path: Path, member: str) -> None:
    info = tarfile.TarInfo(member)
    info.size = 3
    bad = _tar_with(tmp_path / "bad.tar", [info])
    with pytest.raises(LLMArtifactError, match="plain top-level file"):
        unpack_checkpoint(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.unpacking").exists()
    assert not (tmp_path.parent / "evil.safetensors").exists()


def test_links_and_garbage_are_refused(tmp_path: Path) -> None:
    link = tarfile.TarInfo("config.json")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    with pytest.raises(LLMArtifactError, match="plain top-level file"):
        unpack_checkpoint(_tar_with(tmp_path / "l.tar", [link]), tmp_path / "out")
    (tmp_path / "g.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(LLMArtifactError, match="not a readable tar"):
        unpack_checkpoint(tmp_path / "g.tar", tmp_path / "out2")


def test_a_sparse_member_is_refused_before_a_byte_is_written(tmp_path: Path) -> None:
    tar = gnu_sparse_tar(tmp_path, 512 * 1024 * 1024)
    assert tar.stat().st_size < 64 * 1024
    with pytest.raises(LLMArtifactError, match="sparse"):
        unpack_checkpoint(tar, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.unpacking").exists()


def test_device_and_oversize_members_are_refused(tmp_path: Path) -> None:
    fifo = tarfile.TarInfo("config.json")
    fifo.type = tarfile.FIFOTYPE
    with pytest.raises(LLMArtifactError, match="device or fifo"):
        unpack_checkpoint(_tar_with(tmp_path / "f.tar", [fifo]), tmp_path / "out")
    src = checkpoint(tmp_path / "ck")
    pack_checkpoint(src, tmp_path / "a.tar")
    with pytest.raises(LLMArtifactError, match="exceed 500 bytes"):
        unpack_checkpoint(tmp_path / "a.tar", tmp_path / "out", max_total_bytes=500)
    with pytest.raises(LLMArtifactError, match="are free"):
        inspect_tar(tmp_path / "a.tar", max_total_bytes=10**9, free_bytes=100)


def test_new_bytes_under_the_same_path_are_unpacked_again(tmp_path: Path) -> None:
    """A re-pushed name@version with new bytes: the installer renames the new tar over the
    old one; the checkpoint beside it must follow the new bytes, not stay the old one."""
    installed = tmp_path / "v1" / "assistant"
    installed.parent.mkdir()
    first = checkpoint(tmp_path / "first")
    pack_checkpoint(first, installed)
    out = unpack_checkpoint(installed, tmp_path / "v1" / "checkpoint")
    assert (out / "model.safetensors").read_bytes() == b"\x00" * 1000
    second = checkpoint(tmp_path / "second")
    (second / "model.safetensors").write_bytes(b"\x01" * 1000)
    pack_checkpoint(second, tmp_path / "new.tar")
    os.replace(tmp_path / "new.tar", installed)  # what the installer does
    out = unpack_checkpoint(installed, tmp_path / "v1" / "checkpoint")
    assert (out / "model.safetensors").read_bytes() == b"\x01" * 1000
