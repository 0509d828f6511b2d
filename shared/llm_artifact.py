"""LLM artifacts: a checkpoint directory packed as one deterministic tar, and unpacked safely.

The same directory always packs to the same bytes (sorted names, zeroed times and owners), so
the artifact's sha256 names its content like any other artifact. See docs/gateway.md.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

from fieldline.shared.limits import MAX_LLM_UNPACKED_BYTES

FORMAT = "checkpoint-tar/1"  # manifest metadata["format"] of an LLM artifact
REQUIRED = ("config.json",)
MAX_MEMBERS = 256
COPY_CHUNK = 1024 * 1024
SOURCE_FILE = ".source.json"  # in an unpacked checkpoint: the sha256 of the tar it came from


class LLMArtifactError(ValueError):
    """A directory that is not a checkpoint, or a tar that is not a safe LLM artifact."""


def checkpoint_files(directory: Path) -> list[Path]:
    """The files of a checkpoint directory that go into the artifact, sorted by name.

    Top-level regular files only (hidden ones left out); a checkpoint needs config.json and at
    least one *.safetensors file.
    """
    if not directory.is_dir():
        raise LLMArtifactError(f"{directory} is not a directory")
    files = sorted(
        p
        for p in directory.iterdir()
        if not p.name.startswith(".") and p.is_file() and not p.is_symlink()
    )
    names = {p.name for p in files}
    for required in REQUIRED:
        if required not in names:
            raise LLMArtifactError(f"{directory} has no {required}: not a checkpoint directory")
    if not any(n.endswith(".safetensors") for n in names):
        raise LLMArtifactError(f"{directory} has no *.safetensors weights")
    if len(files) > MAX_MEMBERS:
        raise LLMArtifactError(f"{directory} has {len(files)} files (at most {MAX_MEMBERS})")
    return files


def pack_checkpoint(
    directory: Path, out: Path, on_progress: Callable[[int], None] | None = None
) -> list[str]:
    """Write `directory`'s checkpoint files into the tar `out`; returns the member names."""
    files = checkpoint_files(directory)
    tmp = out.with_name(out.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in files:
            info = tarfile.TarInfo(path.name)
            info.size = path.stat().st_size
            info.mode, info.mtime = 0o644, 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with path.open("rb") as f:
                tar.addfile(info, _Counting(f, on_progress))
    os.replace(tmp, out)
    return [p.name for p in files]


class _Counting(io.RawIOBase):
    """A file wrapper that reports bytes read (the CLI's progress bar)."""

    def __init__(self, f: io.BufferedReader, on_progress: Callable[[int], None] | None):
        self._f = f
        self._on_progress = on_progress

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        if self._on_progress and data:
            self._on_progress(len(data))
        return data

    def readable(self) -> bool:
        return True


def inspect_tar(
    tar_path: Path, *, max_total_bytes: int, free_bytes: int | None = None
) -> list[tarfile.TarInfo]:
    """The members of an LLM artifact, refused unless each is a plain top-level file (no
    sparse, link, device or directory member) and their sizes sum to at most max_total_bytes
    and to what fits in free_bytes. Reads headers only: nothing is unpacked."""
    members: list[tarfile.TarInfo] = []
    total = 0
    try:
        with tarfile.open(tar_path, "r:") as tar:
            for m in tar:
                if len(members) == MAX_MEMBERS:
                    raise LLMArtifactError(f"{tar_path.name}: more than {MAX_MEMBERS} members")
                why = _refusal(m)
                if why is not None:
                    raise LLMArtifactError(
                        f"{tar_path.name}: member {m.name!r} is not a plain top-level file ({why})"
                    )
                total += m.size
                if total > max_total_bytes:
                    raise LLMArtifactError(
                        f"{tar_path.name}: members exceed {max_total_bytes} bytes unpacked"
                    )
                members.append(m)
    except tarfile.TarError as exc:
        raise LLMArtifactError(f"{tar_path.name} is not a readable tar: {exc}") from exc
    if free_bytes is not None and total > free_bytes:
        raise LLMArtifactError(
            f"{tar_path.name}: unpacking needs {total} bytes, {free_bytes} are free"
        )
    return members


def _refusal(m: tarfile.TarInfo) -> str | None:
    """Why a member cannot be part of a checkpoint, or None."""
    if m.issparse():  # its size field may claim terabytes of zeros from a few KiB
        return "sparse"
    if m.issym() or m.islnk():
        return "a link"
    if m.isdev():
        return "a device or fifo"
    if not m.isreg():
        return "not a regular file"
    if "/" in m.name or "\\" in m.name or m.name in ("", ".", ".."):
        return "a path, not a top-level name"
    if m.name.startswith("."):
        return "a hidden name"
    return None


def tar_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(COPY_CHUNK):
            h.update(block)
    return h.hexdigest()


def _identity(path: Path) -> list[int]:
    """What changes when the installer renames another file into place (inode, size, mtime)."""
    st = path.stat()
    return [st.st_ino, st.st_size, st.st_mtime_ns]


def _unpacked_from(tar_path: Path, dest: Path) -> str | None:
    """The sha256 of the tar `dest` was unpacked from, when that tar is `tar_path` now."""
    try:
        source = json.loads((dest / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not (dest / "config.json").is_file() or not isinstance(source, dict):
        return None
    if source.get("identity") == _identity(tar_path):
        return str(source.get("sha256"))
    sha = tar_sha256(tar_path)  # another file in place: the same bytes?
    return sha if sha == source.get("sha256") else None


def unpack_checkpoint(
    tar_path: Path, dest: Path, *, max_total_bytes: int = MAX_LLM_UNPACKED_BYTES
) -> Path:
    """Unpack an LLM artifact into `dest` (created, or kept when unpacked from these bytes).

    `dest` is tied to the sha256 of the tar it came from (DEST/.source.json): a re-pushed
    version with new bytes is unpacked again, never served from the old checkpoint. Members
    are inspected first (inspect_tar, capped by max_total_bytes and free disk); unpacking goes
    into a sibling temp folder, then a rename, so `dest` is whole or absent.
    """
    if _unpacked_from(tar_path, dest) is not None:
        return dest
    tmp = dest.with_name(dest.name + ".unpacking")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        free = shutil.disk_usage(tmp).free
        members = inspect_tar(tar_path, max_total_bytes=max_total_bytes, free_bytes=free)
        with tarfile.open(tar_path, "r:") as tar:
            for m in members:
                src = tar.extractfile(m)
                assert src is not None
                with src, (tmp / m.name).open("wb") as f:
                    shutil.copyfileobj(src, f, COPY_CHUNK)
        checkpoint_files(tmp)  # the same checks as at push time
        source = {"sha256": tar_sha256(tar_path), "identity": _identity(tar_path)}
        (tmp / SOURCE_FILE).write_text(json.dumps(source))
        shutil.rmtree(dest, ignore_errors=True)  # a leftover, or another tar's checkpoint
        os.replace(tmp, dest)
    except tarfile.TarError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise LLMArtifactError(f"{tar_path.name} is not a readable tar: {exc}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
