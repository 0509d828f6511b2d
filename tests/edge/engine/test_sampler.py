"""Sampling: seeded draws reproduce, whatever the batch; top-k and top-p never leave their set."""

from __future__ import annotations

from pathlib import Path

import torch

from fieldline.edge.engine.sampler import sample
from fieldline.edge.engine.sequence import SamplingParams


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_greedy_is_argmax() -> None:
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 1.0, 4.9]])
    p = SamplingParams(temperature=0.0)
    assert sample(logits, [p, p], [gen(0), gen(0)]) == [1, 0]


def test_seeded_sampling_reproduces_regardless_of_batch() -> None:
    torch.manual_seed(0)
    logits = torch.randn(1, 50)
    p = SamplingParams(temperature=1.0, seed=7)
    alone = [sample(logits, [p], [g])[0] for g in [gen(7)] for _ in range(1)]
    g = gen(7)
    first = [sample(logits, [p], [g])[0] for _ in range(20)]
    g1, g2 = gen(7), gen(99)
    other = SamplingParams(temperature=1.0, seed=99)
    batched = [sample(torch.cat([logits, logits]), [p, other], [g1, g2])[0] for _ in range(20)]
    assert first == batched
    assert first[0] == alone[0]


def test_top_k_never_leaves_the_k_best() -> None:
    torch.manual_seed(1)
    logits = torch.randn(1, 100)
    allowed = set(torch.topk(logits[0], 5).indices.tolist())
    p = SamplingParams(temperature=2.0, top_k=5)
    g = gen(3)
    drawn = {sample(logits, [p], [g])[0] for _ in range(500)}
    assert drawn <= allowed
    assert len(drawn) > 1


def test_top_p_never_leaves_the_nucleus() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.04, 0.01])
    logits = probs.log().unsqueeze(0)
    p = SamplingParams(temperature=1.0, top_p=0.75)  # nucleus: the first two (0.5 + 0.3)
    g = gen(5)
    drawn = {sample(logits, [p], [g])[0] for _ in range(500)}
    assert drawn == {0, 1}


def test_seeded_request_reproduces_through_the_engine(tmp_path: Path) -> None:
    """Same seed, same tokens: alone, or batched with other (seeded and unseeded) requests."""
    from fieldline.edge.engine.config import EngineConfig
    from fieldline.edge.engine.engine import LLMEngine
    from tests.edge.engine.test_parity import write_checkpoint

    model = write_checkpoint(tmp_path / "m", "qwen2")
    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=1234, max_tokens=12)
    params.ignore_eos = True
    prompt = [5, 9, 17, 33, 65]

    def run(prompts: list[list[int]], ps: list[SamplingParams]) -> list[int]:
        engine = LLMEngine(EngineConfig(model=str(model), max_num_seqs=4))
        return engine.generate(prompts, ps)[0].output_token_ids

    alone = run([prompt], [params])
    other = SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)
    mixed = run(
        [prompt, [7] * 40, [8, 9], prompt],
        [params, other, SamplingParams(temperature=0.7, seed=5, max_tokens=3), other],
    )
    assert len(alone) == 12 and alone == mixed
    assert run([prompt], [SamplingParams(temperature=1.0, seed=4321, max_tokens=12)]) != alone
