"""Issue 13's gateway findings: a non-ASCII bearer header is a 401 (not a 500), the key is
checked before a body is read, and `fieldline edge run` refuses to bind off loopback without a
key, saying how to set one."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fieldline.cli.harness.processes import fieldline_cmd
from fieldline.shared.config import GatewaySettings, LLMSettings
from tests.support.tiny_llm import ThreadedGateway

LLM = LLMSettings(device="cpu", autotune=False, kv_cache_bytes=8 * 1024 * 1024)
KEY = "s3cret-gateway-key"


@pytest.fixture(scope="module")
def keyed() -> Iterator[ThreadedGateway]:
    g = ThreadedGateway(GatewaySettings(port=0, api_key=KEY), llm=LLM).start()
    yield g
    g.stop()


def test_non_ascii_bearer_is_401(keyed: ThreadedGateway) -> None:
    for path in ("/v1/models", "/v1/inspect?rule=r&publish=true"):
        r = httpx.post(
            f"{keyed.url}{path}",
            content=b"{}",
            headers={"Authorization": "Bearer s3cr\u00e9t".encode("latin-1")},
        )
        assert r.status_code == 401, (path, r.status_code, r.text)
        assert r.json()["error"]["type"] == "authentication_error"


def test_key_is_checked_before_the_body_is_read(keyed: ThreadedGateway) -> None:
    big = b"[" * (5 * 1024 * 1024)  # over max_body_bytes: without a key it is a 401, not a 413
    r = httpx.post(f"{keyed.url}/v1/inspect?rule=r&publish=true", content=big)
    assert r.status_code == 401
    r = httpx.post(
        f"{keyed.url}/v1/inspect?rule=r", content=big, headers={"Authorization": f"Bearer {KEY}"}
    )
    assert r.status_code == 413


def test_edge_refuses_to_bind_off_loopback_without_a_key(tmp_path: Path) -> None:
    config = tmp_path / "edge.yaml"
    config.write_text("gateway:\n  host: 0.0.0.0\n  port: 0\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIELDLINE_")}
    out = subprocess.run(
        fieldline_cmd(
            "edge", "run", "--config", str(config), "--data", str(tmp_path / "data"),
            "--cloud", "127.0.0.1:1", "--token", "flt_x",
        ),
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert out.returncode == 2, out.stdout + out.stderr
    assert "gateway.api_key" in out.stderr and "FIELDLINE_GATEWAY__API_KEY" in out.stderr
    assert not (tmp_path / "data" / "gateway.json").exists()


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
def test_loopback_needs_no_key(host: str) -> None:
    assert GatewaySettings(host=host).api_key is None


def test_off_loopback_with_a_key_is_accepted() -> None:
    assert GatewaySettings(host="0.0.0.0", api_key=KEY).host == "0.0.0.0"
