"""Payload checks: what is stored as a reading, an array or an image, and why the rest is refused."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from fieldline.edge.ingest.payloads import PayloadError, classify
from fieldline.shared.limits import MAX_JSON_PAYLOAD_BYTES, MAX_READING_VALUES

LIMIT = 4 * 1024 * 1024


def image(fmt: str, size: tuple[int, int] = (32, 20)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("payload", "kind", "ts_ms"),
    [
        (b'{"ts": 1700000000.5, "value": 21.5, "unit": "C"}', "reading", 1_700_000_000_500),
        (b'{"ts": 1700000000123, "value": true}', "reading", 1_700_000_000_123),
        (b'{"value": "open"}', "reading", None),
        (b'{"ts": 1700000000, "values": [1, 2.5, -3e3]}', "reading", 1_700_000_000_000),
        (b'{"values": [[1, 2], [3, 4]]}', "array", None),
        (b"[0.1, 0.2, 0.3]", "array", None),
    ],
)
def test_valid_json(payload: bytes, kind: str, ts_ms: int | None) -> None:
    p = classify(payload, max_bytes=LIMIT)
    assert (p.kind, p.ts_ms) == (kind, ts_ms)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_images_verified_by_pillow(fmt: str) -> None:
    data = image(fmt)
    assert classify(data, max_bytes=LIMIT).kind == "image"
    with pytest.raises(PayloadError, match=f"broken {fmt}|{fmt}"):
        classify(data[: len(data) // 2] + (b"\xff\xd9" if fmt == "JPEG" else b""), max_bytes=LIMIT)


def test_png_crc_damage_and_pixel_bound() -> None:
    png = bytearray(image("PNG"))
    png[40] ^= 0xFF
    with pytest.raises(PayloadError, match="broken PNG"):
        classify(bytes(png), max_bytes=LIMIT)
    # A header claiming 100k x 100k pixels is refused before anything is decoded.
    big = bytearray(image("PNG"))
    big[16:24] = (100_000).to_bytes(4, "big") * 2
    with pytest.raises(PayloadError, match="too large"):
        classify(bytes(big), max_bytes=LIMIT)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "empty payload"),
        (b"{not json", "not JSON"),
        (b"\xff\xfe\x00", "not JSON"),
        (b"x" * (LIMIT + 1), "exceeds"),
        (b" " * (MAX_JSON_PAYLOAD_BYTES + 1), "exceeds"),
        (b'"a string"', "must be an object"),
        (b"42", "must be an object"),
        (b'{"ts": "yesterday", "value": 1}', "'ts' must be"),
        (b'{"ts": -5, "value": 1}', "positive"),
        (b'{"ts": 1e9, "value": [1]}', "'value' must be"),
        (b'{"ts": 1e9, "value": NaN}', "'value' must be"),
        (b'{"ts": 1e9, "value": Infinity}', "'value' must be"),
        (b'{"ts": 1e9}', "needs 'value' or 'values'"),
        (b'{"values": "1,2"}', "'values' must be an array"),
        (b'{"values": [1, "a"]}', "finite numbers"),
        (b'{"values": [true]}', "finite numbers"),
        (b"[]", "empty array"),
        (b"[" * 50_000, "nested too deeply|not JSON"),
        (b'{"value": ' + b"9" * 400 + b"}", "out of range"),
        (json.dumps([0] * (MAX_READING_VALUES + 1)).encode(), "exceeds|values"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 10, "broken PNG"),
        (b"\xff\xd8\xff\xe0 truncated", "broken JPEG"),
    ],
)
def test_garbage_refused_with_a_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(PayloadError, match=reason):
        classify(payload, max_bytes=LIMIT)
