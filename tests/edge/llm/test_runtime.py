"""The LLM runtime over the real engine and tiny random Llamas written by transformers: load
(from a directory and from an installed tar), swap to a new version while the old one
drains, a failed load reported in LlmHealth and per-model health, deactivate."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from fieldline.edge.engine.sequence import SamplingParams
from fieldline.edge.llm.runtime import LLMRuntime, ModelUnavailable, ServedModel
from fieldline.shared.config import LLMSettings
from fieldline.shared.llm_artifact import pack_checkpoint
from tests.support.tiny_llm import write_tiny_llama

SETTINGS = LLMSettings(device="cpu", autotune=False, kv_cache_bytes=4 * 1024 * 1024)
NAME = "assistant"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(2)
    return write_tiny_llama(tmp_path_factory.mktemp("runtime") / "tiny")


@pytest.fixture
def broken(tmp_path: Path) -> Path:
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text('{"model_type": "gpt2"}')
    return tmp_path / "broken"


async def tokens(served: ServedModel, n: int = 4) -> list[int]:
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    return [t async for ids, _ in served.engine.generate([1, 5, 9], params) for t in ids]


def test_load_from_an_installed_tar_reports_the_engine_config(
    checkpoint: Path, tmp_path: Path
) -> None:
    artifact = tmp_path / "artifacts" / "assistant-1.tar"
    artifact.parent.mkdir()
    pack_checkpoint(checkpoint, artifact)

    async def main() -> None:
        runtime = LLMRuntime(SETTINGS)
        loading = asyncio.create_task(runtime.activate(NAME, "1", artifact))
        await asyncio.sleep(0)  # the load is now in its worker thread
        health = runtime.health()
        assert (health.state, health.loading, health.loading_ref) == (
            "loading",
            True,
            "assistant@1",
        )
        with pytest.raises(ModelUnavailable, match="assistant@1 is loading"):
            async with runtime.lease():
                pass
        assert await loading
        health = runtime.health()
        assert (health.state, health.loaded, health.model, health.version) == (
            "serving",
            True,
            NAME,
            "1",
        )
        assert health.engine_config is not None and health.engine_config.device == "cpu"
        assert health.engine_config.kv_cache_bytes == SETTINGS.kv_cache_bytes
        assert health.chat_template == "checkpoint" and not health.loading
        async with runtime.lease() as served:
            assert served.ref == "assistant@1" and len(await tokens(served)) == 4
        await runtime.stop()
        assert runtime.health().state == "none"

    asyncio.run(main())


def test_a_new_version_takes_new_requests_while_the_old_drains(checkpoint: Path) -> None:
    async def main() -> None:
        runtime = LLMRuntime(SETTINGS)
        changes: list[str | None] = []
        runtime.on_change.append(lambda s: changes.append(s.ref if s else None))
        assert await runtime.activate(NAME, "1", checkpoint)
        async with runtime.lease() as old:
            assert await runtime.activate(NAME, "2", checkpoint)
            assert runtime.health().version == "2" and runtime.health().retiring == 1
            # the old version still serves the request that leased it
            assert old.engine.running and await tokens(old) == await tokens(runtime.current)  # type: ignore[arg-type]
        await runtime.retired()
        assert not old.engine.running and runtime.health().retiring == 0
        assert changes == ["assistant@1", "assistant@2"]
        assert await runtime.activate(NAME, "2", checkpoint)  # the same version: nothing to do
        assert changes == ["assistant@1", "assistant@2"]
        await runtime.stop()

    asyncio.run(main())


def test_a_failed_load_is_reported_and_the_old_version_keeps_serving(
    checkpoint: Path, broken: Path
) -> None:
    async def main() -> None:
        runtime = LLMRuntime(SETTINGS)
        assert not await runtime.activate(NAME, "0", broken)
        health = runtime.health()
        assert (health.state, health.loaded) == ("failed", False)
        assert health.error is not None and "gpt2" in health.error
        assert "gpt2" in runtime.unavailable_reason()

        assert await runtime.activate(NAME, "1", checkpoint)
        assert runtime.health().error is None
        assert not await runtime.activate(NAME, "2", broken)
        health = runtime.health()
        assert (health.state, health.version) == ("serving", "1")
        assert health.error is not None and "assistant@2 failed to load" in health.error
        # what a rollout gate reads: the version that did not load, and why
        failed = runtime.model_health()[NAME]
        assert (failed.version, failed.kind, failed.loaded) == ("2", "llm", False)
        assert failed.error is not None and "gpt2" in failed.error
        async with runtime.lease() as served:
            assert served.version == "1"
        await runtime.stop()

    asyncio.run(main())


def test_per_model_health_counts_the_window(checkpoint: Path) -> None:
    async def main() -> None:
        runtime = LLMRuntime(SETTINGS)
        assert await runtime.activate(NAME, "1", checkpoint)
        async with runtime.lease() as served:
            for _ in range(3):
                await tokens(served)
        health = runtime.model_health()[NAME]
        assert (health.loaded, health.serving, health.requests, health.window_requests) == (
            True,
            True,
            3,
            3,
        )
        assert health.error_rate == 0.0 and health.p95_latency_ms is not None
        assert health.p95_latency_ms > 0
        await runtime.stop()

    asyncio.run(main())


def test_deactivate_stops_serving(checkpoint: Path) -> None:
    async def main() -> None:
        runtime = LLMRuntime(SETTINGS)
        changes: list[str | None] = []
        runtime.on_change.append(lambda s: changes.append(s.ref if s else None))
        assert await runtime.activate(NAME, "1", checkpoint)
        await runtime.deactivate()
        assert changes == ["assistant@1", None]
        health = runtime.health()
        assert (health.state, health.loaded, health.model, health.engine_config) == (
            "none",
            False,
            None,
            None,
        )
        with pytest.raises(ModelUnavailable, match="no LLM artifact is active"):
            async with runtime.lease():
                pass
        await runtime.retired()
        assert runtime.model_health() == {}
        await runtime.stop()

    asyncio.run(main())
