"""Reliability: bad input, concurrency, state, long runs; nothing crashes, nothing is lost.

* The command line refuses every bad loop setting and bad file with a clear
  ``Error:`` line; so do the Python API and llama.cpp itself (loaded directly),
  and the process loads a good model right after.
* Several contexts on one model, each with its own loop, decoding in parallel
  threads, give bit-identical logits to the same runs one after another.
* A batch carrying two sequences gives each the logits it gets alone (dense,
  sliding-window and MoE tiny models); removing a sequence (or its tail) from
  the cache and decoding again reproduces them; a saved state restores
  generation exactly. A looped result depends on how llama.cpp splits a batch
  into ubatches (the stash is per ubatch), and two tests pin down what that
  means when sequences share a batch.
* Filling the context ends cleanly; 20 load/generate/free cycles do not leak.
* A loop whose graph would not fit in memory is refused before llama.cpp
  allocates it (an allocation failure there aborts the process).

Bit-identical comparisons run every context with one thread on the CPU backend:
the same ubatch then takes the same kernels in the same order, so running
contexts concurrently cannot change a bit unless they share state. Where a
batch's shape changes (two sequences in one batch rather than one), ggml may
pick another kernel, so the tolerance there is f32 round-off, measured on the
stock model (see MULTI_SEQ_ATOL).
"""

from __future__ import annotations

import gc
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from click.testing import CliRunner, Result
from conftest import assert_clean_error

llama_cpp = pytest.importorskip("llama_cpp")

from llama_cpp._internals import LlamaContext, LlamaModel  # noqa: E402

from loopcpp import LoopConfig, LoopConfigError, engine  # noqa: E402
from loopcpp.api import llama_errors, load, loop_memory_bytes  # noqa: E402
from loopcpp.cli import cli  # noqa: E402
from loopcpp.config import GGUF_KEYS  # noqa: E402
from loopcpp.convert import write_loop_metadata  # noqa: E402
from loopcpp.gguf_io import (  # noqa: E402
    KV,
    TensorOut,
    read_gguf,
    read_model,
    rewrite_metadata,
    write_gguf,
)
from loopcpp.memory import (  # noqa: E402
    MemoryLimits,
    check_loop_memory,
    graph_max_nodes,
    loop_memory,
)
from loopcpp.models import fetch  # noqa: E402

VT = gguf.GGUFValueType
#: Max abs logit difference between a sequence decoded alone and beside another (tiny f32
#: models, logits O(1), no flash attention). Prompts measure 0: their cells may sit at other
#: offsets, the masked cells add exact zeros. A decode step of two tokens rather than one
#: takes ggml's matrix kernel instead of its vector path: 1e-6 for llama and qwen3moe, with
#: or without a loop; gemma3's GELU goes through an fp16 table, where a last-bit change can
#: flip a rounding (stock gemma3 itself: 6e-5; the conformance suite allows it 2e-3).
MULTI_SEQ_ATOL = {"llama": 1e-5, "qwen3moe": 1e-5, "gemma3": 2e-3}


# -- fixtures and helpers ----------------------------------------------------------


@pytest.fixture(scope="module")
def smol() -> Path:
    return fetch("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def tiny() -> Path:
    """The tiny random f32 llama (4 layers, hidden 64), built once and cached."""
    pytest.importorskip("torch")
    from loopcpp.tiny import tiny_checkpoint

    return tiny_checkpoint("llama")[1]


def run_cli(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], prog_name="loopcpp")


def rewrite(src: Path, out: Path, kvs: dict[str, KV], drop: Sequence[str] = ()) -> Path:
    """Copy a GGUF with some metadata replaced or added (tensors byte for byte)."""
    f = read_gguf(src)
    tensors = [TensorOut(t.name, t) for t in f.tensors]
    write_gguf(f, out, rewrite_metadata(f, kvs, drop=drop), tensors)
    return out


def loop_kv(start: Any = 1, end: Any = 3, count: Any = 2, **types: VT) -> dict[str, KV]:
    """loop.start/end/count as u32, or as ``<name>_type=`` says."""
    values = {"start": start, "end": end, "count": count}
    return {GGUF_KEYS[k]: KV(v, types.get(f"{k}_type", VT.UINT32)) for k, v in values.items()}


def cparams(
    n_ctx: int = 128, n_batch: int = 64, n_seq_max: int = 1, kv_unified: bool = False
) -> Any:
    """Context parameters: f32 KV cache, no flash attention, one thread."""
    p = llama_cpp.llama_context_default_params()
    p.n_ctx, p.n_batch, p.n_ubatch = n_ctx, n_batch, n_batch
    p.n_seq_max, p.kv_unified = n_seq_max, kv_unified
    p.n_threads = p.n_threads_batch = 1
    p.type_k = p.type_v = 0
    # no flash attention: ggml's CPU kernel rounds through f16 (2.5e-3 off the reference on
    # the tiny llama), which would hide f32-level differences
    p.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    return p


def open_model(path: Path) -> LlamaModel:
    return LlamaModel(
        path_model=str(path), params=llama_cpp.llama_model_default_params(), verbose=False
    )


Item = tuple[int, int, int]  # token, position, sequence id


def seq_items(tokens: Sequence[int], seq: int, pos0: int = 0) -> list[Item]:
    return [(t, pos0 + i, seq) for i, t in enumerate(tokens)]


def decode(ctx: Any, n_vocab: int, items: Sequence[Item]) -> np.ndarray:
    """Decode one llama_batch; the logits of every item, in order."""
    batch = llama_cpp.llama_batch_init(len(items), 0, 1)
    try:
        for i, (tok, pos, seq) in enumerate(items):
            batch.token[i], batch.pos[i] = tok, pos
            batch.n_seq_id[i], batch.seq_id[i][0], batch.logits[i] = 1, seq, True
        batch.n_tokens = len(items)
        rc = llama_cpp.llama_decode(ctx, batch)
        assert rc == 0, f"llama_decode returned {rc}"
        rows = [
            np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(n_vocab,))
            for i in range(len(items))
        ]
        return np.array(rows, dtype=np.float32)
    finally:
        llama_cpp.llama_batch_free(batch)


def clear(ctx: Any) -> None:
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)


def greedy_run(ctx: Any, n_vocab: int, prompt: Sequence[int], n_new: int) -> np.ndarray:
    """Logits of the prompt and of n_new greedy tokens, from an empty cache."""
    clear(ctx)
    rows = [decode(ctx, n_vocab, seq_items(prompt, 0))]
    for pos in range(len(prompt), len(prompt) + n_new):
        token = int(np.argmax(rows[-1][-1]))
        rows.append(decode(ctx, n_vocab, [(token, pos, 0)]))
    return np.concatenate(rows)


def tokenize(model: LlamaModel, text: str) -> list[int]:
    return model.tokenize(text.encode(), add_bos=True, special=False)


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no /proc/self/status")


# -- 1. bad input through the command line ---------------------------------------------


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--start", "20", "--end", "40"], "[20, 40) is out of range for a model with 30 layers"),
        (["--start", "13", "--end", "13"], "empty or reversed loop window [13, 13)"),
        (["--start", "17", "--end", "13"], "empty or reversed loop window [17, 13)"),
        (["--start", "-1", "--end", "13"], "loop start -1 is out of range: use >= 0"),
        (["--start", "13", "--end", "17", "--count", "0"], "K=0 is out of range: use 1..64"),
        (["--start", "13", "--end", "17", "--count", "100000"], "K=100000 is out of range"),
        (["--count", "65"], "K=65 is out of range"),
        (["--width", "31"], "use 1..30"),
    ],
    ids=["past-end", "empty", "reversed", "negative", "K=0", "K-huge", "K-65", "width"],
)
def test_generate_refuses_bad_settings(smol: Path, args: list[str], fragment: str) -> None:
    assert_clean_error(run_cli("generate", smol, "-p", "Hi", "-n", "1", *args), fragment)


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--method", "simpson"], "'simpson' is not one of"),
        (["--kv", "middle"], "'middle' is not one of"),
        (["--apply", "decode"], "'decode' is not one of"),
        (["--no-loop", "--count", "2"], "--no-loop cannot be combined"),
        (["--start", "3"], "give both start and end"),  # tests/test_resolve.py: every command
        (["--count", "two"], "'two' is not a valid integer"),
    ],
    ids=["method", "kv", "apply", "no-loop-and-settings", "half", "K-not-int"],
)
def test_generate_usage_errors(smol: Path, args: list[str], fragment: str) -> None:
    assert_clean_error(run_cli("generate", smol, "-p", "Hi", *args), fragment, code=2)


WRONG_TYPES = {
    "start-string": (loop_kv(start="abc", start_type=VT.STRING), "loop.start", "str"),
    "start-digits": (loop_kv(start="1", start_type=VT.STRING), "loop.start", "str"),
    "start-i32": (loop_kv(start=1, start_type=VT.INT32), "loop.start", "i32"),
    "count-f32": (loop_kv(count=2.0, count_type=VT.FLOAT32), "loop.count", "f32"),
    "mode-u32": ({**loop_kv(), "loop.mode": KV(1, VT.UINT32)}, "loop.mode", "u32"),
}


@pytest.mark.parametrize("case", list(WRONG_TYPES))
def test_wrong_value_types_in_gguf(tiny: Path, tmp_path: Path, case: str) -> None:
    """A loop key of the wrong GGUF type: Python, the CLI and llama.cpp refuse it; convert
    repairs the file."""
    kvs, key, _cpp_type = WRONG_TYPES[case]
    bad = rewrite(tiny, tmp_path / "bad.gguf", kvs)
    with pytest.raises(ValueError, match=rf"{key} is \w+ .*llama.cpp reads only"):
        read_model(bad)
    with pytest.raises(ValueError, match=key):
        load(bad, n_ctx=32)
    shown = run_cli("info", bad)  # info shows the file and flags the bad key
    assert shown.exit_code == 0 and "INVALID" in shown.output and key in shown.output
    assert_clean_error(run_cli("generate", bad, "-p", "Hi", "-n", "1"), key)
    with llama_errors() as errors:
        with pytest.raises(ValueError):
            llama_cpp.Llama(str(bad), n_ctx=32, verbose=False)
    assert any(f"loop key '{key}' has GGUF type" in e for e in errors), errors
    # the fix the error message names works
    fixed = tmp_path / "fixed.gguf"
    result = run_cli("convert", bad, "-o", fixed, "--start", "1", "--end", "3", "--count", "2")
    assert result.exit_code == 0, result.output
    llm = llama_cpp.Llama(str(fixed), n_ctx=32, verbose=False)
    assert engine.get_loop(llm._ctx.ctx) == LoopConfig(1, 3, 2)
    llm.close()


def test_right_types_are_still_range_checked(tiny: Path, tmp_path: Path) -> None:
    """After the type check the values are checked too (a u32 window out of range)."""
    bad = rewrite(tiny, tmp_path / "bad.gguf", loop_kv(start=2, end=9))
    with pytest.raises(ValueError, match=r"\[2, 9\) is out of range for a model with 4 layers"):
        read_model(bad)


@pytest.fixture(scope="module")
def unsupported(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny llama as ``llama-embed`` (the same tensors; an architecture the patch
    does not loop): ``(without loop keys, with loop keys)``."""
    f = read_gguf(tiny)
    renamed = {
        name.replace("llama.", "llama-embed.", 1): KV(fld.value, fld.vtype, fld.sub_type)
        for name, fld in f.fields.items()
        if name.startswith("llama.")
    }
    renamed["general.architecture"] = KV("llama-embed", VT.STRING)
    folder = tmp_path_factory.mktemp("llama-embed")
    llama_keys = [k for k in f.fields if k.startswith("llama.")]
    plain = rewrite(tiny, folder / "plain.gguf", renamed, drop=llama_keys)
    return plain, write_loop_metadata(plain, folder / "looped.gguf", LoopConfig(1, 3, 2))


def test_unsupported_architecture(unsupported: tuple[Path, Path], smol: Path) -> None:
    plain, looped = unsupported
    m = read_model(looped)
    assert (m.architecture, m.loop) == ("llama-embed", LoopConfig(1, 3, 2))
    refusal = r"architecture 'llama-embed' does not support looping.{1,3}supported: llama, qwen2"
    # the stock model runs ...
    stock = load(plain, n_ctx=32)
    assert stock.loop is None
    stock.eval(stock.tokenize(b"Hello"))
    # ... a loop is refused: by the Python API, its C API, llama.cpp itself, the CLI
    with pytest.raises(LoopConfigError, match=refusal):
        load(plain, loop=LoopConfig(1, 3, 2), n_ctx=32)
    with pytest.raises(LoopConfigError, match=refusal):
        stock.set_loop(LoopConfig(1, 3, 2))
    with pytest.raises(LoopConfigError, match=refusal):
        engine.set_loop(stock._ctx.ctx, stock._model.model, LoopConfig(1, 3, 2))
    assert not engine.lib().llama_model_loop_supported(stock._model.model)
    assert stock.loop is None
    stock.close()
    with pytest.raises(LoopConfigError, match=refusal):
        load(looped, n_ctx=32)
    for overrides in (None, {"loop.count": 1}):
        with llama_errors() as errors:
            with pytest.raises(ValueError):
                llama_cpp.Llama(str(looped), n_ctx=32, verbose=False, kv_overrides=overrides)
        assert any(re.search(refusal, e) for e in errors), errors
    # loop=False cannot strip a file's keys (llama.cpp validates them at load): the
    # error names the fix
    with pytest.raises(ValueError, match=f"{refusal}.*--no-loop"):
        load(looped, loop=False, n_ctx=32)
    assert_clean_error(run_cli("generate", looped, "-p", "Hi", "-n", "1"),
                       "architecture 'llama-embed' does not support looping", "--no-loop")
    info = run_cli("info", looped)
    assert info.exit_code == 0 and "does not support architecture 'llama-embed'" in info.output
    # a good model right after, in the same process
    result = run_cli("generate", smol, "-p", "Hi", "-n", "2", "--count", "2", "--ctx", "64")
    assert result.exit_code == 0, result.output


# -- 2. several contexts on one model, in parallel threads -------------------------------

THREAD_LOOPS = [
    None,
    LoopConfig(13, 17, count=2),
    LoopConfig(10, 20, count=3, method="rk3", kv="first"),
    LoopConfig(5, 25, count=2, mode="layer", apply="prefill"),
]


def test_contexts_with_different_loops_in_threads(smol: Path) -> None:
    model = open_model(smol)
    n_vocab = model.n_vocab()
    prompt = tokenize(model, "The quick brown fox jumps over the lazy dog because")
    # one after another, on one context whose loop changes between runs
    ctx = LlamaContext(model=model, params=cparams(), verbose=False)
    alone = []
    for cfg in THREAD_LOOPS:
        engine.set_loop(ctx.ctx, model.model, cfg)
        alone.append(greedy_run(ctx.ctx, n_vocab, prompt, 4))
    assert not np.array_equal(alone[0], alone[1])  # the loops do change the logits
    # at the same time, one context per loop
    ctxs = [LlamaContext(model=model, params=cparams(), verbose=False) for _ in THREAD_LOOPS]
    for c, cfg in zip(ctxs, THREAD_LOOPS, strict=True):
        engine.set_loop(c.ctx, model.model, cfg)
        assert engine.get_loop(c.ctx) == cfg
    results: dict[int, list[np.ndarray]] = {i: [] for i in range(len(ctxs))}
    errors: list[BaseException] = []
    start = threading.Barrier(len(ctxs))

    def work(i: int) -> None:
        try:
            start.wait()
            for _ in range(2):
                results[i].append(greedy_run(ctxs[i].ctx, n_vocab, prompt, 4))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(ctxs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, cfg in enumerate(THREAD_LOOPS):
        for got in results[i]:
            np.testing.assert_array_equal(got, alone[i], err_msg=f"loop {cfg}")
        assert engine.get_loop(ctxs[i].ctx) == cfg
    for c in (*ctxs, ctx):
        c.close()
    model.close()


# -- 3. two sequences in one batch, cache edits, saved state --------------------------------


@pytest.fixture(scope="module")
def tiny_model(tiny: Path) -> Iterator[LlamaModel]:
    model = open_model(tiny)
    yield model
    model.close()


@pytest.fixture(scope="module", params=list(MULTI_SEQ_ATOL))
def seq_model(request: pytest.FixtureRequest, tiny: Path) -> Iterator[tuple[str, LlamaModel]]:
    """Tiny models: dense, sliding-window attention (gemma3), MoE with frozen routing."""
    from loopcpp.tiny import tiny_checkpoint

    model = open_model(tiny_checkpoint(request.param)[1])
    if not engine.lib().llama_model_loop_supported(model.model):
        model.close()
        pytest.skip(f"this libllama does not loop {request.param}")
    yield request.param, model
    model.close()


@contextmanager
def looped_context(model: LlamaModel, cfg: LoopConfig, **kwargs: Any) -> Iterator[Any]:
    ctx = LlamaContext(model=model, params=cparams(**kwargs), verbose=False)
    try:
        engine.set_loop(ctx.ctx, model.model, cfg)
        yield ctx.ctx
    finally:
        ctx.close()


@pytest.mark.parametrize("unified", [True, False], ids=["unified", "per-seq-cache"])
@pytest.mark.parametrize(
    "kv, apply", [("last", "all"), ("first", "all"), ("last", "prefill"), ("first", "prefill")]
)
def test_two_sequences_in_one_batch(
    seq_model: tuple[str, LlamaModel], kv: str, apply: str, unified: bool
) -> None:
    arch, model = seq_model
    atol = MULTI_SEQ_ATOL[arch]
    cfg = LoopConfig(1, 3, count=3, method="rk3", kv=kv, apply=apply)
    n_vocab = model.n_vocab()
    a = tokenize(model, "the cat sat on the mat")[:6]
    b = tokenize(model, "one two three four five six")[:6]
    assert len(a) == len(b) == 6  # equal lengths: llama.cpp keeps each prompt in one ubatch
    with looped_context(model, cfg, n_seq_max=2, kv_unified=unified) as ctx:
        # each alone, with its next token
        alone = {}
        for seq, toks in ((0, a), (1, b)):
            clear(ctx)
            prompt = decode(ctx, n_vocab, seq_items(toks, seq))
            nxt = int(np.argmax(prompt[-1]))
            alone[seq] = (prompt, nxt, decode(ctx, n_vocab, [(nxt, len(toks), seq)]))
        # together: both prompts in one batch, then both next tokens in one batch
        clear(ctx)
        both = decode(ctx, n_vocab, seq_items(a, 0) + seq_items(b, 1))
        np.testing.assert_allclose(both[:6], alone[0][0], rtol=0, atol=atol)
        np.testing.assert_allclose(both[6:], alone[1][0], rtol=0, atol=atol)
        nxt = decode(ctx, n_vocab, [(alone[0][1], 6, 0), (alone[1][1], 6, 1)])
        np.testing.assert_allclose(nxt[:1], alone[0][2], rtol=0, atol=atol)
        np.testing.assert_allclose(nxt[1:], alone[1][2], rtol=0, atol=atol)

        # drop sequence 1 and decode it again: the same logits as the first time
        mem = llama_cpp.llama_get_memory(ctx)
        assert llama_cpp.llama_memory_seq_rm(mem, 1, -1, -1)
        again = decode(ctx, n_vocab, seq_items(b, 1))
        np.testing.assert_allclose(again, both[6:], rtol=0, atol=atol)
        # drop the tail of sequence 0 from position 3 and decode it again: as a fresh run
        # that decodes the prompt in the same two batches (a loop's stash is per batch)
        assert llama_cpp.llama_memory_seq_rm(mem, 0, 3, -1)
        tail = decode(ctx, n_vocab, seq_items(a[3:], 0, pos0=3))
        clear(ctx)
        decode(ctx, n_vocab, seq_items(a[:3], 0))
        fresh_tail = decode(ctx, n_vocab, seq_items(a[3:], 0, pos0=3))
        np.testing.assert_allclose(tail, fresh_tail, rtol=0, atol=atol)
        if cfg.count > 1 and apply == "all":  # the split matters: the loop is per batch
            assert not np.allclose(fresh_tail, alone[0][0][3:], atol=1e-3)
        assert np.isfinite(both).all()


def test_unequal_sequences_split_like_alone(tiny_model: LlamaModel) -> None:
    """Per-sequence caches split a batch into ubatches with equal tokens per sequence
    (split_equal): the longer prompt is cut, and a looped run sees the cut, exactly as
    the same prompt decoded alone in those two batches."""
    cfg = LoopConfig(1, 3, count=3)
    n_vocab = tiny_model.n_vocab()
    a = tokenize(tiny_model, "the cat sat on the mat and then")[:8]
    b = tokenize(tiny_model, "one two three four")[:4]
    with looped_context(tiny_model, cfg, n_seq_max=2, kv_unified=False) as ctx:
        both = decode(ctx, n_vocab, seq_items(a, 0) + seq_items(b, 1))
        clear(ctx)
        split = np.concatenate(
            [
                decode(ctx, n_vocab, seq_items(a[:4], 0)),
                decode(ctx, n_vocab, seq_items(a[4:], 0, 4)),
            ]
        )
        np.testing.assert_allclose(both[:8], split, rtol=0, atol=MULTI_SEQ_ATOL["llama"])
        clear(ctx)
        whole = decode(ctx, n_vocab, seq_items(a, 0))
        assert not np.allclose(both[:8], whole, atol=1e-3)
    with looped_context(tiny_model, cfg, n_seq_max=2, kv_unified=True) as ctx:
        both = decode(ctx, n_vocab, seq_items(a, 0) + seq_items(b, 1))  # one ubatch
        np.testing.assert_allclose(both[:8], whole, rtol=0, atol=MULTI_SEQ_ATOL["llama"])


def test_context_shift(tiny_model: LlamaModel) -> None:
    """Dropping the oldest tokens and shifting the rest (llama.cpp's context shift) on a
    looped context: finite logits, the cache positions move, the same twice over."""
    cfg = LoopConfig(1, 3, count=3, kv="first")
    n_vocab = tiny_model.n_vocab()
    toks = tokenize(tiny_model, "the cat sat on the mat and the dog sat on the log")[:12]
    runs = []
    for _ in range(2):
        with looped_context(tiny_model, cfg, n_ctx=32) as ctx:
            decode(ctx, n_vocab, seq_items(toks, 0))
            mem = llama_cpp.llama_get_memory(ctx)
            assert llama_cpp.llama_memory_can_shift(mem)
            assert llama_cpp.llama_memory_seq_rm(mem, 0, 0, 4)
            llama_cpp.llama_memory_seq_add(mem, 0, 4, -1, -4)
            assert llama_cpp.llama_memory_seq_pos_max(mem, 0) == 7
            rows = [decode(ctx, n_vocab, seq_items(toks[:8], 0, pos0=8))]
            rows.append(decode(ctx, n_vocab, [(int(np.argmax(rows[-1][-1])), 16, 0)]))
            runs.append(np.concatenate(rows))
    assert np.isfinite(runs[0]).all()
    np.testing.assert_array_equal(runs[0], runs[1])


def test_batch_mates_do_not_leak_into_a_sequence(tiny_model: LlamaModel) -> None:
    """A sequence's decode step gives the same logits whatever else shares its batch."""
    cfg = LoopConfig(1, 3, count=3, method="rk3", kv="first")
    n_vocab = tiny_model.n_vocab()
    b = tokenize(tiny_model, "one two three four five six")[:6]
    rows = []
    with looped_context(tiny_model, cfg, n_seq_max=2, kv_unified=True) as ctx:
        for mates in ([200, 201], [300, 301], [400, 401, 402, 403, 404]):
            clear(ctx)
            decode(ctx, n_vocab, seq_items(b, 1))
            rows.append(decode(ctx, n_vocab, seq_items(mates, 0) + [(100, 6, 1)])[-1])
    np.testing.assert_array_equal(rows[0], rows[1])  # same shape, other tokens: bit-identical
    np.testing.assert_allclose(rows[2], rows[0], rtol=0, atol=MULTI_SEQ_ATOL["llama"])


def test_apply_prefill_is_decided_per_ubatch(tiny_model: LlamaModel) -> None:
    """docs/LOOPING.md: a ubatch with more than one token of some sequence is looped whole.

    A decode token that shares a ubatch with another sequence's prompt is therefore looped,
    exactly as if apply were all; decoded alone it runs the stock stack.
    """
    cfg = LoopConfig(1, 3, count=3, apply="prefill")
    n_vocab = tiny_model.n_vocab()
    a = tokenize(tiny_model, "the cat sat on the mat")[:6]
    b = tokenize(tiny_model, "one two three four five six")[:6]
    with looped_context(tiny_model, cfg.with_(apply="all"), n_seq_max=2, kv_unified=True) as ctx:
        decode(ctx, n_vocab, seq_items(b, 1))
        looped = decode(ctx, n_vocab, [(100, 6, 1)])
    with looped_context(tiny_model, cfg, n_seq_max=2, kv_unified=True) as ctx:
        decode(ctx, n_vocab, seq_items(b, 1))
        alone = decode(ctx, n_vocab, [(100, 6, 1)])
        clear(ctx)
        decode(ctx, n_vocab, seq_items(b, 1))
        beside_a_prompt = decode(ctx, n_vocab, seq_items(a, 0) + [(100, 6, 1)])[-1:]
    np.testing.assert_allclose(beside_a_prompt, looped, rtol=0, atol=MULTI_SEQ_ATOL["llama"])
    assert np.abs(alone - looped).max() > 1e-2


def test_state_save_and_load_round_trip(tiny: Path) -> None:
    cfg = LoopConfig(1, 3, count=3, method="rk3", kv="first")
    kwargs: dict[str, Any] = dict(n_ctx=96, n_batch=64, logits_all=True, n_threads=1)
    kwargs.update(type_k=0, type_v=0)
    llm = load(tiny, loop=cfg, **kwargs)
    prompt = llm.tokenize(b"Once upon a time, in a land far away,")

    def continue_greedy(model: Any, n: int) -> np.ndarray:
        for _ in range(n):
            model.eval([int(np.argmax(model.scores[model.n_tokens - 1]))])
        return np.array(model.scores[: model.n_tokens], dtype=np.float32)

    llm.eval(prompt)
    state = llm.save_state()
    first = continue_greedy(llm, 8)
    llm.load_state(state)
    np.testing.assert_array_equal(continue_greedy(llm, 8), first)
    # the state holds the KV cache, which the loop does not grow
    other = load(tiny, loop=False, **kwargs)
    other.eval(prompt)
    assert other.save_state().llama_state_size == state.llama_state_size
    # into another context with the same loop (the state does not carry the loop)
    other.set_loop(cfg)
    other.load_state(state)
    np.testing.assert_array_equal(continue_greedy(other, 8), first)
    llm.close()
    other.close()


# -- 4. long generation and a soak ---------------------------------------------------------


def test_generation_until_the_context_is_full(smol: Path) -> None:
    llm = load(smol, loop=LoopConfig(13, 17, count=2), n_ctx=128, n_batch=64, n_threads=1)
    n_ctx, n_vocab = llm.n_ctx(), llm.n_vocab()
    llm.eval(llm.tokenize(b"Write a long story about a robot who learns to paint."))
    while llm.n_tokens < n_ctx:
        logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))
        assert np.isfinite(logits).all(), llm.n_tokens
        llm.eval([int(np.argmax(logits))])
    assert llm.n_tokens == n_ctx
    with pytest.raises((RuntimeError, ValueError, IndexError)):
        llm.eval([int(np.argmax(logits))])  # no room: refused, not a crash
    # the high-level API stops at the end of the context (end of text banned)
    llm.reset()
    out = llm.create_completion(
        "Tell me a story.", max_tokens=1000, temperature=0, logit_bias={llm.token_eos(): -1e9}
    )
    assert out["choices"][0]["finish_reason"] == "length"
    # it stops at the context asked for (128); llama.cpp pads the cache to n_ctx() = 256
    assert out["usage"]["total_tokens"] == 128 <= n_ctx
    llm.close()


def test_soak_load_generate_free(tiny: Path) -> None:
    cfg = LoopConfig(1, 3, count=3, method="rk3", kv="first")
    readings = []
    warm = 0.0
    for cycle in range(20):
        llm = load(tiny, loop=cfg, n_ctx=128, n_threads=1)
        out = llm.create_completion("The weather today", max_tokens=16, temperature=0)
        assert out["usage"]["completion_tokens"] >= 1
        llm.close()
        del llm, out
        gc.collect()
        readings.append(rss_mib())
        if cycle == 1:
            warm = readings[-1]
    print(f"RSS after each cycle (MiB): {[round(r) for r in readings]}")
    print(f"RSS after warm-up {warm:.1f} MiB, at the end {readings[-1]:.1f} MiB")
    assert readings[-1] - warm < 50, readings


# -- 5. loops too big for memory ---------------------------------------------------------


def _graph_nodes(path: Path, cfg: LoopConfig) -> int:
    """Nodes of the graph llama.cpp reserves (its info log)."""
    import ctypes

    from llama_cpp import _logger

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        lines.append(text.decode(errors="replace"))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        llm = llama_cpp.Llama(
            str(path), n_ctx=64, n_batch=64, verbose=False, kv_overrides=cfg.to_kv_overrides()
        )
        llm.close()
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    nodes = [line for line in lines if "graph: nodes =" in line]
    assert nodes, "llama.cpp did not log its graph size"
    return int(nodes[-1].split("nodes =")[1].split(",")[0])


def test_memory_estimate_grows_with_the_loop_and_bounds_the_graph(smol: Path) -> None:
    m = read_model(smol)
    cfg = LoopConfig(0, 30, count=8)
    assert graph_max_nodes(m, None) == 8 * m.n_tensors  # 2176 for SmolLM2's 272 tensors
    # n_eval = 30 * 8 = 240 layer evaluations
    assert graph_max_nodes(m, cfg) == 8 * m.n_tensors // 30 * 240 + 16 * 240
    nodes = _graph_nodes(smol, cfg)
    assert nodes <= graph_max_nodes(m, cfg) < 3 * nodes
    small = loop_memory_bytes(m, LoopConfig(13, 17, 2))
    big = loop_memory_bytes(m, LoopConfig(0, 30, 64, method="rk3"))
    assert big > 9 * 2**30 > 100 * small  # measured (v1 budget): +9.3 GiB virtual size at K=64 rk3
    first = loop_memory(m, LoopConfig(0, 30, 2, kv="first"), n_ctx=4096, n_ubatch=512)
    last = loop_memory(m, LoopConfig(0, 30, 2, kv="last"), n_ctx=4096, n_ubatch=512)
    # the stash of kv=first: 30 layers x 512 tokens x 3 KV heads x 64 x (K and V) x 4 bytes
    assert first.resident - last.resident == 30 * 512 * 3 * 64 * 2 * 4


def test_huge_loop_refused_before_loading(smol: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from loopcpp import memory

    m = read_model(smol)
    big = LoopConfig(0, 30, 64, method="rk3", kv="first")
    tight = MemoryLimits(available=1 << 30, allocatable=4 << 30)
    with pytest.raises(LoopConfigError) as e:
        check_loop_memory(m, big, limits=tight)
    msg = str(e.value)
    assert "needs about 10." in msg and "GiB of address space" in msg and "4.00 GiB" in msg
    assert "lower K or the window width (rk3 costs 3x euler)" in msg
    with pytest.raises(LoopConfigError, match=r"needs about 0\.\d+ GiB for its compute graph"):
        check_loop_memory(m, big, limits=MemoryLimits(available=100 << 20, allocatable=None))
    check_loop_memory(m, LoopConfig(13, 17, 2), limits=tight)  # a normal loop fits

    calls: list[Any] = []
    monkeypatch.setattr(memory, "memory_limits", lambda: tight)
    monkeypatch.setattr(llama_cpp.Llama, "__init__", lambda *a, **k: calls.append(a))
    with pytest.raises(LoopConfigError, match="GiB can be allocated"):
        load(smol, loop=big)
    assert not calls  # refused before llama.cpp was asked
    monkeypatch.undo()

    llm = load(smol, loop=LoopConfig(13, 17, 2), n_ctx=64)
    monkeypatch.setattr(memory, "memory_limits", lambda: tight)
    with pytest.raises(LoopConfigError, match="GiB can be allocated"):
        llm.set_loop(big)
    assert llm.loop == LoopConfig(13, 17, 2)  # unchanged
    llm.eval(llm.tokenize(b"still fine"))
    llm.close()


_LIMITED = textwrap.dedent(
    """
    import resource, sys
    import llama_cpp
    from loopcpp import LoopConfig, LoopConfigError
    from loopcpp.api import load
    from loopcpp.memory import _vm_size
    path, how = sys.argv[1], sys.argv[2]
    big = LoopConfig(0, 30, 16, method="rk3")  # about 2.3 GiB of address space
    resource.setrlimit(resource.RLIMIT_AS, (_vm_size() + (1 << 30), resource.RLIM_INFINITY))
    if how == "loopcpp":
        try:
            load(path, loop=big, n_ctx=64)
        except LoopConfigError as e:
            print("refused:", e)
        llm = load(path, loop=LoopConfig(13, 17, 2), n_ctx=64)
        print(llm.create_completion("Hi", max_tokens=2, temperature=0)["choices"][0]["text"])
    elif how == "set_loop":
        import ctypes
        from loopcpp import engine
        llm = load(path, loop=LoopConfig(13, 17, 2), n_ctx=64, verbose=True)
        params = engine.to_params(big)
        rc = engine.lib().llama_set_loop(llm._ctx.ctx, ctypes.byref(params))
        print("set_loop:", rc)
        print(llm.create_completion("Hi", max_tokens=2, temperature=0)["choices"][0]["text"])
    else:
        llama_cpp.Llama(path, n_ctx=64, verbose=False, kv_overrides=big.to_kv_overrides())
    print("survived")
    """
)


def _run_limited(path: Path, how: str) -> subprocess.CompletedProcess[str]:
    if not Path("/proc/self/status").exists():
        pytest.skip("needs Linux /proc")
    return subprocess.run(
        [sys.executable, "-c", _LIMITED, str(path), how],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_address_space_limit_refused_not_aborted(smol: Path) -> None:
    """Under a 1 GiB address-space limit, loopcpp refuses the big loop and runs a small one."""
    proc = _run_limited(smol, "loopcpp")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "refused:" in proc.stdout and "GiB can be allocated" in proc.stdout, proc.stdout
    assert "survived" in proc.stdout


def test_llama_cpp_itself_survives_an_address_space_limit(smol: Path) -> None:
    """The patch refuses the context (llama_context's loop memory check), it does not abort."""
    proc = _run_limited(smol, "llama_cpp")
    assert proc.returncode != -signal.SIGABRT, proc.stderr[-600:]
    assert proc.returncode == 1, proc.stderr[-600:]
    assert "Failed to create llama_context" in proc.stderr, proc.stderr[-600:]


def test_llama_set_loop_refuses_a_graph_it_cannot_allocate(smol: Path) -> None:
    """llama_set_loop itself (no Python pre-check) returns -1 and logs the bytes it needs."""
    proc = _run_limited(smol, "set_loop")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "set_loop: -1" in proc.stdout and "survived" in proc.stdout, proc.stdout
    assert "bytes" in proc.stderr and "cannot be allocated" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize(
    "cfg",
    [
        # the most extra ops per evaluation: layer mode, norm interp, anchor and its rescale
        LoopConfig(0, 30, count=8, mode="layer", norm="interp", anchor=0.5, anchor_norm=True),
        LoopConfig(0, 30, count=4, mode="layer", method="rk4", anchor=0.5, kv="refined"),
        LoopConfig(0, 30, count=8, method="heavy_ball", mode="layer", anchor_norm=True),
        LoopConfig(0, 30, count=8, method="uniform", kv="refined"),
    ],
    ids=["interp", "rk4-refined", "heavy-ball", "uniform"],
)
def test_v2_graphs_fit_the_node_budget(smol: Path, cfg: LoopConfig) -> None:
    """The budget (and loopcpp.memory's copy of it) counts RK stages, the refined pass and the
    per-step ops; the reserved graph is within it (ggml aborts past it)."""
    m = read_model(smol)
    nodes = _graph_nodes(smol, cfg)
    assert nodes <= graph_max_nodes(m, cfg) < 3 * nodes
