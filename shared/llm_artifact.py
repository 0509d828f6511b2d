"""LLM artifacts: a checkpoint directory packed as one deterministic tar, and unpacked safely.

The same directory always packs to the same bytes (sorted names, zeroed times and owners), so
the artifact's sha256 names its content like any other artifact. See docs/gateway.md.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

FORMAT = "checkpoint-tar/1"  # manifest metadata["format"] of an LLM artifact
REQUIRED = ("config.json",)
MAX_MEMBERS = 256
COPY_CHUNK = 1024 * 1024


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


def unpack_checkpoint(tar_path: Path, dest: Path) -> Path:
    """Unpack an LLM artifact into `dest` (created, or kept when already complete).

    Only plain top-level files are accepted: no directories, links, devices, absolute or
    parent paths. Unpacks into a sibling temp folder, then renames, so `dest` is whole or absent.
    """
    if (dest / "config.json").is_file():
        return dest
    tmp = dest.with_name(dest.name + ".unpacking")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with tarfile.open(tar_path, "r:") as tar:
            members = tar.getmembers()
            if len(members) > MAX_MEMBERS:
                raise LLMArtifactError(f"{tar_path.name}: {len(members)} members is too many")
            for m in members:
                if not m.isfile() or "/" in m.name or m.name in ("", ".", "..") or "\\" in m.name:
                    raise LLMArtifactError(
                        f"{tar_path.name}: member {m.name!r} is not a plain top-level file"
                    )
                src = tar.extractfile(m)
                assert src is not None
                with src, (tmp / m.name).open("wb") as f:
                    shutil.copyfileobj(src, f, COPY_CHUNK)
        checkpoint_files(tmp)  # the same checks as at push time
        shutil.rmtree(dest, ignore_errors=True)  # an incomplete leftover, never a good one
        os.replace(tmp, dest)
    except tarfile.TarError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise LLMArtifactError(f"{tar_path.name} is not a readable tar: {exc}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
