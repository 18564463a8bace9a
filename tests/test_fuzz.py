"""Fuzz conformance: random valid loop configurations, llama.cpp against the reference.

A fixed seed draws N_CASES cases over the tiny dense checkpoints: a window
inside the model, K in 1..5, every mode / method / kv / routing / apply, an
n_ubatch in 1..8 (a context parameter, so one llama.cpp context is kept per
(arch, n_ubatch) and the loop is changed with ``set_loop`` between cases), a
random prompt of 3..20 tokens and 0..6 greedy decode steps. The test id and
the failure message spell the whole case out, so a failure reproduces with
``pytest tests/test_fuzz.py -k <id>``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import pytest
from conftest import require_patched

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_conformance import ATOL  # noqa: E402  (the same tolerances)

from loopcpp import LoopConfig  # noqa: E402
from loopcpp.config import MODES, ROUTINGS, STAGES  # noqa: E402

# the version-1 values (version 2 has its own conformance grid)
METHODS = tuple(STAGES)
KV_POLICIES = ("last", "first")
APPLIES = ("all", "prefill")
from loopcpp.tiny import TINY_ARCHS  # noqa: E402

SEED = 1234
N_CASES = 25
ARCHS = ("llama", "qwen2", "qwen3", "gemma3")
N_CTX = 64
N_BATCH = 64


@dataclass(frozen=True)
class Case:
    arch: str
    loop: LoopConfig
    n_ubatch: int
    prompt: tuple[int, ...]
    n_decode: int

    def __str__(self) -> str:
        return (
            f"{self.arch} {self.loop.describe()} n_ubatch={self.n_ubatch} "
            f"prompt_len={len(self.prompt)} decode={self.n_decode}"
        )

    @property
    def id(self) -> str:
        lo = self.loop
        return (
            f"{self.arch}-[{lo.start},{lo.end})x{lo.count}-{lo.method}-{lo.mode}-kv_{lo.kv}-"
            f"{lo.routing}-{lo.apply}-ub{self.n_ubatch}-p{len(self.prompt)}-d{self.n_decode}"
        )


def draw_cases(seed: int = SEED, n: int = N_CASES) -> list[Case]:
    """The fuzz cases, sorted so that cases sharing a llama.cpp context are adjacent."""
    rng = random.Random(seed)
    cases = []
    for _ in range(n):
        arch = rng.choice(ARCHS)
        n_layer = TINY_ARCHS[arch][1]["num_hidden_layers"]
        start = rng.randrange(0, n_layer)
        end = rng.randrange(start + 1, n_layer + 1)
        loop = LoopConfig(
            start,
            end,
            count=rng.randint(1, 5),
            mode=rng.choice(MODES),
            method=rng.choice(METHODS),
            kv=rng.choice(KV_POLICIES),
            routing=rng.choice(ROUTINGS),
            apply=rng.choice(APPLIES),
        )
        n_ubatch = rng.randint(1, 8)
        prompt = tuple(rng.randrange(100, 40000) for _ in range(rng.randint(3, 20)))
        cases.append(Case(arch, loop, n_ubatch, prompt, rng.randint(0, 6)))
    return sorted(cases, key=lambda c: (ARCHS.index(c.arch), c.n_ubatch))


CASES = draw_cases()


class _Contexts:
    """One reference per arch and one llama.cpp context per (arch, n_ubatch), the latest kept."""

    def __init__(self) -> None:
        self.refs: dict[str, object] = {}
        self.key: tuple[str, int] | None = None
        self.llm = None

    def reference(self, arch: str):
        from loopcpp.reference import LoopedReference, emulate_ggml_cpu_gelu
        from loopcpp.tiny import load_hf_model, tiny_checkpoint

        if arch not in self.refs:
            model = load_hf_model(tiny_checkpoint(arch)[0])
            emulate_ggml_cpu_gelu(model)
            self.refs[arch] = LoopedReference(model)
        return self.refs[arch]

    def llama(self, arch: str, n_ubatch: int):
        from loopcpp.api import load
        from loopcpp.tiny import tiny_checkpoint

        if self.key != (arch, n_ubatch):
            self.close()
            self.llm = load(
                tiny_checkpoint(arch)[1],
                loop=False,
                n_ctx=N_CTX,
                n_batch=N_BATCH,
                n_ubatch=n_ubatch,
                logits_all=True,
                type_k=0,
                type_v=0,
                n_threads=1,
                seed=0,
            )
            self.key = (arch, n_ubatch)
        return self.llm

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()
        self.llm, self.key = None, None


@pytest.fixture(scope="module")
def contexts():
    require_patched()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: a second thread only adds waiting on shared cores
    ctx = _Contexts()
    yield ctx
    ctx.close()
    torch.set_num_threads(threads)


def test_cases_are_deterministic_and_varied():
    assert draw_cases() == CASES
    assert len(CASES) == N_CASES
    seen = {(c.loop.mode, c.loop.method) for c in CASES}
    assert len(seen) >= 5, f"the draw covers too few mode/method pairs: {sorted(seen)}"
    assert {c.arch for c in CASES} == set(ARCHS)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fuzz_case(contexts, case: Case):
    ref = contexts.reference(case.arch)
    llm = contexts.llama(case.arch, case.n_ubatch)
    prompt = list(case.prompt)

    llm.set_loop(case.loop)
    llm.reset()
    llm.eval(prompt)
    new = []
    for _ in range(case.n_decode):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        new.append(token)
        llm.eval([token])
    got = np.array(llm.scores[: llm.n_tokens], dtype=np.float32)

    ref.set_loop(case.loop)
    ref.reset()
    rows = [ref.run(prompt, case.n_ubatch, N_BATCH)] + [ref.forward([t]) for t in new]
    want = torch.cat(rows).numpy()

    assert got.shape == want.shape, f"{case}: shapes {got.shape} vs {want.shape}"
    err = np.abs(got - want).max(axis=1)
    worst = int(err.argmax())
    print(f"{case.id}: max abs logit error {err[worst]:.2e}")
    assert err[worst] < ATOL[case.arch], (
        f"{case}: max abs logit error {err[worst]:.2e} >= {ATOL[case.arch]} at row {worst} "
        f"({'prompt' if worst < len(prompt) else 'decode'}); prompt={prompt}"
    )
