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


def _layout_block(doc: Path, heading: str) -> str:
    text = doc.read_text()
    section = text[text.index(heading) :]
    start = section.index("```") + 3
    return section[start : section.index("```", start)]


def test_architecture_layout_names_every_package_and_top_module() -> None:
    """docs/architecture.md's layout lists each sub-package of edge/, cloud/, cli/ and each module
    at the top of edge/ (what a newcomer looks for first)."""
    block = _layout_block(ROOT / "docs" / "architecture.md", "## Layout and the import rule")
    missing = []
    for top in ("edge", "cloud", "cli"):
        for child in sorted((ROOT / top).iterdir()):
            if (child / "__init__.py").exists() and f"{child.name}/" not in block:
                missing.append(f"{top}/{child.name}/")
    for module in sorted((ROOT / "edge").glob("*.py")):
        if module.name != "__init__.py" and module.name not in block:
            missing.append(f"edge/{module.name}")
    assert not missing, f"not in docs/architecture.md's layout: {missing}"


def test_readme_layout_names_every_top_folder() -> None:
    block = _layout_block(ROOT / "README.md", "## Layout")
    for name in ("cloud", "edge", "shared", "kernels", "cli", "tests", "bench"):
        assert f"{name}/" in block
    for part in ("control/", "ingest/", "inspection/", "llm/", "gateway/", "engine/", "harness/"):
        assert part in block
