"""Files that hold secrets (keys, backups): written to a fresh 0600 file beside the target, then
renamed over it, so no byte is ever readable by others and an old file's mode never survives."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from fieldline.shared.ids import new_secret


@contextlib.contextmanager
def private_file(path: Path) -> Iterator[BinaryIO]:
    """Yield a file to write; on a clean exit it is fsynced and renamed to `path` (mode 0600).
    On an error the temporary file is removed and `path` is left as it was."""
    tmp = path.with_name(f".{path.name}.{new_secret(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` as a private file (mode 0600 from its first byte, atomic)."""
    with private_file(path) as f:
        f.write(data)
