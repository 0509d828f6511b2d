"""A tiny random-weight Llama written by transformers, with a tokenizer trained here, and the
LLM services with their gateway server run on their own event loop thread, so synchronous
clients (openai, httpx) can talk to them as they would to a node."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import torch

from fieldline.edge.gateway.app import GatewayServer
from fieldline.edge.gateway.deps import GatewayState
from fieldline.edge.llm.services import LLMChoice, LlmServices
from fieldline.shared.config import GatewaySettings, LLMSettings
from fieldline.shared.policy import Policy
from tests.edge.engine.conftest import train_tokenizer

T = TypeVar("T")
VOCAB = 320
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


def write_tiny_llama(
    path: Path,
    *,
    seed: int = 0,
    chat_template: str | None = CHAT_TEMPLATE,
    hidden: int = 64,
    layers: int = 2,
    max_positions: int = 1024,
    vocab: int = VOCAB,
    corpus: list[str] | None = None,
) -> Path:
    """A random Llama checkpoint with tokenizer.json; large init so greedy has no near-ties."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        initializer_range=0.5,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(config).eval().save_pretrained(path, safe_serialization=True)
    (path / "chat_template.jinja").unlink(missing_ok=True)
    train_tokenizer(path, vocab, corpus)
    if chat_template is not None:
        cfg_path = path / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["chat_template"] = chat_template
        cfg_path.write_text(json.dumps(cfg))
    return path


class ThreadedGateway:
    """LlmServices and a GatewayServer on a private event loop thread, built, started and
    stopped as the agent does; call() runs a coroutine there."""

    def __init__(
        self,
        gateway: GatewaySettings | None = None,
        llm: LLMSettings | None = None,
        policy: Policy | None = None,
    ) -> None:
        self.gateway_settings = gateway or GatewaySettings(port=0)
        self.llm_settings = llm or LLMSettings(device="cpu", kv_cache_bytes=8 * 1024 * 1024)
        self.policy = policy or Policy()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, daemon=True, name="gateway-loop"
        )
        self.services: LlmServices | None = None
        self.server: GatewayServer | None = None

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 300) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> ThreadedGateway:
        self._thread.start()

        async def build() -> tuple[LlmServices, GatewayServer]:
            services = LlmServices(self.gateway_settings, self.llm_settings, lambda: self.policy)
            await services.start()
            server = GatewayServer(GatewayState(settings=self.gateway_settings, services=services))
            await server.start()
            return services, server

        self.services, self.server = self.call(build())
        return self

    @property
    def loop_thread_name(self) -> str:
        return self._thread.name

    @property
    def state(self) -> GatewayState:
        assert self.server is not None
        return self.server.state

    def load(self, path: Path, name: str = "assistant", version: str = "1") -> None:
        """Serve the checkpoint at `path`, and wait for the warm-up that follows a load."""
        services = self.services
        assert services is not None

        async def apply() -> None:
            await services.apply(LLMChoice(name, version, path))
            await services.prefetcher.settled()

        self.call(apply())

    @property
    def url(self) -> str:
        assert self.server is not None and self.server.port is not None, "not listening"
        return f"http://127.0.0.1:{self.server.port}"

    def stop(self) -> None:
        async def stop(server: GatewayServer, services: LlmServices) -> None:
            await server.stop()
            await services.stop()

        if self.server is not None and self.services is not None:
            self.call(stop(self.server, self.services))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()
