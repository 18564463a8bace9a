"""The depth-fraction rule: where to put the loop window when nobody says.

The paper ("Training-Free Looped Transformers") found across eight
architectures that the best loop windows are centred in the middle of the
stack, between 0.43 and 0.71 of the depth, and loops small windows (about 4
layers of a 32-layer model).  ``depth_window`` turns that into a window:

* centre: ``depth * n_layer`` (default depth 0.5), measured in layer
  boundaries, so the window ``[a, b)`` satisfies ``(a + b) / 2 ~= depth * n_layer``;
* width: ``max(1, round(n_layer / 8))`` by default (halves round up), the paper's 4-of-32 ratio
  (SmolLM2's 30 layers give width 4 and the window ``[13, 17)``);
* the window is shifted, never shrunk, to fit inside ``[0, n_layer)``.
"""

from __future__ import annotations

import math

from loopcpp.config import LoopConfigError, rounded_width

#: Default centre of the window as a fraction of the depth.
DEFAULT_DEPTH = 0.5
#: The range of best window centres reported by the paper.
PAPER_DEPTH_RANGE = (0.43, 0.71)
#: Default width is n_layer / WIDTH_DIVISOR (the paper's 4 of 32 layers).
WIDTH_DIVISOR = 8


def default_width(n_layer: int) -> int:
    """``max(1, round(n_layer / 8))`` (rounding halves up)."""
    return max(1, math.floor(n_layer / WIDTH_DIVISOR + 0.5))


def depth_window(
    n_layer: int, depth: float = DEFAULT_DEPTH, width: int | None = None
) -> tuple[int, int, str]:
    """The window ``(start, end, reason)`` centred near ``depth`` of an ``n_layer`` stack.

    ``reason`` is one line explaining the choice.  Raises LoopConfigError for a
    layer count below 1, a depth outside [0, 1] or a width outside 1..n_layer.
    """
    if isinstance(n_layer, bool) or not isinstance(n_layer, int) or n_layer < 1:
        raise LoopConfigError(f"model layer count {n_layer!r} is invalid: it must be 1 or more")
    if not isinstance(depth, (int, float)) or math.isnan(depth) or not 0.0 <= depth <= 1.0:
        raise LoopConfigError(
            f"depth {depth!r} is out of range: give the window centre as a fraction of the "
            f"stack between 0 and 1 (the paper's best centres lie in {PAPER_DEPTH_RANGE[0]}"
            f"..{PAPER_DEPTH_RANGE[1]})"
        )
    if width is None:
        w, width_why = rounded_width(n_layer, WIDTH_DIVISOR, 1)
        width_why += " (the paper's 4-of-32 ratio)"
    else:
        if isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= n_layer:
            raise LoopConfigError(
                f"window width {width!r} is out of range for a model with {n_layer} layers: "
                f"use 1..{n_layer}"
            )
        w = width
        width_why = f"width {w} as asked"
    centre = depth * n_layer
    start = math.floor(centre - w / 2 + 0.5)
    shifted = not 0 <= start <= n_layer - w
    start = min(max(start, 0), n_layer - w)
    end = start + w
    lo, hi = PAPER_DEPTH_RANGE
    reason = (
        f"{n_layer} layers; {width_why}; centred at depth {depth:.2f} (layer boundary "
        f"{centre:g}); window covers depth {start / n_layer:.2f}..{end / n_layer:.2f}"
    )
    if shifted:
        reason += "; shifted to fit inside the stack"
    if not lo <= depth <= hi:
        reason += f"; note: the paper's best centres lie in {lo}..{hi} of depth"
    return start, end, reason
