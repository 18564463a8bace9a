"""One completion, looped, optionally beside the stock model's (``loopcpp generate``).

Which loop runs is :func:`loopcpp.resolve.resolve`'s answer."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from loopcpp.gguf_io import GGUFModel


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
