"""fieldline.edge.engine: the paged-KV LLM engine (scheduler, block manager, model runner)."""

from fieldline.edge.engine.async_engine import AsyncLLMEngine, StreamDelta
from fieldline.edge.engine.config import EngineConfig
from fieldline.edge.engine.engine import LLMEngine, RequestOutput
from fieldline.edge.engine.sequence import SamplingParams

__all__ = [
    "AsyncLLMEngine",
    "EngineConfig",
    "LLMEngine",
    "RequestOutput",
    "SamplingParams",
    "StreamDelta",
]
