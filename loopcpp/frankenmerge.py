"""Self-merges ("frankenmerges"): a stock GGUF whose window layers are stored K times.

This is what mergekit's passthrough self-merges do: the layers ``[start, end)``
are physically repeated ``count`` times, giving a model of
``n_layer + (count - 1) * (end - start)`` layers that any stock llama.cpp runs.
It computes the ``naive`` loop (plain reapplication) with one big difference
from a looped GGUF: every copy has its own KV cache entries, so the cache and
the weights grow with K.  ``count = 1`` reproduces the input model exactly.

What is rewritten:

* tensors ``blk.{i}.*`` are renumbered (tensor bytes are copied unchanged);
* ``<arch>.block_count`` is the new layer count;
* per-layer array metadata (arrays under ``<arch>.`` as long as the stack, e.g.
  head counts, feed-forward lengths, sliding-window patterns) is expanded
  with the layers;
* a sliding-window pattern that llama.cpp derives from a period (the
  ``<arch>.attention.sliding_window_pattern`` scalar or the architecture's
  built-in default) is written out as an explicit per-layer array so the
  copies keep their attention type;
* ``<arch>.leading_dense_block_count`` grows when the window lies in the dense
  lead; windows that would break other layer-indexed settings (periodic MoE or
  attention interleaving, multi-token-prediction layers) are refused;
* ``loop.*`` keys are dropped: the result has stock semantics.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import gguf

from loopcpp.config import GGUF_KEYS, MAX_COUNT, LoopConfigError
from loopcpp.gguf_io import (
    KV,
    GGUFModel,
    ModelFileError,
    TensorOut,
    check_output,
    field_kv,
    read_model,
    rewrite_metadata,
    write_gguf,
)

#: llama.cpp's LLAMA_MAX_LAYERS.
MAX_LAYERS = 512
_BLK = re.compile(r"^blk\.(\d+)\.(.+)$")

#: Architectures whose loader derives a sliding-window pattern from a period
#: (``load_swa_pattern(ml, period, dense_first)`` in llama.cpp's src/models).
SWA_DEFAULTS: dict[str, tuple[int, bool]] = {
    "afmoe": (4, False),
    "cohere2": (4, False),
    "cohere2moe": (4, True),
    "exaone-moe": (4, False),
    "gemma-embedding": (6, False),
    "gemma2": (2, False),
    "gemma3": (6, False),
    "gemma3n": (5, False),
    "laguna": (4, True),
    "llama4": (4, False),
    "mellum": (4, False),
    "modern-bert": (3, True),
    "muse-glimmer": (4, False),
    "olmo2": (4, False),
    "gpt-oss": (2, False),
    "plamo3": (8, False),
    "smallthinker": (4, True),
}
#: Scalar settings that make layer behaviour periodic in the layer index: the
#: window width must be a multiple of the period to keep every layer's role.
PERIOD_KEYS = (
    "full_attention_interval",
    "moe_every_n_layers",
    "interleave_moe_layer_step",
    "rescale_every_n_layers",
)
#: Architectures with a period built into llama.cpp's code (not in metadata).
BUILTIN_PERIODS = {"llama4": 4}
#: Layer-indexed settings frankenmerge cannot renumber.
UNSUPPORTED_KEYS = (
    "attention.shared_kv_layers",
    "decoder_block_count",
    "hash_layer_count",
    "num_loops",
)
#: Architectures whose loader depends on the exact layer count.
UNSUPPORTED_ARCHS = ("exaone4",)


@dataclass(frozen=True)
class MergePlan:
    """Which source layer each output layer copies."""

    n_layer: int
    start: int
    end: int
    count: int

    @property
    def layer_map(self) -> list[int]:
        window = list(range(self.start, self.end))
        return list(range(self.start)) + window * self.count + list(range(self.end, self.n_layer))

    @property
    def n_layer_out(self) -> int:
        return self.n_layer + (self.count - 1) * (self.end - self.start)


def _swa_pattern(model: GGUFModel) -> list[bool] | None:
    """The per-layer SWA flags llama.cpp would derive from a period, or None."""
    key = f"{model.architecture}.attention.sliding_window_pattern"
    value = model.value(key)
    if isinstance(value, list):
        return None  # already per layer: expanded like every per-layer array
    period, dense_first = SWA_DEFAULTS.get(model.architecture, (None, False))
    if isinstance(value, int) and not isinstance(value, bool):
        period = value
    if period is None:
        return None
    if dense_first:
        return [period == 0 or il % period != 0 for il in range(model.n_layer)]
    return [period == 0 or il % period < period - 1 for il in range(model.n_layer)]


def _check_supported(model: GGUFModel, plan: MergePlan) -> dict[str, KV]:
    """Refuse unsupported windows; return the extra metadata changes they need."""
    arch, width = model.architecture, plan.end - plan.start
    changes: dict[str, KV] = {}
    if arch in UNSUPPORTED_ARCHS:
        raise LoopConfigError(
            f"frankenmerge does not support {arch}: llama.cpp configures it from its exact "
            "layer count; use a looped GGUF (`loopcpp convert`) instead"
        )
    for suffix in UNSUPPORTED_KEYS:
        if model.arch_value(suffix) is not None:
            raise LoopConfigError(
                f"frankenmerge cannot renumber layers of this model: it sets {arch}.{suffix}; "
                "use a looped GGUF (`loopcpp convert`) instead"
            )
    periods = {f"{arch}.{s}": model.arch_value(s) for s in PERIOD_KEYS}
    if arch in BUILTIN_PERIODS:
        periods[f"{arch} (built-in layer pattern)"] = BUILTIN_PERIODS[arch]
    for key, period in periods.items():
        if isinstance(period, int) and period > 1 and width % period != 0:
            raise LoopConfigError(
                f"window [{plan.start}, {plan.end}) has width {width}, but {key} = {period} "
                f"makes layer roles repeat every {period} layers: use a width that is a "
                f"multiple of {period}"
            )
    nextn = model.arch_value("nextn_predict_layers")
    if isinstance(nextn, int) and nextn > 0 and plan.end > plan.n_layer - nextn:
        raise LoopConfigError(
            f"window [{plan.start}, {plan.end}) includes the last {nextn} multi-token "
            f"prediction layers: end the window at {plan.n_layer - nextn} or earlier"
        )
    lead_key = f"{arch}.leading_dense_block_count"
    lead = model.value(lead_key)
    if isinstance(lead, int) and not isinstance(lead, bool) and lead > plan.start:
        if plan.end > lead:
            raise LoopConfigError(
                f"window [{plan.start}, {plan.end}) straddles the {lead} leading dense layers "
                f"and the MoE layers: keep it inside [0, {lead}) or [{lead}, {plan.n_layer})"
            )
        f = model.file.fields[lead_key]
        changes[lead_key] = KV(lead + (plan.count - 1) * width, f.vtype)
    return changes


def frankenmerge(
    src_gguf: str | os.PathLike[str],
    out_gguf: str | os.PathLike[str],
    start: int,
    end: int,
    count: int,
    force: bool = False,
) -> MergePlan:
    """Write a stock GGUF with layers ``[start, end)`` stored ``count`` times."""
    model = read_model(src_gguf)
    n = model.n_layer
    for name, v in (("start", start), ("end", end), ("count", count)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise LoopConfigError(f"frankenmerge {name} must be an integer, got {v!r}")
    if not 0 <= start < end <= n:
        raise LoopConfigError(
            f"window [{start}, {end}) is out of range for a model with {n} layers: use "
            f"0 <= start < end <= {n}"
        )
    if not 1 <= count <= MAX_COUNT:
        raise LoopConfigError(f"count {count} is out of range: use 1..{MAX_COUNT}")
    plan = MergePlan(n, start, end, count)
    if plan.n_layer_out > MAX_LAYERS:
        raise LoopConfigError(
            f"the merge would have {plan.n_layer_out} layers, more than llama.cpp's "
            f"{MAX_LAYERS}: use a smaller window or count"
        )
    out = check_output(src_gguf, out_gguf, force)
    changes = _check_supported(model, plan)
    layer_map = plan.layer_map
    arch = model.architecture

    block_key = f"{arch}.block_count"
    changes[block_key] = KV(plan.n_layer_out, model.file.fields[block_key].vtype)
    for name, f in model.file.fields.items():
        if not name.startswith(f"{arch}.") or f.vtype != gguf.GGUFValueType.ARRAY:
            continue
        kv = field_kv(f)
        if isinstance(kv.value, list) and len(kv.value) == n:
            changes[name] = KV([kv.value[i] for i in layer_map], kv.vtype, kv.sub_type)
    swa = _swa_pattern(model)
    if swa is not None:
        changes[f"{arch}.attention.sliding_window_pattern"] = KV(
            [swa[i] for i in layer_map], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.BOOL
        )

    # Source order is kept (count = 1 reproduces the file byte for byte); the
    # copies of a window tensor follow it.
    copies: dict[int, list[int]] = {}
    for new_il, src_il in enumerate(layer_map):
        copies.setdefault(src_il, []).append(new_il)
    tensors: list[TensorOut] = []
    for t in model.file.tensors:
        m = _BLK.match(t.name)
        if m is None:
            tensors.append(TensorOut(t.name, t))
            continue
        il = int(m.group(1))
        if il >= n:
            raise ModelFileError(
                f"{model.path}: tensor {t.name} belongs to layer {il} but the model has {n} "
                "layers: the file is inconsistent; convert it again"
            )
        tensors += [TensorOut(f"blk.{j}.{m.group(2)}", t) for j in copies[il]]

    kvs = rewrite_metadata(model.file, changes, drop=GGUF_KEYS.values())
    write_gguf(model.file, out, kvs, tensors)
    return plan


def describe(plan: MergePlan, out: str | os.PathLike[str]) -> str:
    return (
        f"wrote {Path(out)}: layers [{plan.start}, {plan.end}) stored {plan.count} times, "
        f"{plan.n_layer} -> {plan.n_layer_out} layers (stock semantics, no loop metadata)"
    )
