"""One completion, looped, optionally beside the stock model's (``loopcpp generate``)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from loopcpp.config import LoopConfig, LoopConfigError
from loopcpp.gguf_io import GGUFModel
from loopcpp.window import DEFAULT_DEPTH, depth_window


def resolve_loop(
    model: GGUFModel,
    start: int | None = None,
    end: int | None = None,
    options: dict[str, Any] | None = None,
    no_loop: bool = False,
    depth: float | None = None,
    width: int | None = None,
) -> tuple[LoopConfig | None, str]:
    """The loop a run-time command uses, and where it came from.

    An explicit window wins; otherwise the file's loop (with the given options
    changed); otherwise the depth-fraction rule with the given options.
    """
    options = dict(options or {})
    if no_loop:
        return None, "no loop (--no-loop)"
    if (start is None) != (end is None):
        raise LoopConfigError("give both --start and --end, or neither")
    if start is not None and end is not None:
        return LoopConfig(start, end, **options).check(model.n_layer), "window as asked"
    if model.loop is not None and depth is None and width is None:
        return model.loop.with_(**options).check(model.n_layer), "loop from the GGUF metadata"
    a, b, why = depth_window(model.n_layer, DEFAULT_DEPTH if depth is None else depth, width)
    return LoopConfig(a, b, **options).check(model.n_layer), f"depth rule: {why}"


@dataclass
class Completion:
    text: str
    n_tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.n_tokens / self.seconds if self.seconds > 0 else 0.0


def complete(
    llm: Any, prompt: str, max_tokens: int, temperature: float, chat: bool, seed: int = 0
) -> Completion:
    """Generate from ``prompt`` (through the chat template when ``chat``)."""
    t0 = time.perf_counter()
    if chat:
        out = llm.create_chat_completion(
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=temperature,
            seed=seed,
        )
        text = out["choices"][0]["message"]["content"] or ""
    else:
        out = llm.create_completion(
            prompt, max_tokens=max_tokens, temperature=temperature, seed=seed
        )
        text = out["choices"][0]["text"]
    seconds = time.perf_counter() - t0
    return Completion(text.strip(), int(out["usage"]["completion_tokens"]), seconds)


def has_chat_template(model: GGUFModel) -> bool:
    return model.value("tokenizer.chat_template") is not None
