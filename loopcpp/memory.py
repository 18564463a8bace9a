"""What a loop costs in memory, estimated before llama.cpp is asked to build it.

The KV cache and the weights do not grow with the loop; what grows is the
compute graph. llama.cpp sizes everything graph-related by
``llama_context::graph_max_nodes``, which the patch scales by the layer
evaluations of one pass (``cpp_patch/0001``)::

    base      = max(1024, 8 * n_tensors)            # the stock budget (dense archs)
    max_nodes = base // n_layer * n_eval + 16 * n_eval
    n_eval    = n_layer - w + w * K * stages + refined  # stages: rk3 3, rk4 4, midpoint/heun 2,
                                                       # else 1; refined: w with kv=refined

and then allocates, per context (llama.cpp / ggml sources of the vendored tree):

* three graph-result buffers (``llm_graph_result``: the reserve graph and the two
  reusable ones of ``gf_res_prev``), each ``max_nodes * ggml_tensor_overhead() +
  ggml_graph_overhead_custom(max_nodes)``, zero-filled, so resident;
* the scheduler (``ggml_backend_sched_new``): a scratch context of
  ``max_nodes * GGML_SCHED_MAX_SPLIT_INPUTS * 2 * sizeof(ggml_tensor)`` bytes (about
  20 KB per node), four id arrays of ``61 * max_nodes`` ints and hash tables.
  These are malloc'ed whole but mostly untouched: address space, not resident
  memory. If that allocation fails, ggml does not check it and later aborts the
  process with ``GGML_ASSERT(ctx->mem_buffer != NULL)`` in ``ggml_init``;
* with ``kv = first``, the first evaluation's K and V (f32) of every window layer
  stay live in the compute buffer until the loop ends: ``w * n_ubatch *
  (n_embd_k_gqa + n_embd_v_gqa) * 4`` bytes on top of the stock compute buffer
  at most (it adds to the peak only when the loop is the peak).

Measured on SmolLM2-135M (30 layers, 272 tensors), window [0, 30), K=64, rk3:
208,505 graph nodes (max_nodes 460,800), reserve 6.5 s, virtual size +9.3 GiB,
RSS +0.27 GiB; the compute buffer stayed 98 MiB (the logits dominate it).
The estimate is for the dense and MoE architectures the patch loops (their
node budget is the default branch above); it ignores LoRA adapters and backend
samplers, which add nodes in stock llama.cpp too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loopcpp.config import LoopConfig, LoopConfigError
from loopcpp.gguf_io import GGUFModel

# ggml constants on 64-bit hosts (ggml.h / ggml.c / ggml-backend.cpp of the vendored tree)
TENSOR_SIZE = 336  # sizeof(struct ggml_tensor)
OBJECT_SIZE = 32  # sizeof(struct ggml_object)
TENSOR_OVERHEAD = OBJECT_SIZE + TENSOR_SIZE  # ggml_tensor_overhead()
SCHED_MAX_SPLIT_INPUTS = 30  # GGML_SCHED_MAX_SPLIT_INPUTS
GRAPH_RESULTS = 3  # gf_res_reserve + gf_res_prev[2] (llama-context.cpp)

GIB = 1 << 30


#: Graph nodes the patch budgets per layer evaluation beyond the layers' own
#: (``llama_loop::n_extra_nodes_per_eval``).
EXTRA_NODES_PER_EVAL = 16


def graph_max_nodes(model: GGUFModel, loop: LoopConfig | None) -> int:
    """llama.cpp's node budget of one graph (``llama_context::graph_max_nodes``)."""
    n_layer = model.n_layer
    res = max(1024, 8 * model.n_tensors)
    if loop is None:
        return res
    n_eval = loop.layer_evals(n_layer)
    # llama_loop::n_extra_nodes_per_eval: sub-steps, stage sums, norms, the anchor blend
    return res // n_layer * n_eval + EXTRA_NODES_PER_EVAL * n_eval


def _graph_overhead(n_nodes: int) -> int:
    """ggml_graph_overhead_custom(n_nodes, false): nodes, leafs, a hash set of 2*n_nodes."""
    hash_size = 2 * n_nodes + 1  # ggml_hash_size rounds up to a prime; close enough
    return OBJECT_SIZE + 64 + 16 * n_nodes + 12 * hash_size + hash_size // 8


@dataclass(frozen=True)
class LoopMemory:
    """Bytes a context's graph machinery takes with a given loop."""

    max_nodes: int
    resident: int  # touched memory: graph-result buffers, scheduler tables, kv=first stash
    reserved: int  # address space allocated in all (resident + untouched scheduler scratch)


def loop_memory(
    model: GGUFModel, loop: LoopConfig | None, n_ctx: int = 512, n_ubatch: int = 512
) -> LoopMemory:
    """The graph memory of a context of ``model`` with ``loop`` (None: the stock model).

    ``n_ubatch`` is clamped to ``n_ctx`` as llama.cpp does (``n_ctx <= 0``: no clamp).
    """
    nodes = graph_max_nodes(model, loop)
    results = GRAPH_RESULTS * (nodes * TENSOR_OVERHEAD + _graph_overhead(nodes))
    sched_tables = (2 * nodes + 1) * (8 + 4 + 8)  # hash keys, backend ids, tensor copies
    sched_ids = 4 * (nodes + nodes * SCHED_MAX_SPLIT_INPUTS * 2) * 4  # calloc'ed, lazily touched
    sched_scratch = nodes * SCHED_MAX_SPLIT_INPUTS * 2 * TENSOR_SIZE + _graph_overhead(nodes)
    stash = 0
    if loop is not None and loop.kv == "first":
        n_tokens = min(n_ubatch, n_ctx) if n_ctx > 0 else n_ubatch
        per_token = model.kv_bytes_per_token(4.0)  # f32 K and V of every layer
        per_layer = per_token / model.n_layer if per_token else 2 * 4 * _n_embd(model)
        stash = int(loop.width * n_tokens * per_layer)
    resident = results + sched_tables + stash
    return LoopMemory(nodes, resident, resident + sched_ids + sched_scratch)


def _n_embd(model: GGUFModel) -> int:
    n = model.arch_value("embedding_length", 4096)
    return n if isinstance(n, int) else 4096


def loop_memory_bytes(
    model: GGUFModel, loop: LoopConfig | None, n_ctx: int = 512, n_ubatch: int = 512
) -> int:
    """Address space the looped graph makes llama.cpp allocate (see :func:`loop_memory`)."""
    return loop_memory(model, loop, n_ctx, n_ubatch).reserved


# -- what the machine allows -----------------------------------------------------


@dataclass(frozen=True)
class MemoryLimits:
    """``available``: bytes that can become resident (MemAvailable + SwapFree);
    ``allocatable``: the largest allocation the OS grants (overcommit policy, RLIMIT_AS).
    None where unknown (no check)."""

    available: int | None
    allocatable: int | None


def _meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return out


def _vm_size() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def memory_limits() -> MemoryLimits:
    """What this process may still use, from /proc (Linux) or psutil, else unknown."""
    info = _meminfo()
    available: int | None = None
    allocatable: int | None = None
    if "MemAvailable" in info:
        available = info["MemAvailable"] + info.get("SwapFree", 0)
        try:
            policy = Path("/proc/sys/vm/overcommit_memory").read_text().strip()
        except OSError:
            policy = "0"
        if policy == "2":  # strict accounting
            allocatable = info.get("CommitLimit", 0) - info.get("Committed_AS", 0)
        elif policy == "0":  # heuristic: one allocation may not exceed RAM + swap
            allocatable = info.get("MemTotal", 0) + info.get("SwapTotal", 0)
    else:
        try:
            import psutil  # type: ignore[import-untyped]
        except ImportError:
            psutil = None
        if psutil is not None:
            vm = psutil.virtual_memory()
            available = int(vm.available)
            allocatable = int(vm.total) + int(psutil.swap_memory().total)
    try:
        import resource  # Unix only
    except ImportError:
        return MemoryLimits(available, allocatable)
    soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        room = max(0, soft - _vm_size())
        allocatable = room if allocatable is None else min(allocatable, room)
    return MemoryLimits(available, allocatable)


def check_loop_memory(
    model: GGUFModel,
    loop: LoopConfig | None,
    n_ctx: int = 512,
    n_ubatch: int = 512,
    limits: MemoryLimits | None = None,
) -> LoopMemory:
    """Raise LoopConfigError when the loop's graph would not fit this machine.

    Two checks: the resident part against the available memory, and the whole
    allocation against what the OS grants (a failed allocation aborts the
    process inside ggml, so it must be refused here).
    """
    need = loop_memory(model, loop, n_ctx, n_ubatch)
    if loop is None:
        return need
    lim = memory_limits() if limits is None else limits
    what = f"{model.path.name}: loop {loop.describe()}"
    fix = (
        "lower K or the window width"
        + (f" ({loop.method} costs {loop.evals_per_step}x euler)"
           if loop.evals_per_step > 1 else "")
        + (", or n_ubatch (kv=first keeps K/V of every window layer)" if loop.kv == "first" else "")
    )
    if lim.available is not None and need.resident > lim.available:
        raise LoopConfigError(
            f"{what} needs about {need.resident / GIB:.2f} GiB for its compute graph "
            f"({need.max_nodes:,} nodes), {lim.available / GIB:.2f} GiB available: {fix}"
        )
    if lim.allocatable is not None and need.reserved > lim.allocatable:
        raise LoopConfigError(
            f"{what} needs about {need.reserved / GIB:.2f} GiB of address space for its compute "
            f"graph ({need.max_nodes:,} nodes), {lim.allocatable / GIB:.2f} GiB can be "
            f"allocated: {fix}"
        )
    return need


def n_ctx_of(llama_kwargs: dict[str, object], model: GGUFModel) -> int:
    """The n_ctx llama.cpp will use for these ``llama_cpp.Llama`` keyword arguments."""
    n_ctx = llama_kwargs.get("n_ctx", 512)
    if isinstance(n_ctx, int) and n_ctx > 0:
        return n_ctx
    train = model.arch_value("context_length")
    return train if isinstance(train, int) and train > 0 else 0


def n_ubatch_of(llama_kwargs: dict[str, object]) -> int:
    """The n_ubatch llama-cpp-python passes for these keyword arguments (min of n_batch)."""
    n_batch = llama_kwargs.get("n_batch", 512)
    n_ubatch = llama_kwargs.get("n_ubatch", 512)
    values = [v for v in (n_batch, n_ubatch) if isinstance(v, int) and v > 0]
    return min(values) if values else 512


__all__ = [
    "LoopMemory",
    "MemoryLimits",
    "check_loop_memory",
    "graph_max_nodes",
    "loop_memory",
    "loop_memory_bytes",
    "memory_limits",
]
