"""PyTorch reference implementation of the loop semantics (docs/LOOPING.md, versions 1 and 2).

``LoopedReference`` wraps a Hugging Face transformers causal LM and runs the
model's own forward, with the decoder layers of the loop window intercepted:
each window layer's call is recorded (its arguments are whatever the model's
forward passes it: the per-layer attention mask of its attention type, the
position embeddings of the model's rotary module, the cache, ...), and at the
window's last layer the loop runs, calling each window layer again with its own
recorded arguments. Layers outside the window, the embeddings, the final norm,
the LM head and any logit soft-capping are the model's own code. So any
decoder whose layer list is ``model.model.layers`` (or ``get_decoder().layers``)
loops without a per-family list.

The cache handed to the model is a stash (``_Stash``, a transformers ``Cache``):
it returns the persisted past K/V of a layer followed by the current
evaluation's K/V and persists nothing; after the ubatch exactly one entry per
token per layer persists, chosen by ``kv``. Masks are sized by it (all layers
see the whole past; sliding and chunked layers are masked by the model's own
mask functions). Frozen MoE routing replays, within one ubatch's loop, each
window router's first output.

This is the only module of the package that imports torch and transformers.

Numerics: docs/LOOPING.md "Version 2: where the contract is silent" (D1-D9),
implemented here from that text: every scalar is a float32 value (computed in
float32 arithmetic where the contract says so) multiplying a tensor as one op;
the damped update is ``E(y) = y + h*(G(y) - y)``, and ``G(y)`` itself when
``h == 1``; the version-1 methods keep their Shu-Osher operation sequence, the
explicit Runge-Kutta methods run from their Butcher tableaus (``BUTCHER``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
import torch
from torch import nn

from loopcpp.config import EVALS_PER_STEP, STAGES, LoopConfig, LoopConfigError

#: Attention layer types (``config.layer_types``) the stash serves: the masks are the
#: model's own.
ATTENTION_TYPES = ("full_attention", "sliding_attention", "chunked_attention")
#: Recurrent layer types (linear attention, state-space, short convolution): they keep
#: conv / recurrent states through the transformers cache API (``get_conv_state``,
#: ``update_conv_state``, ``get_recurrent_state``, ``update_recurrent_state``), which the
#: stash serves with the recurrent state stash (LOOPING.md).
RECURRENT_TYPES = ("linear_attention", "conv", "mamba", "mamba2", "ssm")
#: Other layer types of hybrid models: ``attention`` (an attention layer's name in some
#: hybrids), ``hybrid`` (attention and a Mamba mixer side by side, Falcon-H1), ``mlp`` and
#: ``moe`` (feed-forward-only layers, Nemotron-H). Whatever they keep is one of the above.
OTHER_TYPES = ("attention", "hybrid", "mlp", "moe")

#: Butcher tableaus of the explicit Runge-Kutta methods of version 2 (D2): ``a`` is
#: strictly lower triangular (row i lists a_i1 .. a_i,i-1), ``b`` the weights. The
#: methods themselves and their stage counts are config's (EVALS_PER_STEP); the
#: version-1 methods (config.STAGES) keep their Shu-Osher form.
BUTCHER: dict[str, tuple[tuple[tuple[float, ...], ...], tuple[float, ...]]] = {
    "midpoint": (((), (0.5,)), (0.0, 1.0)),
    "heun": (((), (1.0,)), (0.5, 0.5)),
    "rk4": (((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)), (1 / 6, 1 / 3, 1 / 3, 1 / 6)),
}
for _m, (_a, _b) in BUTCHER.items():
    assert len(_a) == len(_b) == EVALS_PER_STEP[_m], _m

#: Rescaling clamps the norm below at this (D5), as float32.
NORM_EPS = float(np.float32(1e-6))


def _f32(value: float) -> float:
    """``value`` rounded once to float32 (exactly representable as a Python float)."""
    return float(np.float32(value))


def _f32_one_minus(value: float) -> float:
    """``1 - f32(value)`` computed in float32."""
    return float(np.float32(1.0) - np.float32(value))


def _norm(y: torch.Tensor) -> torch.Tensor:
    """Per-token L2 norm over the hidden dimension (keepdim)."""
    return torch.linalg.vector_norm(y, dim=-1, keepdim=True)


def _rescale(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``y * (target / max(|y|, 1e-6))``: the per-token factor first, then one multiply."""
    return y * (target / torch.clamp(_norm(y), min=NORM_EPS))


def find_router(layer: nn.Module) -> nn.Module | None:
    """The MoE router of a decoder layer: the ``gate`` / ``router`` of a module with ``experts``.

    This covers the transformers MoE blocks (Qwen-MoE, OLMoE, DeepSeek, Mixtral,
    Llama 4, GPT-OSS, Gemma 4, ...). Whatever the router returns (logits, or ids and final
    gate weights) determines the experts and their weights; frozen routing
    replays it. Shared experts are not part of it and always run. None: dense.
    """
    for module in layer.modules():
        # the MoE block, or the layer itself where the router and experts are its own (Gemma 4)
        if not isinstance(getattr(module, "experts", None), nn.Module):
            continue
        for name in ("gate", "router"):
            router = getattr(module, name, None)
            if isinstance(router, nn.Module):
                return router
    return None


def decoder_layers(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """``(base model, decoder layer list)`` of a causal LM, else LoopConfigError.

    The list is the base model's ``layers`` (``blocks`` for DBRX).
    """
    base = getattr(model, "model", None)
    if not isinstance(getattr(base, "layers", None), nn.ModuleList):
        get = getattr(model, "get_decoder", None)
        base = get() if callable(get) else None
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        layers = getattr(base, "blocks", None)  # DBRX: model.transformer.blocks
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise LoopConfigError(
            f"the reference cannot loop {type(model).__name__}: it needs a Hugging Face "
            "transformers causal LM whose decoder layers are model.model.layers (load it "
            "with AutoModelForCausalLM)"
        )
    return base, layers


#: A layer's recurrent states: (kind, state_idx) -> tensor, kind "conv" or "recurrent".
RecurrentState = dict[tuple[str, int], torch.Tensor]


class _Stash:
    """What the cache does during one ubatch: past + current K/V, nothing persisted.

    ``update`` returns the persisted past K/V of the layer followed by the K/V
    that this evaluation computed for the ubatch's tokens, and remembers the
    first and the latest evaluation's K/V of each layer.

    For DeepSeek's multi-head latent attention the pair is what transformers
    (and llama.cpp) cache for MLA: the normalised compressed latent and the
    roped shared key part; the policy is the same.

    Recurrent layers (the recurrent state stash): every evaluation of a layer
    reads that layer's states as they were before the ubatch (a fresh copy each
    time, so an in-place update by one evaluation never reaches another), and
    the states each evaluation leaves are recorded per evaluation; after the
    ubatch the caller keeps one evaluation's (``rs_kept``: the first or the last).
    ``begin(layer)`` starts a new evaluation of a layer (the loop calls it);
    a layer never begun has the one evaluation of the model's own call.
    """

    def __init__(self, past_k: list[torch.Tensor | None], past_v: list[torch.Tensor | None],
                 n_past: int, past_rs: list[RecurrentState | None] | None = None):
        self.past_k = past_k
        self.past_v = past_v
        self.n_past = n_past
        self.first: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.last: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.evals: dict[int, int] = {}
        self.past_rs = past_rs if past_rs is not None else [None] * len(past_k)
        self.rs_evals: dict[int, list[RecurrentState]] = {}
        self.conv_kernel: dict[tuple[int, int], int] = {}

    # -- recurrent states -------------------------------------------------------

    def begin(self, layer_idx: int) -> None:
        """A new evaluation of ``layer_idx`` starts (its states start from the past again)."""
        self.rs_evals.setdefault(layer_idx, []).append({})

    def _current(self, layer_idx: int) -> RecurrentState:
        evals = self.rs_evals.setdefault(layer_idx, [])
        if not evals:
            evals.append({})
        return evals[-1]

    def _past(self, layer_idx: int, key: tuple[str, int]) -> torch.Tensor | None:
        past = self.past_rs[layer_idx]
        return None if past is None or key not in past else past[key]

    def get_state(self, kind: str, layer_idx: int, state_idx: int) -> torch.Tensor | None:
        """The state before the ubatch (a copy this evaluation may change in place), or None."""
        key = (kind, state_idx)
        past = self._past(layer_idx, key)
        if past is None:
            return None
        state = past.clone()
        self._current(layer_idx)[key] = state
        return state

    def update_conv(self, conv: torch.Tensor, layer_idx: int, state_idx: int,
                    conv_kernel_size: int | None) -> torch.Tensor:
        """transformers' LinearAttentionLayer.update_conv_state, from the pre-ubatch state."""
        key = ("conv", state_idx)
        k = self.conv_kernel.get((layer_idx, state_idx))
        if k is None:
            past = self._past(layer_idx, key)
            k = conv_kernel_size or (past.shape[-1] if past is not None else conv.shape[-1])
            self.conv_kernel[(layer_idx, state_idx)] = k
        past = self._past(layer_idx, key)
        if past is None:
            full = conv
            if full.shape[-1] < k:
                full = torch.nn.functional.pad(full, (k - full.shape[-1], 0), value=0)
        else:
            full = torch.cat([past, conv], dim=-1)
        self._current(layer_idx)[key] = full[..., -k:].clone()
        return full

    def update_recurrent(self, state: torch.Tensor, layer_idx: int, state_idx: int) -> torch.Tensor:
        self._current(layer_idx)[("recurrent", state_idx)] = state
        return state

    def rs_kept(self, which: str) -> dict[int, RecurrentState]:
        """Each recurrent layer's states after the ubatch: its first or its last evaluation's."""
        out = {}
        for i, evals in self.rs_evals.items():
            evals = [e for e in evals if e]
            if evals:
                out[i] = evals[0] if which == "first" else evals[-1]
        return out

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


def _stash_cache(stash: _Stash) -> Any:
    """The stash as a transformers ``Cache``: every layer sees the whole past (n_past)."""
    from transformers.cache_utils import Cache, DynamicLayer

    class StashCache(Cache):
        def __init__(self) -> None:
            super().__init__(layers=[DynamicLayer() for _ in stash.past_k])

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
                   *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            return stash.update(key_states, value_states, layer_idx)

        def get_seq_length(self, layer_idx: int = 0) -> int:
            return stash.n_past

        def get_query_offset(self, layer_idx: int = 0) -> int:
            return stash.n_past

        def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
            return stash.n_past + query_length, 0

        # the recurrent state stash (transformers' linear-attention cache API)
        def get_conv_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor | None:
            return stash.get_state("conv", layer_idx, state_idx)

        def get_recurrent_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor | None:
            return stash.get_state("recurrent", layer_idx, state_idx)

        def update_conv_state(self, conv_states: torch.Tensor, layer_idx: int, state_idx: int = 0,
                              conv_kernel_size: int | None = None, **kwargs: Any) -> torch.Tensor:
            return stash.update_conv(conv_states, layer_idx, state_idx, conv_kernel_size)

        def update_recurrent_state(self, recurrent_states: torch.Tensor, layer_idx: int,
                                   state_idx: int = 0, **kwargs: Any) -> torch.Tensor:
            return stash.update_recurrent(recurrent_states, layer_idx, state_idx)

        def is_recording_past(self, layer_idx: int) -> bool:
            return False

    return StashCache()


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


def integrate(x0: torch.Tensor, g: Callable[[torch.Tensor], torch.Tensor],
              loop: LoopConfig) -> torch.Tensor:
    """The loop's integrator on the map ``g`` from ``x0``: steps, norms, anchor (D1-D5).

    ``g`` is the window (block mode) or one layer (layer mode); ``uniform`` is
    not a method on a map (see ``LoopedReference``) and is refused here.
    """
    K = loop.count
    method = loop.method
    h = _f32(loop.h)  # D1: the given step, else 1/K; naive 1 (config's rule)
    nat: list[torch.Tensor] = []

    def G(y: torch.Tensor) -> torch.Tensor:
        out = g(y)
        if not nat:
            nat.append(out)  # the natural pass: the first evaluation, always at x0
        return out

    def E(y: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
        return gy if h == 1.0 else y + h * (gy - y)

    n0 = _norm(x0) if loop.norm == "interp" or method == "norm_stab" else None

    if method in STAGES:  # naive, euler, rk3: the version-1 operation sequence
        x = x0
        for k in range(1, K + 1):
            xin = y = x
            for alpha in STAGES[method]:
                e = E(y, G(y))
                y = e if alpha == 0.0 else _f32(alpha) * xin + _f32(1.0 - alpha) * e
            x = y
            if loop.norm == "interp" and k < K:
                n1 = _norm(nat[0])
                r = float(np.float32(k) / np.float32(K))
                x = _rescale(x, n0 + (n1 - n0) * r)
    elif method in BUTCHER:
        a, b = BUTCHER[method]
        c = [[_f32(np.float32(h) * np.float32(v)) for v in row] for row in a]
        d = [_f32(np.float32(h) * np.float32(v)) for v in b]
        x = x0
        for _ in range(K):
            ks: list[torch.Tensor] = []
            for i in range(len(b)):
                z = x
                for j, cij in enumerate(c[i]):
                    if a[i][j] != 0.0:
                        z = z + cij * ks[j]
                ks.append(G(z) - z)
            new = x
            for i, di in enumerate(d):
                if b[i] != 0.0:
                    new = new + di * ks[i]
            x = new
    elif method == "residual":
        y = x0
        for _ in range(K):
            y = G(y)
        x = E(x0, y)
    elif method == "input_anchor":
        s, rest = _f32(h), _f32_one_minus(h)
        x = x0
        for _ in range(K):
            x = s * G(x) + rest * x0
    elif method == "heavy_ball":
        mu = _f32(loop.momentum)
        prev, x = x0, E(x0, G(x0))
        for _ in range(2, K + 1):
            prev, x = x, E(x, G(x)) + mu * (x - prev)
    elif method == "norm_stab":
        x = x0
        for _ in range(K):
            x = _rescale(E(x, G(x)), n0)
    else:
        raise LoopConfigError(f"method {method} is not an integrator on one map")
    return anchor(x, nat[0], loop)


def anchor(x: torch.Tensor, nat: torch.Tensor, loop: LoopConfig) -> torch.Tensor:
    """The anchor blend ``f32(beta)*nat + f32(1-beta)*x`` (none at beta 0), then anchor_norm."""
    if loop.anchor > 0:
        x = _f32(loop.anchor) * nat + _f32_one_minus(loop.anchor) * x
    if loop.anchor_norm:
        x = _rescale(x, _norm(nat))
    return x


class LoopedReference:
    """A causal LM with a loop, evaluated ubatch by ubatch on one sequence.

    ``loop=None`` runs the stock model. ``forward`` continues the cached
    sequence; ``reset`` forgets it. ``n_dec`` is the sequence's count of
    single-token ubatches since its last prompt ubatch (None: unset), which
    ``apply = first`` reads (LOOPING.md D7).
    """

    def __init__(self, model: nn.Module, loop: LoopConfig | None = None):
        self.base, self.layers = decoder_layers(model)
        self.model = model.eval()
        self.config = model.config
        self.arch = type(model).__name__
        if getattr(self.config, "use_bidirectional_attention", False) or not getattr(
            self.config, "is_causal", True
        ):
            raise LoopConfigError(
                "bidirectional attention is not a causal LM: use a causal checkpoint"
            )
        self.n_layer = int(getattr(self.config, "num_hidden_layers", None) or len(self.layers))
        types = getattr(self.config, "layer_types", None)
        self.layer_types = list(types) if types is not None else None
        known = set(ATTENTION_TYPES) | set(RECURRENT_TYPES) | set(OTHER_TYPES)
        unknown = sorted(set(self.layer_types or ()) - known)
        if unknown:
            raise LoopConfigError(
                f"layer types {unknown} are not supported by the reference: it keeps K/V for "
                f"attention layers ({', '.join(ATTENTION_TYPES)}) and recurrent states for "
                f"{', '.join(RECURRENT_TYPES)}"
            )
        self.routers: list[nn.Module | None] = [
            find_router(self.layers[i]) for i in range(self.n_layer)
        ]
        self.loop: LoopConfig | None = None
        self._stash: _Stash | None = None
        self.set_loop(loop)
        self.reset()

    # -- state ----------------------------------------------------------------

    def set_loop(self, loop: LoopConfig | None) -> None:
        """Change the loop (keeps the cache and the decode count, like the run-time C API)."""
        if loop is not None:
            loop.check(self.n_layer)
        self.loop = loop

    def reset(self) -> None:
        """Forget the cached sequence (like llama_memory_clear): cache empty, count unset."""
        self.past_k: list[torch.Tensor | None] = [None] * self.n_layer
        self.past_v: list[torch.Tensor | None] = [None] * self.n_layer
        # recurrent layers' states after the last ubatch (the recurrent state stash)
        self.past_rs: list[RecurrentState | None] = [None] * self.n_layer
        self.n_past = 0
        self.last_evals: dict[int, int] = {}
        self.forget()

    def forget(self) -> None:
        """Make the decode count unset (D7: seq_rm of all cells, clear, a state load)."""
        self.n_dec: int | None = None

    def truncate(self, n_keep: int) -> None:
        """Keep the first ``n_keep`` cached positions (seq_rm of a tail); the count is unchanged."""
        if not 0 <= n_keep <= self.n_past:
            raise ValueError(f"n_keep must be in [0, {self.n_past}], got {n_keep}")
        if n_keep < self.n_past and any(rs is not None for rs in self.past_rs):
            raise ValueError("a recurrent state cannot be truncated (no per-token entries)")
        self.past_k = [None if k is None else k[..., :n_keep, :] for k in self.past_k]
        self.past_v = [None if v is None else v[..., :n_keep, :] for v in self.past_v]
        self.n_past = n_keep

    def copy_from(self, other: LoopedReference) -> LoopedReference:
        """Take ``other``'s cache and decode count (seq_cp of a whole sequence); returns self."""
        self.past_k, self.past_v = list(other.past_k), list(other.past_v)
        self.past_rs = list(other.past_rs)
        self.n_past, self.n_dec = other.n_past, other.n_dec
        return self

    def kv_length(self, layer: int = 0) -> int:
        """Number of persisted K/V entries of ``layer``."""
        k = self.past_k[layer]
        return 0 if k is None else int(k.shape[-2])

    def loops(self, n_tokens: int) -> bool:
        """Whether the next ubatch of ``n_tokens`` tokens loops (the ``apply`` policy, D7)."""
        loop = self.loop
        if loop is None:
            return False
        if loop.apply == "all" or n_tokens > 1:
            return True
        if loop.apply == "first":
            return self.n_dec is not None and self.n_dec < loop.apply_n
        return False

    # -- the window -----------------------------------------------------------

    def _window(self, loop: LoopConfig, x0: torch.Tensor,
                layer: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The looped window from its input ``x0``: the state layer ``end`` receives."""
        a, b = loop.start, loop.end
        routers = [r for r in self.routers[a:b] if r is not None]
        frozen = _frozen_routers(routers) if loop.routing == "frozen" else nullcontext()
        with frozen:
            if loop.method == "uniform":
                x = self._uniform(loop, x0, layer)
            elif loop.mode == "block":

                def block(y: torch.Tensor) -> torch.Tensor:
                    for i in range(a, b):
                        y = layer(i, y)
                    return y

                x = integrate(x0, block, loop)
            else:
                x = x0
                for i in range(a, b):
                    x = integrate(x, lambda y, i=i: layer(i, y), loop)
            if loop.kv == "refined":  # D6: one more pass, only its K/V are kept
                y = x
                for i in range(a, b):
                    y = layer(i, y)
        return x

    @staticmethod
    def _uniform(loop: LoopConfig, x0: torch.Tensor,
                 layer: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``uniform`` (block mode): layer j hands on the running mean of its outputs."""
        sums: dict[int, torch.Tensor] = {}
        nat = x = x0
        for k in range(1, loop.count + 1):
            inv = float(np.float32(1.0) / np.float32(k))
            y = x0
            for i in range(loop.start, loop.end):
                o = layer(i, y)
                sums[i] = o if k == 1 else sums[i] + o
                y = sums[i] * inv
            if k == 1:
                nat = y
            x = y
        return anchor(x, nat, loop)

    @contextmanager
    def _intercepted(self, loop: LoopConfig) -> Iterator[None]:
        """Window layers record their calls; the last one runs the loop with them.

        The model's own calls of window layers a..b-2 hand their input on
        unchanged, and that of layer b-1 returns the looped window's output;
        the loop's evaluations go through each layer's ``__call__`` again
        (forward hooks fire for each of them, and for the model's own call).
        """
        a, b = loop.start, loop.end
        originals = {i: self.layers[i].forward for i in range(a, b)}
        calls: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = {}
        inputs: list[torch.Tensor] = []
        looping = [False]
        # whether a layer's forward returned a tuple (its first item the hidden states, e.g.
        # Falcon-H1's), which the model's own loop unpacks: the window's output is handed
        # back in the same form (learnt from the loop's own evaluations of the last layer)
        tuple_out: dict[int, bool] = {}
        # K/V sharing (Gemma 3n, Gemma 4): a layer without K/V of its own reads those a producer
        # layer left in the model's ``shared_kv_states``; the entries each window layer's first
        # evaluation left, which kv = first keeps after the window (LOOPING.md, shared K/V)
        evaluated: set[int] = set()
        first_shared: dict[Any, Any] = {}

        def layer(i: int, x: torch.Tensor) -> torch.Tensor:
            # through the module's __call__, so that its hooks see every evaluation
            args, kwargs = calls[i]
            if self._stash is not None:
                self._stash.begin(i)  # its recurrent states start from the ubatch's past again
            shared = kwargs.get("shared_kv_states") if i not in evaluated else None
            before = dict(shared.items()) if shared is not None else {}
            out = self.layers[i](x, *args, **kwargs)
            if shared is not None:  # the first evaluation: keep the entries it left
                first_shared.update({k: v for k, v in shared.items() if before.get(k) is not v})
            evaluated.add(i)
            tuple_out[i] = isinstance(out, tuple)
            return out[0] if tuple_out[i] else out

        def make(i: int) -> Callable[..., Any]:
            def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
                if looping[0]:  # an evaluation inside the loop
                    return originals[i](hidden_states, *args, **kwargs)
                calls[i] = (args, kwargs)
                if i == a:
                    inputs.append(hidden_states)
                if i < b - 1:
                    # the state waits for the window's last layer (which ignores its input)
                    return hidden_states
                looping[0] = True
                try:
                    x = self._window(loop, inputs[-1], layer)
                finally:
                    looping[0] = False
                shared = kwargs.get("shared_kv_states")
                if shared is not None and loop.kv == "first":
                    shared.update(first_shared)  # the layers after the window read the kept K/V
                return (x,) if tuple_out.get(i, False) else x

            return forward

        try:
            for i in range(a, b):
                self.layers[i].forward = make(i)  # type: ignore[method-assign]
            yield
        finally:
            for i in range(a, b):
                del self.layers[i].forward  # restores the class's forward

    # -- evaluation -----------------------------------------------------------

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Logits ``[n, vocab]`` of the next ubatch of the sequence (one llama.cpp ubatch)."""
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
            raise ValueError(
                f"input_ids must be one non-empty sequence of shape [1, n], got {tuple(ids.shape)}"
            )
        device = next(self.model.parameters()).device
        ids = ids.to(device)
        n = int(ids.shape[1])
        loop = self.loop if self.loops(n) else None

        stash = _Stash(self.past_k, self.past_v, self.n_past, self.past_rs)
        pos = torch.arange(self.n_past, self.n_past + n, device=device)[None]
        self._stash = stash
        try:
            with self._intercepted(loop) if loop is not None else nullcontext():
                out = self.model(input_ids=ids, position_ids=pos, cache=_stash_cache(stash),
                                 use_cache=True)
        finally:
            self._stash = None
        logits = out.logits[0]

        first = loop is not None and loop.kv == "first"
        keep = stash.first if first else stash.last
        for i, rs in stash.rs_kept("first" if first else "last").items():
            self.past_rs[i] = rs
        for i in range(self.n_layer):
            if i not in keep:
                continue  # a layer without K/V (recurrent only)
            k, v = keep[i]
            pk, pv = self.past_k[i], self.past_v[i]
            self.past_k[i] = k if pk is None else torch.cat([pk, k], dim=-2)
            self.past_v[i] = v if pv is None else torch.cat([pv, v], dim=-2)
        self.n_past += n
        self.last_evals = dict(stash.evals)
        if n > 1:
            self.n_dec = 0
        elif self.n_dec is not None:
            self.n_dec += 1
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
