"""The depth-fraction rule (loopcpp.window)."""

from __future__ import annotations

import math

import pytest

from loopcpp.config import LoopConfigError
from loopcpp.window import PAPER_DEPTH_RANGE, default_width, depth_window


def test_smollm2_window() -> None:
    start, end, reason = depth_window(30)
    assert (start, end) == (13, 17)
    assert "30 layers" in reason and "width 4" in reason and "0.50" in reason


@pytest.mark.parametrize(
    ("n_layer", "expected"),
    [(32, (14, 18)), (24, (11, 14)), (18, (8, 10)), (1, (0, 1)), (2, (1, 2)), (3, (1, 2))],
)
def test_known_windows(n_layer: int, expected: tuple[int, int]) -> None:
    assert depth_window(n_layer)[:2] == expected


def test_default_width_is_an_eighth() -> None:
    assert [default_width(n) for n in (1, 4, 11, 12, 30, 32, 36, 80)] == [1, 1, 1, 2, 4, 4, 5, 10]


@pytest.mark.parametrize("n_layer", range(1, 130))
def test_default_window_is_centred_and_inside(n_layer: int) -> None:
    start, end, _ = depth_window(n_layer)
    assert 0 <= start < end <= n_layer
    assert end - start == default_width(n_layer)
    # centre within half a layer of the middle of the stack
    assert abs((start + end) / 2 - n_layer / 2) <= 0.5
    if n_layer >= 8:
        lo, hi = PAPER_DEPTH_RANGE
        assert lo - 0.05 <= (start + end) / 2 / n_layer <= hi


@pytest.mark.parametrize("depth", [0.43, 0.6, 0.71])
def test_depth_moves_the_centre(depth: float) -> None:
    start, end, reason = depth_window(64, depth=depth, width=6)
    assert end - start == 6
    assert abs((start + end) / 2 - depth * 64) <= 0.5
    assert "note" not in reason


def test_window_is_shifted_to_fit() -> None:
    assert depth_window(30, depth=0.0, width=5)[:2] == (0, 5)
    start, end, reason = depth_window(30, depth=1.0, width=5)
    assert (start, end) == (25, 30)
    assert "shifted" in reason and "0.43..0.71" in reason
    assert depth_window(7, width=7)[:2] == (0, 7)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_layer": 0}, "layer count"),
        ({"n_layer": True}, "layer count"),
        ({"n_layer": 30, "depth": -0.1}, "depth"),
        ({"n_layer": 30, "depth": 1.5}, "depth"),
        ({"n_layer": 30, "depth": math.nan}, "depth"),
        ({"n_layer": 30, "width": 0}, "width 0"),
        ({"n_layer": 30, "width": 31}, "use 1..30"),
    ],
)
def test_invalid_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(LoopConfigError, match=match):
        depth_window(**kwargs)


@pytest.mark.parametrize(
    ("n_layer", "text"),
    [
        (4, "width 1: 4/8 = 0.5, rounded half up to 1"),
        (2, "width 1: 2/8 = 0.25, rounded to 0, raised to the minimum 1"),
        (12, "width 2: 12/8 = 1.5, rounded half up to 2"),
        (16, "width 2: 16/8 = 2 ("),
        (30, "width 4: 30/8 = 3.75, rounded to 4"),
    ],
)
def test_the_width_text_states_true_arithmetic(n_layer: int, text: str) -> None:
    """Issue 18: "width 1 = round(4/8)" was false (round(0.5) is 0 in Python)."""
    _, _, reason = depth_window(n_layer)
    assert text in reason and "round(" not in reason
