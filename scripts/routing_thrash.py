"""Routing thrash in the loop window: how often tokens change experts between sub-steps.

Runs the tiny random MoE checkpoints (``loopcpp.tiny``: qwen3moe, deepseek2)
through the PyTorch reference with a loop over the window, and records the
expert ids that every evaluation of each window layer actually uses (a hook on
the layer's experts module, so frozen routing's replayed choice is what is
seen). For each window layer it counts the tokens whose top-k expert *set*
differs between two consecutive evaluations of that layer, under
``routing=fresh`` and ``routing=frozen``, for K = 2, 4, 8. Frozen is 0 by
construction (every evaluation reuses the first one's ids and weights); the
fresh numbers are the thrash that frozen routing removes.

The weights are random (tiny test checkpoints, not trained models), so the
numbers show the mechanism, not what a real MoE does.

    /tmp/dvenv/bin/python scripts/routing_thrash.py [--out out/routing_thrash.png]
        [--archs qwen3moe,deepseek2] [--counts 2,4,8] [--method euler] [--mode block]
        [--tokens 32]

Prints a table (rich) and writes a PNG plot (matplotlib) to --out.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from loopcpp.config import METHODS, MODES, ROUTINGS, LoopConfig

DEFAULT_ARCHS = ("qwen3moe", "deepseek2")
DEFAULT_COUNTS = (2, 4, 8)
NOTE = "tiny checkpoints with RANDOM weights: the mechanism, not a real model's behaviour"


@dataclass(frozen=True)
class Thrash:
    arch: str
    count: int
    routing: str
    layer: int
    changed: int  # tokens whose expert set changed, summed over consecutive evaluation pairs
    pairs: int  # token x consecutive-pair count (the denominator)
    evals: int  # evaluations of the layer

    @property
    def rate(self) -> float:
        return self.changed / self.pairs if self.pairs else 0.0


def _experts_modules(ref: Any) -> dict[int, Any]:
    """Window-eligible MoE layers: layer index -> its experts module."""
    out = {}
    for i, router in enumerate(ref.routers):
        if router is not None:
            out[i] = ref.layers[i].mlp.experts
    return out


def measure(
    arch: str, counts: tuple[int, ...], method: str, mode: str, n_tokens: int
) -> list[Thrash]:
    """Thrash counts of one tiny checkpoint for every K and routing."""
    import torch

    from loopcpp.reference import LoopedReference
    from loopcpp.tiny import load_hf_model, tiny_checkpoint

    hf_dir, _ = tiny_checkpoint(arch)
    ref = LoopedReference(load_hf_model(hf_dir))
    experts = _experts_modules(ref)
    start, end = 1, ref.n_layer - 1
    window = [i for i in range(start, end) if i in experts]
    if not window:
        raise ValueError(f"{arch}: no MoE layer in the window [{start}, {end})")

    seen: dict[int, list[torch.Tensor]] = defaultdict(list)

    def hook(layer: int):
        def record(_module: Any, args: tuple, kwargs: dict) -> None:
            ids = kwargs.get("top_k_index", args[1] if len(args) > 1 else None)
            if ids is None:
                raise RuntimeError(f"{arch}: cannot find the expert ids passed to layer {layer}")
            seen[layer].append(ids.detach().sort(dim=-1).values.clone())

        return record

    handles = [experts[i].register_forward_pre_hook(hook(i), with_kwargs=True) for i in window]
    gen = torch.Generator().manual_seed(0)
    vocab = ref.config.vocab_size
    prompt = torch.randint(100, vocab, (n_tokens,), generator=gen).tolist()
    rows = []
    try:
        for count in counts:
            for routing in ROUTINGS:
                loop = LoopConfig(
                    start, end, count=count, method=method, mode=mode, routing=routing
                )
                ref.set_loop(loop)
                ref.reset()
                seen.clear()
                ref.forward(prompt)  # one batch: the loop's memory spans exactly this
                for layer in window:
                    ids = seen[layer]
                    changed = sum(
                        int((a != b).any(dim=-1).sum()) for a, b in zip(ids, ids[1:], strict=False)
                    )
                    rows.append(
                        Thrash(
                            arch,
                            count,
                            routing,
                            layer,
                            changed,
                            n_tokens * (len(ids) - 1),
                            len(ids),
                        )
                    )
    finally:
        for h in handles:
            h.remove()
    return rows


def table(rows: list[Thrash], method: str, mode: str, n_tokens: int) -> Table:
    t = Table(
        title=f"routing thrash: tokens changing their top-k expert set between "
        f"consecutive evaluations of a window layer ({method}/{mode}, "
        f"{n_tokens}-token batch)"
    )
    for col in (
        "arch",
        "K",
        "layer",
        "evals",
        "fresh changed",
        "fresh rate",
        "frozen changed",
        "frozen rate",
    ):
        t.add_column(col, justify="right" if col not in ("arch",) else "left")
    by = {(r.arch, r.count, r.layer, r.routing): r for r in rows}
    for arch, count, layer in sorted(
        {(r.arch, r.count, r.layer) for r in rows}, key=lambda k: (k[0], k[1], k[2])
    ):
        fr, fz = by[arch, count, layer, "fresh"], by[arch, count, layer, "frozen"]
        t.add_row(
            arch,
            str(count),
            str(layer),
            str(fr.evals),
            f"{fr.changed}/{fr.pairs}",
            f"{fr.rate:.1%}",
            f"{fz.changed}/{fz.pairs}",
            f"{fz.rate:.1%}",
        )
    return t


def plot(rows: list[Thrash], out: Path, method: str, mode: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = sorted({r.arch for r in rows})
    fig, axes = plt.subplots(1, len(archs), figsize=(5.5 * len(archs), 4.2), squeeze=False)
    for ax, arch in zip(axes[0], archs, strict=True):
        mine = [r for r in rows if r.arch == arch]
        for routing, style in (("fresh", "-o"), ("frozen", "--s")):
            for layer in sorted({r.layer for r in mine}):
                pts = sorted(
                    (r.count, r.rate) for r in mine if r.routing == routing and r.layer == layer
                )
                ax.plot(
                    [p[0] for p in pts],
                    [100 * p[1] for p in pts],
                    style,
                    label=f"{routing}, layer {layer}",
                )
        ax.set_xscale("log", base=2)
        ax.set_xticks(
            sorted({r.count for r in mine}), [str(c) for c in sorted({r.count for r in mine})]
        )
        ax.set_xlabel("K (loop count)")
        ax.set_ylabel("tokens changing expert set per sub-step (%)")
        ax.set_title(f"{arch} ({method}/{mode})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Routing thrash in the loop window: {NOTE}", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".png", dir=out.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use comma-separated integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: use comma-separated integers >= 1")
    return values


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("out/routing_thrash.png"))
    ap.add_argument(
        "--archs", default=",".join(DEFAULT_ARCHS), help="tiny MoE checkpoints (loopcpp.tiny names)"
    )
    ap.add_argument("--counts", type=_ints, default=DEFAULT_COUNTS)
    ap.add_argument("--method", choices=METHODS, default="euler")
    ap.add_argument("--mode", choices=MODES, default="block")
    ap.add_argument("--tokens", type=int, default=32, help="batch size (prompt tokens)")
    args = ap.parse_args()
    if args.tokens < 1:
        ap.error("--tokens must be at least 1")

    import torch

    torch.set_num_threads(1)
    rows: list[Thrash] = []
    for arch in (a.strip() for a in args.archs.split(",") if a.strip()):
        rows += measure(arch, args.counts, args.method, args.mode, args.tokens)
    frozen_changes = sum(r.changed for r in rows if r.routing == "frozen")
    if frozen_changes:
        raise SystemExit(f"frozen routing changed {frozen_changes} expert sets: a bug")
    console = Console(width=120)
    console.print(table(rows, args.method, args.mode, args.tokens))
    plot(rows, args.out, args.method, args.mode)
    console.print(f"frozen: 0 changes by construction (checked). Plot: {args.out}")
    console.print(f"[bold yellow]Note:[/] {NOTE}.")


if __name__ == "__main__":
    main()
