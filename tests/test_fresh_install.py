"""README's quick start on a CPU gateway: a fresh venv, `pip install .` (no extras, so no triton),
and the engine loads and serves a checkpoint."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

from tests.support.tiny_llm import write_tiny_llama

ROOT = Path(__file__).resolve().parents[1]
INSTALL_TIMEOUT_S = 900  # torch's wheel comes from the machine's disk; the rest from the registry


def _source_copy(dst: Path) -> Path:
    """The checkout's files as git sees them (no build/ or egg-info left by earlier builds)."""
    listed = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, listed):
        src = ROOT / name
        if src.is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)
    return dst


def test_plain_install_generates_without_triton(tmp_path: Path) -> None:
    source = _source_copy(tmp_path / "src")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    install = subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT_S,
        env=env,
    )
    assert install.returncode == 0, install.stderr[-4000:]

    probe = subprocess.run(
        [
            str(python),
            "-c",
            "import importlib.util, fieldline.kernels, fieldline.kernels.dispatch;"
            " print(importlib.util.find_spec('triton') is None)",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "True", "triton must not come with a plain install"

    model = write_tiny_llama(tmp_path / "ckpt")
    run = subprocess.run(
        [
            str(env_dir / "bin" / "fieldline"),
            "engine",
            "generate",
            "--model",
            str(model),
            "--prompt",
            "the line stopped because",
            "--max-tokens",
            "12",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.strip(), "generate printed no tokens"
    assert sys.executable not in run.stderr  # ran in the fresh venv, not this one
