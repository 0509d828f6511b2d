"""Checking what arrives over MQTT before it is stored: JSON readings, JSON arrays, image frames.

Cheap on purpose (this runs for every message): images are checked by Pillow's header parse and
verify() (chunk CRCs, truncation; ~20 us), not decoded; the inspection runtime decodes them.
Anything else is a PayloadError with the reason.
"""

from __future__ import annotations

import io
import json
import math
import struct
import warnings
from dataclasses import dataclass

from PIL import Image

from fieldline.shared.limits import MAX_IMAGE_PIXELS, MAX_JSON_PAYLOAD_BYTES, MAX_READING_VALUES

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"


class PayloadError(ValueError):
    """A payload that is not a reading, an array or an image; str() is the dead-letter reason."""


@dataclass(frozen=True)
class Payload:
    kind: str  # reading | array | image
    ts_ms: int | None  # the reading's own timestamp, when it has one


def _finite_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _ts_ms(ts: object) -> int:
    """Seconds (float) or milliseconds (int > 1e11) since the epoch."""
    if not _finite_number(ts):
        raise PayloadError("'ts' must be a finite number (epoch seconds or milliseconds)")
    t = float(ts)  # type: ignore[arg-type]
    if t <= 0:
        raise PayloadError("'ts' must be positive")
    return int(t if t > 1e11 else t * 1000)


def _check_png(data: bytes) -> None:
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise PayloadError("broken PNG: no IHDR chunk")
    width, height = struct.unpack(">II", data[16:24])
    if width == 0 or height == 0 or width * height > MAX_IMAGE_PIXELS:
        raise PayloadError(f"PNG of {width}x{height} pixels is empty or too large")


def _check_jpeg(data: bytes) -> None:
    if len(data) < 4 or not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        raise PayloadError("broken JPEG: no end-of-image marker")


def _verify_image(data: bytes, fmt: str) -> None:
    """Pillow parses the header (bounded pixels before anything is decoded) and verifies the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=[fmt]) as im:
                width, height = im.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise PayloadError(f"{fmt} of {width}x{height} pixels is too large")
                im.verify()
    except PayloadError:
        raise
    except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, ValueError, ...)
        raise PayloadError(f"broken {fmt}: {type(exc).__name__}: {str(exc)[:100]}") from None


def classify(data: bytes, *, max_bytes: int) -> Payload:
    """What a payload is, or PayloadError saying why it cannot be stored."""
    if not data:
        raise PayloadError("empty payload")
    if len(data) > max_bytes:
        raise PayloadError(f"payload of {len(data)} bytes exceeds {max_bytes}")
    if data.startswith(PNG_MAGIC):
        _check_png(data)
        _verify_image(data, "PNG")
        return Payload("image", None)
    if data.startswith(JPEG_MAGIC):
        _check_jpeg(data)
        _verify_image(data, "JPEG")
        return Payload("image", None)
    if len(data) > MAX_JSON_PAYLOAD_BYTES:
        raise PayloadError(f"JSON payload of {len(data)} bytes exceeds {MAX_JSON_PAYLOAD_BYTES}")
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        raise PayloadError("not JSON, PNG or JPEG") from None
    except RecursionError:
        raise PayloadError("JSON nested too deeply") from None
    try:
        return _classify_json(doc)
    except OverflowError:  # integers too large for a float
        raise PayloadError("number out of range") from None


def _classify_json(doc: object) -> Payload:
    if isinstance(doc, list):
        _check_values(doc)
        return Payload("array", None)
    if not isinstance(doc, dict):
        raise PayloadError("JSON payload must be an object (a reading) or an array")
    ts = _ts_ms(doc["ts"]) if "ts" in doc else None
    if "value" in doc:
        if not (_finite_number(doc["value"]) or isinstance(doc["value"], str | bool)):
            raise PayloadError("'value' must be a finite number, a string or a boolean")
    elif "values" in doc:
        if not isinstance(doc["values"], list):
            raise PayloadError("'values' must be an array of numbers")
        _check_values(doc["values"])
        return Payload("array" if ts is None else "reading", ts)
    else:
        raise PayloadError("a reading needs 'value' or 'values'")
    return Payload("reading", ts)


def _check_values(values: list[object]) -> None:
    if not values:
        raise PayloadError("empty array")
    flat: list[object] = values
    if isinstance(values[0], list):  # one level of nesting for 2-D inputs
        flat = [v for row in values for v in (row if isinstance(row, list) else [row])]
    if len(flat) > MAX_READING_VALUES:
        raise PayloadError(f"array of {len(flat)} values exceeds {MAX_READING_VALUES}")
    if not all(_finite_number(v) for v in flat):
        raise PayloadError("array values must be finite numbers")
