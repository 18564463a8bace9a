"""PyTorch reference implementation of the loop semantics (docs/LOOPING.md).

``LoopedReference`` wraps a Hugging Face transformers causal LM and runs its
decoder layers by hand: embeddings, the layers before the window once, the
window under the configured integrator, the layers after it once, the final
norm and the LM head. It keeps its own KV cache (one K/V entry per token per
layer, whatever K is) and implements the ``kv``, ``routing`` and ``apply``
policies exactly as the contract states, so that the patched llama.cpp can be
checked against it logit by logit.

This is the only module of the package that imports torch and transformers.

Numerics (the C++ patch must do the same):

* one Euler sub-step is ``E(y) = y + h * (G(y) - y)`` with ``h = 1/K`` rounded to
  float32; when ``h == 1`` (naive, or euler with K = 1) it is ``E(y) = G(y)``;
* a stage with ``alpha == 0`` is ``E(y)`` itself; otherwise it is
  ``alpha * x + (1 - alpha) * E(y)`` with both coefficients rounded to float32
  from their double values.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from loopcpp.config import LoopConfig, LoopConfigError

#: Hugging Face architectures (config.architectures / class names) supported here.
SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Gemma3ForCausalLM",
    "Qwen3MoeForCausalLM",
    "OlmoeForCausalLM",
    "DeepseekV3ForCausalLM",
)

_ATTN_IMPLEMENTATIONS = ("eager", "sdpa")


def _mlp_gate_router(layer: nn.Module) -> nn.Module | None:
    """``layer.mlp.gate`` of a sparse MoE block (a dense MLP has no ``experts``)."""
    mlp = getattr(layer, "mlp", None)
    if mlp is not None and hasattr(mlp, "experts") and hasattr(mlp, "gate"):
        return mlp.gate
    return None


#: Architecture -> function returning a decoder layer's router module (None for a
#: dense layer). The router's forward output (expert ids and gate weights, in
#: whatever tuple the model uses) is what frozen routing replays; in these
#: families the weights it returns are final (normalised, scaled), as the
#: patch's frozen ``weights`` are. Shared experts (DeepSeek) are not part of
#: the router and always run. Add MoE families here.
ROUTER_FINDERS: dict[str, Callable[[nn.Module], nn.Module | None]] = {
    "Qwen3MoeForCausalLM": _mlp_gate_router,
    "OlmoeForCausalLM": _mlp_gate_router,
    "DeepseekV3ForCausalLM": _mlp_gate_router,
}


def _architecture(model: nn.Module) -> str:
    name = type(model).__name__
    if name not in SUPPORTED_ARCHITECTURES:
        raise LoopConfigError(
            f"the reference does not support {name}: use a model of one of "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (load it with AutoModelForCausalLM)"
        )
    return name


class _Stash:
    """The cache object handed to the HF attention modules during one batch.

    ``update`` returns the persisted past K/V of the layer followed by the K/V
    that this evaluation computed for the batch's tokens, and remembers the
    first and the latest evaluation's K/V. Nothing is persisted here.

    For DeepSeek's multi-head latent attention the pair is what transformers
    (and llama.cpp) cache for MLA: the normalised compressed latent and the
    roped shared key part, both ``[batch, 1, tokens, dim]``; the policy is the same.
    """

    def __init__(self, past_k: list[torch.Tensor | None], past_v: list[torch.Tensor | None]):
        self.past_k = past_k
        self.past_v = past_v
        self.first: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.last: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.evals: dict[int, int] = {}

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        kv = (key_states, value_states)
        self.first.setdefault(layer_idx, kv)
        self.last[layer_idx] = kv
        self.evals[layer_idx] = self.evals.get(layer_idx, 0) + 1
        pk, pv = self.past_k[layer_idx], self.past_v[layer_idx]
        if pk is None or pv is None:
            return key_states, value_states
        return torch.cat([pk, key_states], dim=-2), torch.cat([pv, value_states], dim=-2)


@contextmanager
def _frozen_routers(routers: Sequence[nn.Module]) -> Iterator[None]:
    """Within the block, each router returns its first call's output again."""
    patched = []
    try:
        for router in routers:
            original = router.forward
            memo: list[Any] = []

            def forward(
                *args: Any, _orig: Callable = original, _memo: list = memo, **kwargs: Any
            ) -> Any:
                if not _memo:
                    _memo.append(_orig(*args, **kwargs))
                return _memo[0]

            router.forward = forward  # type: ignore[method-assign]
            patched.append(router)
        yield
    finally:
        for router in patched:
            del router.forward  # restores the class's forward


class LoopedReference:
    """A causal LM with a loop, evaluated batch by batch on one sequence.

    ``loop=None`` runs the stock model. ``forward`` continues the cached
    sequence; ``reset`` forgets it.
    """

    def __init__(self, model: nn.Module, loop: LoopConfig | None = None):
        self.arch = _architecture(model)
        self.model = model.eval()
        self.config = model.config
        impl = getattr(self.config, "_attn_implementation", None) or "eager"
        if impl not in _ATTN_IMPLEMENTATIONS:
            raise LoopConfigError(
                f"attention implementation {impl!r} is not supported by the reference: load "
                f"the model with attn_implementation='eager' (or 'sdpa')"
            )
        self._bool_mask = impl == "sdpa"
        if getattr(self.config, "use_bidirectional_attention", False):
            raise LoopConfigError(
                "bidirectional attention is not a causal LM: use a causal checkpoint"
            )
        self.base = model.model
        self.layers: nn.ModuleList = self.base.layers
        self.n_layer = len(self.layers)
        self.layer_types = self._layer_types()
        self.sliding_window: int | None = getattr(self.config, "sliding_window", None)
        self._rope_per_type = (
            "layer_type" in inspect.signature(self.base.rotary_emb.forward).parameters
        )
        finder = ROUTER_FINDERS.get(self.arch)
        self.routers: list[nn.Module | None] = [
            finder(layer) if finder else None for layer in self.layers
        ]
        self.loop: LoopConfig | None = None
        self.set_loop(loop)
        self.reset()

    # -- state ----------------------------------------------------------------

    def set_loop(self, loop: LoopConfig | None) -> None:
        """Change the loop (keeps the cache, like the run-time C API)."""
        if loop is not None:
            loop.check(self.n_layer)
            if loop.version != 1:
                raise LoopConfigError(
                    f"the reference implements LOOPING.md version 1 only, not {loop.describe()}: "
                    "use naive/euler/rk3, kv last/first, apply all/prefill and no version-2 keys"
                )
        self.loop = loop

    def reset(self) -> None:
        """Forget the cached sequence."""
        self.past_k: list[torch.Tensor | None] = [None] * self.n_layer
        self.past_v: list[torch.Tensor | None] = [None] * self.n_layer
        self.n_past = 0
        self.last_evals: dict[int, int] = {}

    def kv_length(self, layer: int = 0) -> int:
        """Number of persisted K/V entries of ``layer``."""
        k = self.past_k[layer]
        return 0 if k is None else int(k.shape[-2])

    def _layer_types(self) -> list[str]:
        types = getattr(self.config, "layer_types", None)
        if types is None:
            kind = (
                "sliding_attention"
                if getattr(self.config, "sliding_window", None) is not None
                else "full_attention"
            )
            types = [kind] * len(self.layers)
        unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
        if unknown:
            raise LoopConfigError(
                f"layer types {unknown} are not supported by the reference: only "
                "full_attention and sliding_attention layers are"
            )
        return list(types)

    # -- building blocks ------------------------------------------------------

    def _masks(self, n: int, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
        q = torch.arange(self.n_past, self.n_past + n, device=device)[:, None]
        k = torch.arange(0, self.n_past + n, device=device)[None, :]
        allowed = {"full_attention": k <= q}
        if "sliding_attention" in self.layer_types:
            if self.sliding_window is None:
                raise LoopConfigError("sliding-window layers without config.sliding_window")
            allowed["sliding_attention"] = (k <= q) & (k > q - self.sliding_window)
        masks = {}
        for kind, ok in allowed.items():
            if self._bool_mask:
                masks[kind] = ok[None, None]
            else:
                zero = torch.zeros((), dtype=dtype, device=device)
                low = torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=device)
                masks[kind] = torch.where(ok, zero, low)[None, None]
        return masks

    def _rope(self, h: torch.Tensor, pos: torch.Tensor) -> dict[str, Any]:
        rope = self.base.rotary_emb
        if self._rope_per_type:
            return {t: rope(h, pos, t) for t in set(self.layer_types)}
        shared = rope(h, pos)
        return {t: shared for t in set(self.layer_types)}

    def _final(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.model.lm_head(self.base.norm(h))
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    @staticmethod
    def _integrate(
        x: torch.Tensor, g: Callable[[torch.Tensor], torch.Tensor], loop: LoopConfig
    ) -> torch.Tensor:
        """K steps of the loop's integrator on the map g."""
        h = loop.h
        for _ in range(loop.count):
            x0 = y = x
            for alpha in loop.stages:
                gy = g(y)
                e = gy if h == 1.0 else y + h * (gy - y)
                y = e if alpha == 0.0 else alpha * x0 + (1.0 - alpha) * e
            x = y
        return x

    # -- evaluation -----------------------------------------------------------

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Logits ``[n, vocab]`` of the next batch of the sequence (one llama.cpp ubatch)."""
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
            raise ValueError(
                f"input_ids must be one non-empty sequence of shape [1, n], got {tuple(ids.shape)}"
            )
        device = self.model.lm_head.weight.device
        ids = ids.to(device)
        n = int(ids.shape[1])
        loop = self.loop
        if loop is not None and loop.apply == "prefill" and n == 1:
            loop = None

        h = self.base.embed_tokens(ids)
        pos = torch.arange(self.n_past, self.n_past + n, device=device)[None]
        masks = self._masks(n, h.dtype, device)
        rope = self._rope(h, pos)
        stash = _Stash(self.past_k, self.past_v)

        def layer(i: int, x: torch.Tensor) -> torch.Tensor:
            kind = self.layer_types[i]
            out = self.layers[i](
                x,
                attention_mask=masks[kind],
                position_embeddings=rope[kind],
                position_ids=pos,
                cache=stash,
            )
            return out[0] if isinstance(out, tuple) else out

        if loop is None:
            for i in range(self.n_layer):
                h = layer(i, h)
        else:
            a, b = loop.start, loop.end
            for i in range(a):
                h = layer(i, h)
            routers = [r for r in self.routers[a:b] if r is not None]
            frozen = _frozen_routers(routers) if loop.routing == "frozen" else nullcontext()
            with frozen:
                if loop.mode == "block":

                    def block(x: torch.Tensor) -> torch.Tensor:
                        for i in range(a, b):
                            x = layer(i, x)
                        return x

                    h = self._integrate(h, block, loop)
                else:
                    for i in range(a, b):
                        h = self._integrate(h, lambda x, i=i: layer(i, x), loop)
            for i in range(b, self.n_layer):
                h = layer(i, h)

        logits = self._final(h)[0]
        keep = stash.last if loop is None or loop.kv == "last" else stash.first
        for i in range(self.n_layer):
            k, v = keep[i]
            pk, pv = self.past_k[i], self.past_v[i]
            self.past_k[i] = k if pk is None else torch.cat([pk, k], dim=-2)
            self.past_v[i] = v if pv is None else torch.cat([pv, v], dim=-2)
        self.n_past += n
        self.last_evals = dict(stash.evals)
        return logits.float()

    __call__ = forward

    def run(self, tokens: Sequence[int], n_ubatch: int, n_batch: int | None = None) -> torch.Tensor:
        """Logits ``[len(tokens), vocab]`` of a prompt evaluated as llama.cpp splits it.

        llama-cpp-python hands llama_decode ``n_batch`` tokens at a time and
        llama.cpp cuts each of those into consecutive ubatches of ``n_ubatch``
        tokens (single sequence). ``n_batch`` defaults to the whole prompt.
        """
        tokens = list(tokens)
        if n_ubatch < 1 or (n_batch is not None and n_batch < 1):
            raise ValueError("n_ubatch and n_batch must be at least 1")
        n_batch = n_batch or len(tokens)
        out = []
        for i in range(0, len(tokens), n_batch):
            chunk = tokens[i : i + n_batch]
            for j in range(0, len(chunk), n_ubatch):
                out.append(self.forward(chunk[j : j + n_ubatch]))
        return torch.cat(out, dim=0)

    def decode_greedy(
        self, prompt: Sequence[int], n_new: int, n_ubatch: int, n_batch: int | None = None
    ) -> tuple[list[int], torch.Tensor]:
        """Prefill ``prompt``, then generate ``n_new`` tokens greedily, one decode step each.

        Returns the generated tokens and the logits of every evaluated position,
        ``[len(prompt) + n_new, vocab]``: the prompt's rows, then one row per
        generated token after it was fed back.
        """
        rows = [self.run(prompt, n_ubatch, n_batch)]
        new: list[int] = []
        for _ in range(n_new):
            token = int(rows[-1][-1].argmax())
            new.append(token)
            rows.append(self.forward([token]))
        return new, torch.cat(rows, dim=0)


class _GgmlCpuGelu(nn.Module):
    """ggml's CPU tanh-GELU: the input rounded to fp16, a table of fp16 results."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xh = x.half().float()
        y = 0.5 * xh * (1.0 + torch.tanh(0.7978845608028654 * xh * (1.0 + 0.044715 * xh * xh)))
        y = y.half().to(x.dtype)
        y = torch.where(x <= -10.0, torch.zeros_like(x), y)
        return torch.where(x >= 10.0, x, y)


def emulate_ggml_cpu_gelu(model: nn.Module) -> int:
    """Swap every tanh-GELU activation for ggml's CPU version (fp16 lookup table).

    ggml's CPU backend evaluates GELU through an fp16 table, which alone puts
    gemma-family logits ~1e-3 away from transformers. With this the gap shrinks
    to occasional one-ulp fp16 flips. Returns the number of modules replaced.
    """
    from transformers.activations import GELUTanh

    count = 0
    for module in model.modules():
        for name, child in list(module.named_children()):
            if isinstance(child, GELUTanh):
                setattr(module, name, _GgmlCpuGelu())
                count += 1
    return count
