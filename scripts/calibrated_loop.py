"""Print the `loopcpp eval` loop options of a model's calibrated loop, or "none".

The calibrated loop is the winner of a calibration on the held-in task arc_easy:
`loopcpp window MODEL --calibrate arc_easy` (docs/results/calibrate_*), or, for the 1.5B,
the best point of the window-centre curve (docs/results/centre_1.5b/sweep.json), ranked the
way the calibration ranks (held-in mean log-likelihood of the gold answer); "none" when no
loop beats the stock model there. Used by scripts/evidence_runs.sh calibrated.

    python scripts/calibrated_loop.py qwen2.5-coder-0.5b-instruct
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from loopcpp.config import FIELD, LoopConfig

ROOT = Path(__file__).resolve().parents[1] / "docs" / "results"

#: model -> (result file, kind)
SOURCES = {
    "smollm2-135m-instruct": (ROOT / "calibrate_smollm2_arc_easy100.json", "calibration"),
    "gemma3-270m": (ROOT / "calibrate_gemma3-270m_arc_easy200" / "calibration.json",
                    "calibration"),
    "qwen2.5-coder-0.5b-instruct": (
        ROOT / "calibrate_qwen2.5-coder-0.5b_arc_easy200" / "calibration.json", "calibration"),
    "qwen2.5-coder-1.5b-instruct": (ROOT / "centre_1.5b" / "sweep.json", "sweep"),
}


def calibrated(model: str) -> LoopConfig | None:
    """The model's calibrated loop, None when no loop beat the stock model."""
    try:
        path, kind = SOURCES[model]
    except KeyError:
        raise SystemExit(f"no calibration for {model}: use one of {', '.join(SOURCES)}") from None
    data = json.loads(path.read_text(encoding="utf-8"))
    if kind == "calibration":
        winner = data.get("winner")
        return None if winner is None else LoopConfig(**winner)
    stock = data["stock"]["mean_gold_logprob"]
    best = max(data["runs"], key=lambda r: r["metrics"]["mean_gold_logprob"])
    if best["metrics"]["mean_gold_logprob"] <= stock:
        return None
    return LoopConfig(**best["loop"])


def options(loop: LoopConfig) -> list[str]:
    """`loopcpp eval` options that give exactly ``loop`` (every field, from the table)."""
    out = []
    for name, value in loop.to_dict().items():
        field = FIELD[name]
        flag = "--" + name.replace("_", "-")
        if value is None:
            continue
        if field.kind is bool:
            out.append(flag if value else f"--no-{name.replace('_', '-')}")
        else:
            out += [flag, str(value)]
    return out


if __name__ == "__main__":
    loop = calibrated(sys.argv[1])
    print("none" if loop is None else " ".join(options(loop)))
