"""Fixtures for the engine's model tests: a tiny tokenizer trained here with `tokenizers`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

CORPUS = [
    "the press line stopped at station four",
    "temperature of the oven is within limits",
    "the conveyor belt moves parts to the camera",
    "inspect the weld seam and report defects",
] * 8
# Plant talk in Chinese and Japanese: a tokenizer trained on it has multi-byte pieces, and
# byte-level BPE splits characters the corpus does not merge across several tokens.
CJK_CORPUS = [
    "冲压线在第四工位停止了",
    "烤箱温度在范围内",
    "传送带把零件送到相机",
    "检查焊缝并报告缺陷",
    "プレスラインが停止しました",
    "溶接の継ぎ目を検査してください",
] * 8
SPECIAL = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 match the tiny checkpoints' bos/eos ids


def train_tokenizer(directory: Path, vocab_size: int, corpus: list[str] | None = None) -> Path:
    """Write tokenizer.json and tokenizer_config.json (a byte-level BPE trained on `corpus`,
    CORPUS by default) into `directory`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus or CORPUS, trainer=trainer)
    assert tok.get_vocab_size() <= vocab_size
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True})
    )
    return directory


@pytest.fixture
def tokenizer_factory() -> type[object]:
    """The trainer as a fixture, so tests add a tokenizer to a checkpoint they wrote."""
    return train_tokenizer  # type: ignore[return-value]
