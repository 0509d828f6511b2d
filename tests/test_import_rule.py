"""The import rule holds, and `make lint` really fails when a module imports across it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("cloud", "edge", "shared", "kernels", "cli")


def _lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    """`make lint-imports` in `tree`, with this interpreter's tools and no reinstall."""
    stamp = tree / ".stamp"
    stamp.touch()  # newer than the copied pyproject.toml: make installs nothing
    return subprocess.run(
        [
            "make",
            "--no-print-directory",
            "-C",
            str(tree),
            "lint-imports",
            f"BIN={Path(sys.executable).parent}",
            f"STAMP={stamp}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the sources, the Makefile and pyproject.toml, to break on purpose."""
    for name in SOURCES:
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy2(ROOT / name, tmp_path / name)
    return tmp_path


def test_the_tree_keeps_the_import_rule(tree: Path) -> None:
    result = _lint_imports(tree)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BROKEN" not in result.stdout


@pytest.mark.parametrize(
    ("module", "bad_import", "contract"),
    [
        # control must not reach into the LLM side
        ("edge/control/backoff.py", "import fieldline.edge.llm.runtime", "control imports none"),
        # nothing but the agent may import the gateway
        (
            "edge/llm/completions.py",
            "import fieldline.edge.gateway.app",
            "nothing imports the gateway",
        ),
        # the cloud never imports the edge
        ("cloud/tunnel/records.py", "import fieldline.edge.store", "cloud and edge never import"),
        # kernels stay free of the rest
        ("kernels/dispatch.py", "import fieldline.shared.config", "kernels import only torch"),
    ],
)
def test_an_import_across_the_rule_fails_lint(
    tree: Path, module: str, bad_import: str, contract: str
) -> None:
    path = tree / module
    path.write_text(path.read_text() + f"\n{bad_import}  # noqa: E402, F401\n")
    result = _lint_imports(tree)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout
    assert contract in result.stdout
    assert bad_import.split()[-1] in result.stdout  # the report names the offending import
