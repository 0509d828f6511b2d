"""Wave lists: parsing, and how they split a fleet into cumulative waves."""

from __future__ import annotations

import pytest

from fieldline.cloud.rollouts.spec import WaveError, parse_waves, plan_waves


@pytest.mark.parametrize(
    ("text", "total", "planned"),
    [
        ("1,50%,100%", 6, [1, 3, 6]),
        ("1,10%,50%,100%", 200, [1, 20, 100, 200]),
        ("1,10%,25%,50%,100%", 200, [1, 20, 50, 100, 200]),
        ("1,10%,50%,100%", 6, [1, 3, 6]),  # 10% of 6 rounds up to 1: no new node, dropped
        ("1,10%", 1, [1]),
        ("5", 3, [3]),  # a count beyond the fleet takes it all
        ("33.3%", 7, [3, 7]),  # a final 100% wave is implied
        ("2,1,100%", 10, [2, 10]),  # a wave that does not grow adds no node
    ],
)
def test_plan_is_cumulative_and_ends_with_every_node(
    text: str, total: int, planned: list[int]
) -> None:
    assert plan_waves(parse_waves(text), total) == planned


def test_parse_normalizes_and_appends_the_final_wave() -> None:
    assert parse_waves(" 1, 10% ,50%") == ["1", "10%", "50%", "100%"]
    assert parse_waves(["1", 50, "100%"]) == ["1", "50", "100%"]


@pytest.mark.parametrize("text", ["", "1,,2", "0", "-1", "1,0%", "101%", "x", "1.5", "%"])
def test_bad_waves_say_what_is_wrong(text: str) -> None:
    with pytest.raises(WaveError):
        parse_waves(text)


def test_too_many_waves_are_refused() -> None:
    with pytest.raises(WaveError, match="at most"):
        parse_waves(",".join(str(i) for i in range(1, 30)))
