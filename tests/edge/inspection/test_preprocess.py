"""Payload decoding and output post-processing as inspection rules declare them."""

from __future__ import annotations

import contextlib
import io
import json
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from pydantic import ValidationError

from fieldline.edge.inspection.preprocess import (
    Geometry,
    PayloadError,
    fit_to_input,
    postprocess_output,
    preprocess_frame,
    preprocess_payload,
)
from fieldline.shared.policy import Postprocess, Preprocess


def _encode(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def test_rgb_image_is_resized_normalized_and_laid_out() -> None:
    rgb = np.zeros((20, 30, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 255, 128, 0
    pre = Preprocess(resize=(10, 12), mean=[1.0, 0.5, 0.0], std=[2.0, 1.0, 1.0])
    chw = preprocess_payload(_encode(rgb), pre)
    assert chw.shape == (3, 10, 12) and chw.dtype == np.float32
    np.testing.assert_allclose(chw[:, 0, 0], [0.0, 128 / 255 - 0.5, 0.0], atol=1e-6)
    hwc = preprocess_payload(_encode(rgb), pre.model_copy(update={"layout": "NHWC"}))
    assert hwc.shape == (10, 12, 3)
    np.testing.assert_allclose(hwc.transpose(2, 0, 1), chw)


def test_letterbox_keeps_the_aspect_pads_and_remembers_how() -> None:
    rgb = np.full((30, 90, 3), 200, dtype=np.uint8)  # 90 wide, 30 high
    pre = Preprocess(resize=(60, 60), resize_mode="letterbox", pad_value=7, scale=1.0)
    chw, geometry = preprocess_frame(_encode(rgb), pre)
    assert chw.shape == (3, 60, 60)
    assert geometry == Geometry(30, 90, 60, 60, 60 / 90, 20 / 30, 0, 20)
    np.testing.assert_array_equal(chw[:, :20], 7)  # padding above and below
    np.testing.assert_array_equal(chw[:, 40:], 7)
    np.testing.assert_array_equal(chw[:, 20:40], 200)
    back = geometry.to_original(np.array([[0.0, 20.0, 60.0, 40.0], [-5, 0, 30, 70]]))
    np.testing.assert_allclose(back, [[0, 0, 90, 30], [0, 0, 45, 30]])


def test_channel_order_bgr_reverses_the_channels() -> None:
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[..., 0] = 255  # red
    bgr = preprocess_payload(_encode(rgb), Preprocess(channel_order="BGR", scale=1.0))
    np.testing.assert_array_equal(bgr[:, 0, 0], [0, 0, 255])
    stretched, geometry = preprocess_frame(_encode(rgb), Preprocess(resize=(8, 2)))
    assert stretched.shape == (3, 8, 2) and geometry == Geometry(4, 4, 8, 2, 0.5, 2.0)


def test_the_rule_refuses_settings_that_cannot_work() -> None:
    with pytest.raises(ValidationError, match="letterbox needs"):
        Preprocess(resize_mode="letterbox")
    with pytest.raises(ValidationError, match="needs labels and defect_labels"):
        Postprocess(mode="detect", labels=["scratch"])
    with pytest.raises(ValidationError, match=r"\['dent'\] are not in labels"):
        Postprocess(mode="segment", labels=["bg", "scratch"], defect_labels=["scratch", "dent"])
    # the existing modes keep their defaults and meaning
    assert Postprocess().mode == "classify" and Preprocess().resize_mode == "stretch"


def test_grayscale_jpeg_is_accepted() -> None:
    img = np.full((8, 8, 3), 200, dtype=np.uint8)
    x = preprocess_payload(_encode(img, "JPEG"), Preprocess(grayscale=True, scale=1.0))
    assert x.shape == (1, 8, 8) and abs(float(x.mean()) - 200) < 3


def test_json_arrays_and_values_objects() -> None:
    pre = Preprocess(decoder="array", scale=2.0)
    np.testing.assert_array_equal(preprocess_payload(b"[1, 2, 3]", pre), [2, 4, 6])
    payload = json.dumps({"ts": 1, "values": [[1, 2], [3, 4]]}).encode()
    assert preprocess_payload(payload, pre).shape == (2, 2)
    with pytest.raises(PayloadError) as err:
        preprocess_payload(b"[1, 2", pre)
    assert err.value.reason == "json"
    with pytest.raises(PayloadError) as err:
        preprocess_payload(b"[true, null]", pre)
    assert err.value.reason == "array"


def test_per_channel_stats_must_fit_the_channels() -> None:
    with pytest.raises(PayloadError) as err:
        preprocess_payload(_encode(np.zeros((4, 4, 3), np.uint8)), Preprocess(mean=[0.1, 0.2]))
    assert err.value.reason == "shape"


def test_fit_to_input_reshapes_flat_arrays_and_refuses_misfits() -> None:
    assert fit_to_input(np.zeros(12, np.float32), (3, 4)).shape == (3, 4)
    assert fit_to_input(np.zeros((3, 7), np.float32), (3, None)).shape == (3, 7)
    with pytest.raises(PayloadError):
        fit_to_input(np.zeros(11, np.float32), (3, 4))


def test_classify_threshold_and_label_map() -> None:
    post = Postprocess(labels=["good", "scratch", "hole"], defect_labels=["scratch", "hole"])
    d = postprocess_output(np.log(np.array([0.2, 0.1, 0.7])), post)
    assert (d.label, d.defect) == ("hole", True) and d.score == pytest.approx(0.7)
    d = postprocess_output(np.log(np.array([0.6, 0.25, 0.15])), post)
    assert (d.label, d.defect) == ("good", False) and d.score == pytest.approx(0.6)
    # A lower threshold flags a defect label that does not win outright.
    strict = post.model_copy(update={"threshold": 0.2})
    d = postprocess_output(np.log(np.array([0.6, 0.25, 0.15])), strict)
    assert (d.label, d.defect) == ("scratch", True)
    # Probabilities as given (no softmax), labels missing -> index names.
    d = postprocess_output(np.array([0.1, 0.9]), Postprocess(softmax=False))
    assert (d.label, d.defect, d.score) == ("1", False, pytest.approx(0.9))


def test_anomaly_score() -> None:
    post = Postprocess(mode="anomaly", threshold=0.8)
    assert postprocess_output(np.array([0.9]), post).defect
    d = postprocess_output(np.array([[0.3]]), post)
    assert (d.label, d.defect, d.score) == ("normal", False, pytest.approx(0.3))
    with pytest.raises(PayloadError):
        postprocess_output(np.array([np.nan]), post)


_PNG = _encode(np.random.default_rng(0).integers(0, 255, (16, 16), dtype=np.uint8))


@settings(max_examples=300, deadline=None)
@given(
    cut=st.integers(0, len(_PNG)),
    flips=st.lists(st.tuples(st.integers(0, len(_PNG) - 1), st.integers(0, 255)), max_size=8),
    tail=st.binary(max_size=64),
)
def test_corrupted_images_raise_only_payload_errors(
    cut: int, flips: list[tuple[int, int]], tail: bytes
) -> None:
    data = bytearray(_PNG)
    for pos, value in flips:
        data[pos] = value
    payload = bytes(data[:cut]) + tail
    try:
        x = preprocess_payload(payload, Preprocess(grayscale=True, resize=(16, 16)))
    except PayloadError:
        return
    assert x.shape == (1, 16, 16) and np.all(np.isfinite(x))


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(max_size=256) | st.text(max_size=128).map(str.encode))
def test_arbitrary_bytes_raise_only_payload_errors(payload: bytes) -> None:
    for pre in (Preprocess(), Preprocess(decoder="array")):
        with contextlib.suppress(PayloadError):
            preprocess_payload(payload, pre)


@pytest.mark.parametrize(
    ("side", "reason"),
    [(8_000, "too_large"), (100_000, "image")],  # ours, then Pillow's bound
)
def test_a_png_claiming_huge_dimensions_is_refused_before_decoding(side: int, reason: str) -> None:
    # Rewrite the IHDR of a real PNG to claim side x side pixels (CRC fixed up).
    ihdr = bytearray(_PNG[12:29])  # b"IHDR" + 13 bytes of header
    ihdr[4:12] = struct.pack(">II", side, side)
    bomb = _PNG[:12] + bytes(ihdr) + struct.pack(">I", zlib.crc32(ihdr)) + _PNG[33:]
    with pytest.raises(PayloadError) as err:
        preprocess_payload(bomb, Preprocess())
    assert err.value.reason == reason
