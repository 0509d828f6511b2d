"""Fuzzing the MQTT payload decoders: the ingest check (edge/ingest/payloads.py) and the inspection
pre-processing (edge/inspection/preprocess.py). Any input either decodes or raises their PayloadError."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given

from fieldline.edge.ingest import payloads
from fieldline.edge.inspection import preprocess
from fieldline.shared.policy import Preprocess
from tests.fuzz.conftest import LONG, QUICK, budget
from tests.fuzz.strategies import payloads as payload_bytes

MAX_BYTES = 64 * 1024
PRE = [
    Preprocess(decoder="image", resize=(8, 8)),
    Preprocess(decoder="image", grayscale=True, layout="NHWC"),
    Preprocess(decoder="array"),
]


def classify_target(counter: list[int]):  # type: ignore[no-untyped-def]
    @given(data=payload_bytes)
    def run(data: bytes) -> None:
        counter[0] += 1
        try:
            info = payloads.classify(data, max_bytes=MAX_BYTES)
        except payloads.PayloadError as exc:
            assert str(exc)  # the dead-letter reason
            return
        assert info.kind in ("reading", "array", "image")

    return run


def preprocess_target(counter: list[int]):  # type: ignore[no-untyped-def]
    @given(data=payload_bytes)
    def run(data: bytes) -> None:
        counter[0] += 1
        for pre in PRE:
            try:
                x = preprocess.preprocess_payload(data, pre)
            except preprocess.PayloadError:
                continue
            assert isinstance(x, np.ndarray)

    return run


@pytest.mark.parametrize("target", [classify_target, preprocess_target])
def test_decoders_quick(target) -> None:  # type: ignore[no-untyped-def]
    counter = [0]
    budget(QUICK)(target(counter))()
    assert counter[0] >= QUICK


@pytest.mark.slow
@pytest.mark.parametrize("target", [classify_target, preprocess_target])
def test_decoders_10k(target) -> None:  # type: ignore[no-untyped-def]
    counter = [0]
    budget(LONG)(target(counter))()
    assert counter[0] >= LONG
    print(f"{target.__name__}: {counter[0]} inputs")
