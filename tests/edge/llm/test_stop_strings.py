"""Stop strings over text fed piece by piece, as a stream delivers it."""

from __future__ import annotations

import random

import pytest

from fieldline.edge.llm.stop_strings import StopMatcher


def run(stops: tuple[str, ...], pieces: list[str]) -> tuple[list[str], bool]:
    """What a stream shows, piece by piece, and whether a stop string ended it."""
    matcher = StopMatcher(stops)
    shown = []
    for piece in pieces:
        cut = matcher.feed(piece)
        shown.append(cut.text)
        if cut.stopped:
            return shown, True
    shown.append(matcher.flush())
    return shown, False


def test_a_stop_string_split_across_two_pieces_is_found_and_never_shown() -> None:
    shown, stopped = run(("END",), ["the oven E", "N", "D and more"])
    assert stopped and "".join(shown) == "the oven "
    assert shown[0] == "the oven "  # "E" waited: it could begin "END"
    assert shown[1] == ""


def test_text_that_only_looked_like_a_stop_string_is_released() -> None:
    shown, stopped = run(("END",), ["belt E", "ND", "X"])
    assert stopped and "".join(shown) == "belt "
    shown, stopped = run(("END",), ["belt E", "x", "EN"])
    assert not stopped and shown == ["belt ", "Ex", "", "EN"]


def test_the_earliest_of_several_stops_wins() -> None:
    shown, stopped = run(("\n\n", "###"), ["a ##", "# b\n\nc"])
    assert stopped and "".join(shown) == "a "


def test_without_stops_everything_flows_at_once() -> None:
    assert run((), ["a", "b"]) == (["a", "b", ""], False)


@pytest.mark.parametrize("seed", range(30))
def test_any_split_gives_the_text_before_the_first_stop(seed: int) -> None:
    rng = random.Random(seed)
    text = "".join(rng.choice("ab\n") for _ in range(60))
    stops = ("ab\nb", "\n\n")
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    expected = text[: min(cuts)] if cuts else text
    bounds = sorted(rng.sample(range(1, len(text)), 12))
    pieces = [text[a:b] for a, b in zip([0, *bounds], [*bounds, len(text)], strict=True)]
    shown, stopped = run(stops, pieces)
    assert "".join(shown) == expected and stopped == bool(cuts)
