"""Zero-shot evaluation of a (looped) model: multiple-choice log-likelihood and perplexity.

Multiple choice follows lm-evaluation-harness: each choice's continuation
``" " + choice`` is scored by the sum of its tokens' log-probabilities given the
context; ``acc`` takes the choice with the highest sum, ``acc_norm`` the highest
sum divided by the choice's length in characters. Tokens are split as the
harness does: ``tokens(context + continuation)`` minus the first
``len(tokens(context))`` tokens is the continuation.

Each question is one llama.cpp batch: the context once, shared by every choice
(its tokens carry every choice's sequence id), and each choice's tokens in
their own sequence. A looped model therefore sees what one full forward pass of
``context + choice`` gives it (every loop evaluation of a choice attends to the
context's K/V of that same evaluation, as in the PyTorch reference), and the
logits are bit-identical to scoring each ``context + choice`` alone, at a
fraction of the tokens.

Perplexity splits the text's tokens into chunks of ``n_ctx`` (BOS first when
the model adds one), evaluates each chunk as one batch on an empty cache and
averages the negative log-likelihood of every predicted token.

The evaluator owns a llama.cpp context of its own (several sequences, one
ubatch of ``n_ctx`` tokens) on the weights of a model from
:func:`loopcpp.api.load`; :meth:`Evaluator.set_loop` changes its loop (and the
model's) without reloading, so one load serves a whole sweep.
"""

from __future__ import annotations

import ctypes
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from loopcpp.config import LoopConfig
from loopcpp.tasks import DELIMITER, Item, McqTask, TextTask

Advance = Callable[[int], None]

#: Sequences one batch may hold (choices of one question).
N_SEQ_MAX = 8
DEFAULT_N_CTX = 1024


# --------------------------------------------------------------------------- results


def _stderr(p: float, n: int) -> float:
    """The harness's sample standard error of a mean of 0/1 outcomes."""
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")


@dataclass(frozen=True)
class ItemResult:
    id: str
    gold: int
    logprobs: tuple[float, ...]  # summed log-probability of each choice's continuation
    n_tokens: tuple[int, ...]
    pred: int  # argmax of logprobs
    pred_norm: int  # argmax of logprobs / len(choice) in characters

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "gold": self.gold, "pred": self.pred, "pred_norm": self.pred_norm,
            "logprobs": [round(x, 6) for x in self.logprobs], "n_tokens": list(self.n_tokens),
        }


@dataclass
class McqResult:
    """Accuracy of a multiple-choice task; ``score`` is the mean log-prob of the right choice."""

    task: str
    items: list[ItemResult]
    seconds: float = 0.0
    tokens: int = 0  # tokens evaluated

    @property
    def n(self) -> int:
        return len(self.items)

    @property
    def acc(self) -> float:
        return sum(r.pred == r.gold for r in self.items) / self.n

    @property
    def acc_norm(self) -> float:
        return sum(r.pred_norm == r.gold for r in self.items) / self.n

    @property
    def mean_gold_logprob(self) -> float:
        return sum(r.logprobs[r.gold] for r in self.items) / self.n

    @property
    def score(self) -> float:
        """Held-in mean log-likelihood (higher is better): what calibration ranks by."""
        return self.mean_gold_logprob

    @property
    def loglikelihood(self) -> bool:
        """A one-continuation task (LAMBADA): acc is the greedy match, plus a perplexity."""
        return bool(self.items) and all(len(r.logprobs) == 1 for r in self.items)

    def metrics(self) -> dict[str, Any]:
        out = {
            "task": self.task, "n": self.n,
            "acc": self.acc, "acc_stderr": _stderr(self.acc, self.n),
            "acc_norm": self.acc_norm, "acc_norm_stderr": _stderr(self.acc_norm, self.n),
            "mean_gold_logprob": self.mean_gold_logprob,
            "tokens": self.tokens, "seconds": round(self.seconds, 3),
        }
        if self.loglikelihood:  # the harness's perplexity: exp of the mean negative log p
            out["perplexity"] = math.exp(-self.mean_gold_logprob)
        return out

    def to_dict(self, items: bool = True) -> dict[str, Any]:
        out = self.metrics()
        if items:
            out["items"] = [r.to_dict() for r in self.items]
        return out


@dataclass
class PplResult:
    """Perplexity of a text; ``score`` is the mean token log-probability."""

    task: str
    file: str
    n_ctx: int
    n_chunks: int = 0
    n_tokens: int = 0  # predicted (scored) tokens
    nll_sum: float = 0.0
    seconds: float = 0.0

    @property
    def nll(self) -> float:
        return self.nll_sum / self.n_tokens

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)

    @property
    def score(self) -> float:
        return -self.nll

    def metrics(self) -> dict[str, Any]:
        return {
            "task": self.task, "file": self.file, "n_ctx": self.n_ctx, "n_chunks": self.n_chunks,
            "n_tokens": self.n_tokens, "nll": self.nll, "ppl": self.ppl,
            "seconds": round(self.seconds, 3),
        }

    def to_dict(self, items: bool = True) -> dict[str, Any]:
        return self.metrics()


Result = McqResult | PplResult


def headline(result: Result) -> str:
    """One line with the main numbers."""
    if isinstance(result, McqResult):
        return (
            f"{result.task}: acc {result.acc:.4f} ± {_stderr(result.acc, result.n):.4f}, "
            f"acc_norm {result.acc_norm:.4f} ± {_stderr(result.acc_norm, result.n):.4f}, "
            f"mean log p(gold) {result.mean_gold_logprob:.4f} (n={result.n})"
        )
    return (
        f"ppl {result.ppl:.4f} (nll {result.nll:.5f}/token, {result.n_tokens} tokens in "
        f"{result.n_chunks} chunks of {result.n_ctx})"
    )


def metric_value(result: Result, metric: str) -> float:
    """``acc``, ``acc_norm``, ``logprob`` (the calibration score) or ``ppl`` of a result."""
    if metric == "logprob":
        return result.score
    if isinstance(result, McqResult) and metric in ("acc", "acc_norm"):
        return float(getattr(result, metric))
    if isinstance(result, PplResult) and metric == "ppl":
        return result.ppl
    kind = "multiple-choice" if isinstance(result, McqResult) else "perplexity"
    allowed = "acc, acc_norm, logprob" if isinstance(result, McqResult) else "ppl, logprob"
    raise ValueError(f"metric {metric!r} does not apply to a {kind} task: use {allowed}")


def default_metric(result_or_task: Result | McqTask | TextTask) -> str:
    return "acc" if isinstance(result_or_task, (McqResult, McqTask)) else "ppl"


# --------------------------------------------------------------------------- preparation


@dataclass(frozen=True)
class EncodedItem:
    """An item's tokens: per choice, the context tokens it sees and its continuation."""

    item: Item
    prefixes: tuple[tuple[int, ...], ...]
    conts: tuple[tuple[int, ...], ...]


@dataclass
class Prepared:
    """A task tokenized once, to be run under many loops."""

    task: McqTask | TextTask
    items: list[EncodedItem] = field(default_factory=list)
    chunks: list[list[int]] = field(default_factory=list)  # ppl: each chunk's tokens (BOS first)

    @property
    def name(self) -> str:
        return self.task.name

    @property
    def total(self) -> int:
        """Progress units: questions or chunks."""
        return len(self.items) if isinstance(self.task, McqTask) else len(self.chunks)


def _log_softmax_at(logits: np.ndarray, targets: Sequence[int]) -> np.ndarray:
    """``log softmax(logits[r])[targets[r]]`` for each row r, in float64."""
    x = logits.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    lse = (m + np.log(np.exp(x - m).sum(axis=1, keepdims=True)))[:, 0]
    return x[np.arange(len(targets)), np.asarray(targets)] - lse


def _argmax(values: Sequence[float]) -> int:
    return int(np.argmax(np.asarray(values)))  # first of equals, as the harness


class Evaluator:
    """Scores tasks with the weights of ``llm`` (a model from :func:`loopcpp.api.load`)."""

    def __init__(self, llm: Any, n_ctx: int = DEFAULT_N_CTX, n_seq_max: int = N_SEQ_MAX):
        import llama_cpp
        from llama_cpp import _internals

        from loopcpp import engine

        if n_ctx < 8:
            raise ValueError(f"context size {n_ctx} is too small: use 8 or more tokens")
        self.llm = llm
        self.n_ctx = n_ctx
        self.n_seq_max = min(n_seq_max, int(llama_cpp.llama_max_parallel_sequences()))
        self.n_vocab = int(llm.n_vocab())
        params = llama_cpp.llama_context_default_params()
        for name, _ in llama_cpp.llama_context_params._fields_:
            setattr(params, name, getattr(llm.context_params, name))
        params.n_ctx = params.n_batch = params.n_ubatch = n_ctx  # one batch is one ubatch
        params.n_seq_max = self.n_seq_max
        params.kv_unified = True  # a context token is shared by the choices' sequences
        params.embeddings = False
        self._ctx = _internals.LlamaContext(model=llm._model, params=params, verbose=False)
        self._batch = _internals.LlamaBatch(
            n_tokens=n_ctx, embd=0, n_seq_max=self.n_seq_max, verbose=False
        )
        # llama.cpp may pad the context; a batch never exceeds what was asked (and allocated)
        ubatch = int(llama_cpp.llama_n_ubatch(self._ctx.ctx))
        self.n_ctx = min(n_ctx, int(self._ctx.n_ctx()), ubatch)
        self._engine = engine
        # a new context starts with the file's loop: give it the model's current one
        engine.set_loop(self._ctx.ctx, llm._model.model, llm.loop)
        model = llm._model
        self._bos = [int(model.token_bos())] if model.add_bos_token() else []

    # -- loop -------------------------------------------------------------

    @property
    def loop(self) -> LoopConfig | None:
        return self._engine.get_loop(self._ctx.ctx)

    def set_loop(self, loop: LoopConfig | None) -> None:
        """Change the loop of the model and of this evaluator (no reload)."""
        self.llm.set_loop(loop)  # validates against the model
        self._engine.set_loop(self._ctx.ctx, self.llm._model.model, loop)

    @contextmanager
    def keeping_loop(self) -> Iterator[None]:
        """Restore the current loop afterwards, whatever the block set."""
        before = self.loop
        try:
            yield
        finally:
            self.set_loop(before)

    def run_loop(
        self,
        prepared: Prepared,
        loop: LoopConfig | None,
        label: str,
        advance_item: Advance | None = None,
        advance_config: Advance | None = None,
        describe: Callable[[str], Any] | None = None,
    ) -> Result:
        """Evaluate ``prepared`` under ``loop`` (None: stock), reporting progress."""
        if describe:
            describe(label)
        self.set_loop(loop)
        result = self.run(prepared, advance_item)
        if advance_config:
            advance_config(1)
        return result

    def close(self) -> None:
        self._batch.close()
        self._ctx.close()

    def __enter__(self) -> Evaluator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- tokens -----------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        """Text tokens, without BOS/EOS (special tokens in the text stay plain text)."""
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def encode(self, item: Item) -> EncodedItem:
        """Split each ``context + " " + choice`` into context and continuation (as the harness).

        Each choice has its own context when the item has ``contexts`` (WinoGrande).
        """
        prefixes, conts = [], []
        n_context_of: dict[str, int] = {}
        for i, choice in enumerate(item.choices):
            context = item.context_of(i)
            n_spaces = len(context) - len(context.rstrip())
            ctx_text, moved = (
                (context[:-n_spaces], context[-n_spaces:]) if n_spaces else (context, "")
            )
            if ctx_text not in n_context_of:
                n_context_of[ctx_text] = len(self._bos) + len(self.tokenize(ctx_text))
            n_context = n_context_of[ctx_text]
            whole = self._bos + self.tokenize(ctx_text + moved + DELIMITER + choice)
            prefix, cont = whole[:n_context], whole[n_context:]
            if not prefix or not cont:
                raise ValueError(
                    f"{item.id}: an empty context or choice cannot be scored "
                    f"(context {len(prefix)} tokens, choice {choice!r} {len(cont)} tokens)"
                )
            prefixes.append(tuple(prefix))
            conts.append(tuple(cont))
        return EncodedItem(item, tuple(prefixes), tuple(conts))

    def prepare(
        self, task: McqTask | TextTask, limit: int | None = None, items: list[Item] | None = None
    ) -> Prepared:
        """Load and tokenize a task once (``limit``: first questions or text chunks).

        ``items``: the task's questions when already loaded (``task.items(limit)``).
        """
        if isinstance(task, McqTask):
            items = task.items(limit) if items is None else items
            return Prepared(task, items=[self.encode(it) for it in items])
        return Prepared(task, chunks=self.text_chunks(task.text(), limit))

    def text_chunks(self, text: str, limit: int | None = None) -> list[list[int]]:
        """Chunks of at most ``n_ctx`` tokens (BOS first when the model adds one)."""
        if limit is not None and limit < 1:
            raise ValueError(f"limit {limit} is out of range: give 1 or more chunks")
        tokens = self.tokenize(text)
        size = self.n_ctx - len(self._bos)
        chunks = [self._bos + tokens[i : i + size] for i in range(0, len(tokens), size)]
        chunks = [c for c in chunks if len(c) >= 2]
        if not chunks:
            raise ValueError("the text has fewer than 2 tokens: nothing to predict")
        return chunks[:limit] if limit is not None else chunks

    # -- llama.cpp --------------------------------------------------------

    def _decode(self, entries: list[tuple[int, int, Sequence[int], bool]]) -> np.ndarray:
        """One batch on an empty cache: (token, pos, seq ids, want logits); logits rows."""
        import llama_cpp

        llama_cpp.llama_memory_clear(self._ctx.memory, True)
        b = self._batch.batch
        b.n_tokens = len(entries)
        n_out = 0
        for i, (token, pos, seqs, want) in enumerate(entries):
            b.token[i] = token
            b.pos[i] = pos
            b.n_seq_id[i] = len(seqs)
            for j, s in enumerate(seqs):
                b.seq_id[i][j] = s
            b.logits[i] = want
            n_out += bool(want)
        self._ctx.decode(self._batch)
        ptr = ctypes.cast(self._ctx.get_logits(), ctypes.POINTER(ctypes.c_float))
        return np.ctypeslib.as_array(ptr, shape=(n_out, self.n_vocab))

    def _calls(self, enc: EncodedItem) -> list[tuple[tuple[int, ...], list[int]]]:
        """Batches for one item: a context and the choices that share it, within the limits."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, prefix in enumerate(enc.prefixes):
            groups.setdefault(prefix, []).append(i)
        calls = []
        for prefix, members in groups.items():
            longest = max(len(enc.conts[i]) for i in members)
            if longest >= self.n_ctx:
                raise ValueError(
                    f"{enc.item.id}: a choice of {longest} tokens does not fit a context of "
                    f"{self.n_ctx}: raise --ctx"
                )
            if len(prefix) + longest > self.n_ctx:
                prefix = prefix[len(prefix) + longest - self.n_ctx :]  # drop from the left
            current: list[int] = []
            used = len(prefix)
            for i in members:
                n = len(enc.conts[i])
                if current and (used + n > self.n_ctx or len(current) == self.n_seq_max):
                    calls.append((prefix, current))
                    current, used = [], len(prefix)
                current.append(i)
                used += n
            calls.append((prefix, current))
        return calls

    def choice_logprobs(self, enc: EncodedItem) -> tuple[list[float], int]:
        """Summed log-probability of each choice's continuation, and tokens evaluated."""
        logprobs, _greedy, evaluated = self.choice_scores(enc)
        return logprobs, evaluated

    def choice_scores(self, enc: EncodedItem) -> tuple[list[float], list[bool], int]:
        """Per choice: summed log-probability, whether every token is the argmax; tokens."""
        logprobs = [0.0] * len(enc.conts)
        greedy = [False] * len(enc.conts)
        evaluated = 0
        for prefix, members in self._calls(enc):
            seqs = list(range(len(members)))
            entries = [(t, p, seqs, p == len(prefix) - 1) for p, t in enumerate(prefix)]
            targets = []
            for s, i in enumerate(members):
                cont = enc.conts[i]
                entries += [
                    (t, len(prefix) + k, [s], k < len(cont) - 1) for k, t in enumerate(cont)
                ]
            rows = self._decode(entries)
            evaluated += len(entries)
            # rows: the context's last token (shared), then each choice's tokens but its last
            row_of: list[int] = []
            r = 1
            for i in members:
                cont = enc.conts[i]
                row_of += [0] + list(range(r, r + len(cont) - 1))
                targets += list(cont)
                r += len(cont) - 1
            picked = rows[row_of]
            lp = _log_softmax_at(picked, targets)
            hits = picked.argmax(axis=1) == np.asarray(targets)
            pos = 0
            for i in members:
                n = len(enc.conts[i])
                logprobs[i] = float(lp[pos : pos + n].sum())
                greedy[i] = bool(hits[pos : pos + n].all())
                pos += n
        return logprobs, greedy, evaluated

    def score(self, enc: EncodedItem) -> tuple[ItemResult, int]:
        """An item's result. One choice (LAMBADA): ``pred`` 0 when its continuation is the
        greedy one, else -1 (wrong); as the harness's ``acc`` of a loglikelihood task."""
        logprobs, greedy, evaluated = self.choice_scores(enc)
        if len(logprobs) == 1:
            pred = 0 if greedy[0] else -1
            return ItemResult(
                id=enc.item.id, gold=enc.item.gold, logprobs=tuple(logprobs),
                n_tokens=(len(enc.conts[0]),), pred=pred, pred_norm=pred,
            ), evaluated
        lengths = [max(len(c), 1) for c in enc.item.choices]
        return ItemResult(
            id=enc.item.id,
            gold=enc.item.gold,
            logprobs=tuple(logprobs),
            n_tokens=tuple(len(c) for c in enc.conts),
            pred=_argmax(logprobs),
            pred_norm=_argmax([lp / n for lp, n in zip(logprobs, lengths, strict=True)]),
        ), evaluated

    def chunk_nll(self, chunk: Sequence[int]) -> tuple[float, int]:
        """Summed NLL of every token of a chunk after its first, and how many."""
        n = len(chunk)
        rows = self._decode([(t, p, [0], p < n - 1) for p, t in enumerate(chunk)])
        total = 0.0
        step = 64  # rows per float64 softmax, to bound memory
        for r in range(0, n - 1, step):
            lp = _log_softmax_at(rows[r : r + step], chunk[r + 1 : r + 1 + step])
            total -= float(lp.sum())
        return total, n - 1

    # -- tasks ------------------------------------------------------------

    def run(self, prepared: Prepared, advance: Advance | None = None) -> Result:
        """Evaluate a prepared task under the current loop."""
        t0 = time.perf_counter()
        if isinstance(prepared.task, McqTask):
            items, tokens = [], 0
            for enc in prepared.items:
                result, evaluated = self.score(enc)
                items.append(result)
                tokens += evaluated
                if advance:
                    advance(1)
            return McqResult(prepared.name, items, time.perf_counter() - t0, tokens)
        out = PplResult("ppl", str(prepared.task.path), self.n_ctx)
        for chunk in prepared.chunks:
            nll, n = self.chunk_nll(chunk)
            out.nll_sum += nll
            out.n_tokens += n
            out.n_chunks += 1
            if advance:
                advance(1)
        out.seconds = time.perf_counter() - t0
        return out

    def evaluate(
        self, task: McqTask | TextTask, limit: int | None = None, advance: Advance | None = None
    ) -> Result:
        return self.run(self.prepare(task, limit), advance)


class PlainProgress:
    """Progress as plain lines, for a stderr that is not a terminal (a pipe, a log file).

    The rich bar draws nothing there, so a long run would be silent: this prints
    ``progress: DESCRIPTION N/TOTAL (P %), E s elapsed, ~R s left`` after the
    first step, every ``interval`` seconds, and when a task completes. It has the
    part of rich.progress.Progress's interface that loopcpp uses.
    """

    def __init__(self, write: Callable[[str], None], interval: float = 10.0) -> None:
        self.write = write
        self.interval = interval
        self.tasks: list[dict[str, Any]] = []

    def add_task(self, description: str, total: float | None = None, **_: Any) -> int:
        self.tasks.append({"description": description, "total": total, "completed": 0.0,
                           "start": time.monotonic(), "shown": None})
        return len(self.tasks) - 1

    def update(self, task_id: int, *, description: str | None = None,
               advance: float | None = None, **_: Any) -> None:
        if description is not None:
            self.tasks[task_id]["description"] = description
        if advance:
            self.advance(task_id, advance)

    def advance(self, task_id: int, advance: float = 1) -> None:
        t = self.tasks[task_id]
        t["completed"] += advance
        now = time.monotonic()
        done = t["total"] is not None and t["completed"] >= t["total"]
        if t["shown"] is None or done or now - t["shown"] >= self.interval:
            t["shown"] = now
            self.write(self._line(t, now))

    @staticmethod
    def _line(t: dict[str, Any], now: float) -> str:
        elapsed = now - t["start"]
        n, total = t["completed"], t["total"]
        text = f"progress: {t['description']} {n:g}"
        if total:
            text += f"/{total:g} ({100 * n / total:.0f} %)"
        text += f", {elapsed:.0f} s elapsed"
        if total and 0 < n < total:
            text += f", ~{elapsed * (total - n) / n:.0f} s left"
        return text


@contextmanager
def progress_bar(enabled: bool = True, interval: float = 10.0) -> Iterator[Any]:
    """A rich progress bar on stderr that disappears when done; plain periodic lines
    (:class:`PlainProgress`, every ``interval`` s) when stderr is not a terminal."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(),
    )
    console = Console(stderr=True)
    if enabled and not console.is_terminal:
        def write(line: str) -> None:
            print(line, file=sys.stderr, flush=True)

        yield PlainProgress(write, interval)
        return
    with Progress(*columns, console=console, transient=True, disable=not enabled) as bar:
        yield bar
