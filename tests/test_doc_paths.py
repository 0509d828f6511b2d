"""Every source path that docs, docstrings and comments name exists, so they stay true to the tree."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = "edge|cloud|shared|kernels|cli|tests|bench|deploy|docs"
PATH = re.compile(
    rf"(?<![\w/.-])((?:{FOLDERS})/[\w/.-]*\.(?:py|md|yaml|yml|toml|proto|html|service|json))"
)
SKIP_SUFFIXES = {".png", ".jpg", ".onnx", ".pyi"}


def _tracked() -> list[Path]:
    out = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    return [ROOT / f for f in out.split()]


def test_named_paths_exist() -> None:
    missing = []
    for path in _tracked():
        if path.suffix in SKIP_SUFFIXES or "_pb2" in path.name or not path.is_file():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            for match in PATH.finditer(line):
                ref = match.group(1).rstrip(".")
                if not (ROOT / ref).exists():
                    missing.append(f"{path.relative_to(ROOT)}:{number}: {ref}")
    assert not missing, "paths named but not in the tree:\n" + "\n".join(missing)
