"""The checkpoint's tokenizer through the `tokenizers` library, when tokenizer.json is present."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer


class Tokenizer:
    def __init__(self, tok: HFTokenizer, eos_token_ids: list[int], add_bos: int | None):
        self._tok = tok
        self.eos_token_ids = eos_token_ids
        self._bos = add_bos

    def encode(self, text: str) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self._bos, *ids] if self._bos is not None else list(ids)

    def decode(self, ids: list[int]) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=True))


def load_tokenizer(model_dir: str | Path) -> Tokenizer | None:
    d = Path(model_dir)
    if not (d / "tokenizer.json").exists():
        return None
    tok = HFTokenizer.from_file(str(d / "tokenizer.json"))
    eos: list[int] = []
    bos: int | None = None
    cfg_path = d / "tokenizer_config.json"
    if cfg_path.exists():
        cfg = json.loads(cfg_path.read_text())
        for key in ("eos_token",):
            value = cfg.get(key)
            name = value.get("content") if isinstance(value, dict) else value
            if isinstance(name, str) and tok.token_to_id(name) is not None:
                eos.append(int(tok.token_to_id(name)))
        bos_name = cfg.get("bos_token")
        bos_name = bos_name.get("content") if isinstance(bos_name, dict) else bos_name
        if cfg.get("add_bos_token") and isinstance(bos_name, str):
            bos = tok.token_to_id(bos_name)
    return Tokenizer(tok, eos, bos)
