"""ModelRunner: loads the model, owns the paged KV cache, turns scheduled sequences into one flat batch."""

from __future__ import annotations

from pathlib import Path

import structlog
import torch

from fieldline.edge.engine.config import EngineConfig
from fieldline.edge.engine.loader import ModelConfig, load_weights, read_config
from fieldline.edge.engine.models.llama import Batch, LlamaModel
from fieldline.edge.engine.sampler import sample
from fieldline.edge.engine.scheduler import ScheduledSeq
from fieldline.edge.engine.sequence import Sequence
from fieldline.edge.engine.tokenizer import Tokenizer, load_tokenizer
from fieldline.kernels.dispatch import get_attention_backend

log = structlog.get_logger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelRunner:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = torch.device(config.device)
        self.dtype = DTYPES[config.dtype]
        model_dir = Path(config.model)
        self.model_config: ModelConfig = read_config(model_dir)
        self.tokenizer: Tokenizer | None = load_tokenizer(model_dir)
        backend = get_attention_backend(self.device, config.attention_backend)
        self.model = LlamaModel(
            self.model_config,
            load_weights(model_dir),
            dtype=self.dtype,
            device=self.device,
            backend=backend,
            prepack_batch=config.max_num_seqs if config.prepack_weights else None,
        )
        mc = self.model_config
        bs = config.block_size
        # bytes per block over all layers, K and V
        self.bytes_per_block = (
            2 * mc.num_layers * bs * mc.num_kv_heads * mc.head_dim * self.dtype.itemsize
        )
        self.num_blocks = config.resolve_num_blocks(self.bytes_per_block)
        max_len = config.max_model_len or mc.max_position_embeddings
        if self.num_blocks * bs < max_len:
            # still usable (sequences are preempted or capped), but say so: one request of
            # max_model_len tokens cannot fit and the scheduler will refuse or cap it
            log.warning(
                "kv cache smaller than one max-length sequence",
                kv_slots=self.num_blocks * bs,
                max_model_len=max_len,
            )
        shape = (self.num_blocks, bs, mc.num_kv_heads, mc.head_dim)
        self.kv_caches = [
            (
                torch.zeros(shape, dtype=self.dtype, device=self.device),
                torch.zeros(shape, dtype=self.dtype, device=self.device),
            )
            for _ in range(mc.num_layers)
        ]
        self._default_gen_seed = config.seed
        log.info(
            "model loaded",
            model=str(model_dir),
            type=mc.model_type,
            layers=mc.num_layers,
            backend=backend.name,
            kv_blocks=self.num_blocks,
            kv_bytes=self.num_blocks * self.bytes_per_block,
            quantization=mc.quantization,
        )

    def _generator(self, seq: Sequence) -> torch.Generator:
        gen: torch.Generator | None = getattr(seq, "generator", None)
        if gen is None:
            seed = seq.sampling_params.seed
            if seed is None:  # unseeded requests still differ from each other, reproducibly
                seed = self._default_gen_seed * 1_000_003 + seq.seq_id
            gen = torch.Generator().manual_seed(seed)
            seq.generator = gen  # type: ignore[attr-defined]
        return gen

    def build_batch(self, batch: list[ScheduledSeq]) -> Batch:
        bs = self.config.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        cu = [0]
        ctx: list[int] = []
        sample_rows: list[int] = []
        max_blocks = max(len(s.seq.block_table) for s in batch)
        tables = torch.zeros((len(batch), max(1, max_blocks)), dtype=torch.int32)
        for i, s in enumerate(batch):
            seq = s.seq
            start = seq.num_computed_tokens
            end = start + s.num_new_tokens
            ids.extend(seq.token_ids[start:end])
            for pos in range(start, end):
                positions.append(pos)
                slots.append(seq.block_table[pos // bs] * bs + pos % bs)
            cu.append(cu[-1] + s.num_new_tokens)
            ctx.append(end)
            tables[i, : len(seq.block_table)] = torch.tensor(seq.block_table, dtype=torch.int32)
            if s.sample:
                sample_rows.append(cu[-1] - 1)
        dev = self.device
        return Batch(
            input_ids=torch.tensor(ids, dtype=torch.int64, device=dev),
            positions=torch.tensor(positions, dtype=torch.int64, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=tables.to(dev),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=dev),
            context_lens=torch.tensor(ctx, dtype=torch.int32, device=dev),
            logits_indices=torch.tensor(sample_rows, dtype=torch.int64, device=dev),
        )

    def logits(self, batch: list[ScheduledSeq]) -> torch.Tensor:
        """Logits [sampled sequences, vocab] of one step (the parity tests compare these)."""
        return self.model.forward(self.build_batch(batch), self.kv_caches)

    def execute(self, batch: list[ScheduledSeq]) -> list[int | None]:
        logits = self.logits(batch)
        sampled = [s for s in batch if s.sample]
        tokens = sample(
            logits.cpu(),
            [s.seq.sampling_params for s in sampled],
            [self._generator(s.seq) for s in sampled],
        )
        it = iter(tokens)
        return [next(it) if s.sample else None for s in batch]
