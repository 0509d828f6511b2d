"""Choosing the next token: greedy, temperature, top-k, top-p, with a per-request seed."""

from __future__ import annotations

import torch

from fieldline.edge.engine.sequence import SamplingParams


def sample(
    logits: torch.Tensor,  # [N, vocab] float32
    params: list[SamplingParams],
    generators: list[torch.Generator],
) -> list[int]:
    """One token per row; each row draws from its own generator, so batching never changes it."""
    out: list[int] = []
    # one argmax over the batch serves every greedy row
    greedy = logits.argmax(dim=-1).tolist() if any(p.temperature <= 0 for p in params) else []
    for i, (row, p, gen) in enumerate(zip(logits, params, generators, strict=True)):
        if p.temperature <= 0:
            out.append(greedy[i])
            continue
        scores = row / p.temperature
        if p.top_k and p.top_k < scores.shape[-1]:
            kth = torch.topk(scores, p.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=True)
            probs = torch.softmax(sorted_scores, dim=-1)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            outside = (torch.cumsum(probs, dim=-1) - probs) >= p.top_p
            sorted_scores = sorted_scores.masked_fill(outside, float("-inf"))
            scores = torch.full_like(scores, float("-inf")).scatter(0, order, sorted_scores)
        probs = torch.softmax(scores, dim=-1)
        out.append(int(torch.multinomial(probs, 1, generator=gen)))
    return out
