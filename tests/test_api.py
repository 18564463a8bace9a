"""The Python API on the bundled SmolLM2: ``loopcpp.load``, ``.loop``, ``.set_loop``.

"Exactly" below means bit-identical float32 logits: the same weights, batch
split and thread count give the same arithmetic, so a stock run reached through
``set_loop(None)`` must equal a model loaded without a loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import loopcpp
from loopcpp.config import LoopConfig, LoopConfigError

PROMPT = b"Tide pools along the rocky coast hold sea anemones, small crabs and fish."
LOOP = LoopConfig(13, 17, count=3, method="rk3")
#: f32 KV cache, every position's logits, one batch, one thread: deterministic
KW: dict[str, Any] = dict(
    n_ctx=64, n_batch=64, n_ubatch=64, logits_all=True, n_threads=1, n_threads_batch=1,
    type_k=0, type_v=0,
)


pytestmark = pytest.mark.usefixtures("patched")  # every test here needs the patched libllama


def logits(llm: Any) -> np.ndarray:
    """Logits of every prompt position, from an empty cache."""
    llm.reset()
    tokens = llm.tokenize(PROMPT)
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


@pytest.fixture(scope="module")
def stock(smollm2_path: Path) -> np.ndarray:
    llm = loopcpp.load(smollm2_path, loop=False, **KW)
    try:
        assert llm.loop is None
        return logits(llm)
    finally:
        llm.close()


@pytest.fixture(scope="module")
def looped_file(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from loopcpp.convert import write_loop_metadata

    out = tmp_path_factory.mktemp("looped") / "smol-looped.gguf"
    return write_loop_metadata(smollm2_path, out, LOOP)


def test_loop_round_trips_and_set_loop(smollm2_path: Path, stock: np.ndarray) -> None:
    llm = loopcpp.load(smollm2_path, loop=LOOP, **KW)
    try:
        assert llm.loop == LOOP
        looped = logits(llm)
        assert np.abs(looped - stock).max() > 1e-1  # the loop is on

        llm.set_loop(None)
        assert llm.loop is None
        np.testing.assert_array_equal(logits(llm), stock)

        other = LoopConfig(10, 20, count=2, mode="layer", kv="first")
        llm.set_loop(other)
        assert llm.loop == other
        changed = logits(llm)
        assert np.abs(changed - looped).max() > 1e-1 and np.abs(changed - stock).max() > 1e-1

        llm.set_loop(LOOP)  # back, without reloading: the same logits as at load time
        np.testing.assert_array_equal(logits(llm), looped)

        # an invalid loop raises and leaves the loop as it was
        with pytest.raises(LoopConfigError, match="out of range for a model with 30 layers"):
            llm.set_loop(LoopConfig(25, 40))
        assert llm.loop == LOOP
        np.testing.assert_array_equal(logits(llm), looped)
    finally:
        llm.close()


def test_identity_loop_is_the_stock_model(smollm2_path: Path, stock: np.ndarray) -> None:
    llm = loopcpp.load(smollm2_path, loop=LoopConfig(13, 17, count=1), **KW)
    try:
        np.testing.assert_array_equal(logits(llm), stock)
    finally:
        llm.close()


def test_loop_none_reads_the_file_and_false_ignores_it(
    smollm2_path: Path, looped_file: Path, stock: np.ndarray
) -> None:
    from_file = loopcpp.load(looped_file, loop=None, **KW)
    try:
        assert from_file.loop == LOOP
        file_logits = logits(from_file)
    finally:
        from_file.close()
    explicit = loopcpp.load(smollm2_path, loop=LOOP, **KW)
    try:
        np.testing.assert_array_equal(file_logits, logits(explicit))
    finally:
        explicit.close()

    ignored = loopcpp.load(looped_file, loop=False, **KW)
    try:
        assert ignored.loop is None
        np.testing.assert_array_equal(logits(ignored), stock)
    finally:
        ignored.close()

    plain = loopcpp.load(smollm2_path, loop=None, **KW)  # no loop keys: the stock model
    try:
        assert plain.loop is None
    finally:
        plain.close()


def test_load_refuses_bad_loops(smollm2_path: Path) -> None:
    with pytest.raises(LoopConfigError, match="out of range for a model with 30 layers"):
        loopcpp.load(smollm2_path, loop=LoopConfig(28, 31))
    with pytest.raises(LoopConfigError, match="unknown recipe '13:17': use one of paper"):
        loopcpp.load(smollm2_path, loop="13:17")  # a string names a recipe
    with pytest.raises(LoopConfigError, match="must be a LoopConfig .*or None/False"):
        loopcpp.load(smollm2_path, loop=(13, 17))


def test_chat_completion_and_streaming(smollm2_path: Path) -> None:
    llm = loopcpp.load("smollm2-135m-instruct", loop=LoopConfig(13, 17, count=2), n_ctx=256,
                       n_threads=1, n_threads_batch=1)
    try:
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        out = llm.create_chat_completion(messages=messages, max_tokens=8, temperature=0)
        text = out["choices"][0]["message"]["content"]
        assert "Paris" in text and out["usage"]["completion_tokens"] <= 8
        # from an empty cache again: with the prompt cached, llama-cpp-python would
        # re-evaluate its last token as a batch of its own, and a looped model's
        # numbers depend on the batch split (docs/LOOPING.md)
        llm.reset()
        chunks = list(
            llm.create_chat_completion(messages=messages, max_tokens=8, temperature=0, stream=True)
        )
        streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        assert streamed == text
        assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    finally:
        llm.close()


def test_embeddings_of_the_final_state(smollm2_path: Path) -> None:
    kw = dict(n_ctx=64, n_batch=64, n_threads=1, n_threads_batch=1, embedding=True)
    text = "The capital of France is"
    llm = loopcpp.load(smollm2_path, loop=LOOP, **kw)
    try:
        looped = np.array(llm.embed(text))  # no pooling: one vector per token
        n_tokens = len(llm.tokenize(text.encode()))
        assert looped.shape == (n_tokens, 576) and np.isfinite(looped).all()
        np.testing.assert_array_equal(np.array(llm.embed(text)), looped)
        llm.set_loop(None)
        stock_via_set = np.array(llm.embed(text))
    finally:
        llm.close()
    stock_llm = loopcpp.load(smollm2_path, loop=False, **kw)
    try:
        stock = np.array(stock_llm.embed(text))
    finally:
        stock_llm.close()
    np.testing.assert_array_equal(stock_via_set, stock)
    # the first token only sees itself, yet the loop still changes its state
    assert (np.abs(looped - stock).max(axis=1) > 1e-2).all()
