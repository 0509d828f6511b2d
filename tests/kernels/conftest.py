"""Kernel tests: which device the Triton kernels run on, and making sure they really run that way.

Default: the Triton interpreter on CPU tensors. With a CUDA GPU and TRITON_INTERPRET=0 set
explicitly, the compiled kernels run on the GPU (`TRITON_INTERPRET=0 pytest tests/kernels`).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# What we found (triton 3.9): `@triton.jit` picks a compiled JITFunction or an
# InterpretedFunction when a function is *decorated*, reading TRITON_INTERPRET at that moment.
# That happens twice: when triton itself is imported (triton.language.standard decorates
# tl.sum, tl.max, ... with @jit) and when fieldline.kernels.<module> is imported. So:
# - nothing imported triton yet (running this folder alone, or first): setting the variable
#   here is enough (tests/conftest.py sets it too);
# - triton was imported under the flag but our kernel modules were not (the variable changed in
#   between): `kernels_mode` reloads the kernel modules under the flag; reload re-executes them in
#   the same module dict and the launchers look their kernel up there at call time, so launchers
#   imported earlier run the re-decorated kernels; they are reloaded back afterwards;
# - triton was imported without the flag (another test folder imported it compiled in this
#   pytest process): its own @jit helpers are compiled and an interpreted kernel calling
#   tl.sum fails with "Cannot call @triton.jit'd outside of the scope of a kernel", and reloading
#   triton's modules is not safe. Then each test module runs once in a fresh interpreter
#   (`pytest_pyfunc_call` below) and every test reports its own outcome from that run.
ON_GPU = os.environ.get("TRITON_INTERPRET") == "0" and torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"

KERNEL_MODULES = (
    "fieldline.kernels.kv_cache",
    "fieldline.kernels.paged_attention",
    "fieldline.kernels.w8a16",
)
SUBPROCESS_TIMEOUT_S = 600
_RESULTS = pytest.StashKey[dict[Path, dict[str, str | None]]]()


def triton_imported_compiled() -> bool:
    """True when triton was imported without TRITON_INTERPRET=1 (its @jit helpers compiled)."""
    if "triton" not in sys.modules:
        return False
    from triton.language import standard
    from triton.runtime.interpreter import InterpretedFunction

    return not isinstance(standard.sum, InterpretedFunction)


IN_SUBPROCESS = not ON_GPU and triton_imported_compiled()


def kernels_interpreted() -> bool:
    """True when every kernel module's @triton.jit kernels are InterpretedFunctions."""
    from triton.runtime.interpreter import InterpretedFunction

    from fieldline.kernels import kv_cache, paged_attention, w8a16

    kernels = (
        kv_cache._write_kv_kernel,
        paged_attention._paged_attention_kernel,
        w8a16._w8a16_kernel,
    )
    return all(isinstance(k, InterpretedFunction) for k in kernels)


def _reload_kernels(interpret: bool) -> None:
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        for name in KERNEL_MODULES:
            importlib.reload(importlib.import_module(name))
    finally:
        if before is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = before


@pytest.fixture(scope="package", autouse=True)
def kernels_mode() -> Iterator[None]:
    """Make the kernels interpreted (CPU) or compiled (GPU) as this folder needs, then restore."""
    if IN_SUBPROCESS:  # the tests' bodies run in a fresh interpreter instead
        yield
        return
    want_interpreted = not ON_GPU
    was_interpreted = kernels_interpreted()
    if was_interpreted != want_interpreted:
        _reload_kernels(want_interpreted)
    assert kernels_interpreted() == want_interpreted
    try:
        yield
    finally:
        if was_interpreted != want_interpreted:
            _reload_kernels(was_interpreted)


@pytest.fixture(scope="package")
def device() -> torch.device:
    """Where the test tensors live: CUDA for compiled kernels, CPU for the interpreter."""
    return torch.device("cuda" if ON_GPU else "cpu")


def _run_module_in_subprocess(item: pytest.Function) -> dict[str, str | None]:
    """Run this module's selected tests in a fresh pytest; map test name -> failure text or None."""
    node_ids = [i.nodeid for i in item.session.items if i.path == item.path]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    with tempfile.TemporaryDirectory(prefix="fieldline-kernels-") as tmp:
        report = Path(tmp) / "junit.xml"
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
             f"--junitxml={report}", *node_ids],
            cwd=item.config.rootpath, env=env, capture_output=True, text=True,
            timeout=SUBPROCESS_TIMEOUT_S,
        )  # fmt: skip
        if not report.exists():
            raise AssertionError(f"kernel test subprocess wrote no report:\n{proc.stdout[-3000:]}")
        results: dict[str, str | None] = {}
        for case in ET.parse(report).iter("testcase"):
            # (find() each tag explicitly: an Element without children is falsy.)
            found = (case.find(tag) for tag in ("failure", "error", "skipped"))
            problem = next((p for p in found if p is not None), None)
            results[case.get("name", "")] = (
                None if problem is None else f"{problem.get('message')}\n{problem.text or ''}"
            )
        return results


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """In subprocess mode, report the outcome the fresh interpreter saw instead of running here."""
    if not IN_SUBPROCESS:
        return None
    cache = pyfuncitem.session.stash.setdefault(_RESULTS, {})
    if pyfuncitem.path not in cache:
        cache[pyfuncitem.path] = _run_module_in_subprocess(pyfuncitem)
    results = cache[pyfuncitem.path]
    if pyfuncitem.name not in results:
        raise AssertionError(f"{pyfuncitem.nodeid} did not run in the kernel test subprocess")
    failure = results[pyfuncitem.name]
    if failure is not None:
        # An xfail-marked test re-raises here too, so strict xfail keeps its meaning.
        raise AssertionError(f"in a fresh interpreter (TRITON_INTERPRET=1):\n{failure}")
    return True
