"""Hypothesis strategies for hostile inputs: JSON documents, mutated valid samples, raw bytes."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
from hypothesis import strategies as st
from PIL import Image

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=12), inner, max_size=6)
    ),
    max_leaves=30,
)


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


SEEDS = [
    _png(8, 8),
    _png(1, 300),
    _jpeg(16, 16),
    b'{"ts": 1700000000.5, "value": 21.5}',
    b'{"values": [1, 2, 3], "ts": 1700000000000}',
    b"[[1.0, 2.0], [3.0, 4.0]]",
]


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """A valid sample with bytes flipped, cut, inserted or repeated."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "repeat", "truncate"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del data[pos : pos + draw(st.integers(1, 16))]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "repeat":
            data[pos:pos] = data[pos : pos + 8] * draw(st.integers(1, 64))
        else:
            data = data[:pos]
    return bytes(data)


def json_bytes(values: st.SearchStrategy[Any] = json_values) -> st.SearchStrategy[bytes]:
    return values.map(lambda v: json.dumps(v, allow_nan=True).encode())


payloads = (
    st.binary(max_size=512)
    | mutated(SEEDS)
    | json_bytes()
    | st.text(max_size=200).map(str.encode)
    | st.integers(1, 400).map(lambda n: b"[" * n + b"]" * n)
)
