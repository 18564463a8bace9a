"""The Python API: ``loopcpp.load(...)`` returns a llama_cpp.Llama that loops.

>>> import loopcpp
>>> llm = loopcpp.load("smollm2-135m-instruct", loop=loopcpp.LoopConfig(13, 17, count=3))
>>> llm.loop
LoopConfig(start=13, end=17, count=3, ...)
>>> llm.set_loop(llm.loop.with_(count=2))   # no reload
>>> llm.create_chat_completion(messages=[...])  # everything llama-cpp-python does
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
from collections.abc import Iterator
from typing import Any

from loopcpp import engine
from loopcpp.config import FIELDS, GGUF_KEYS, LoopConfig, LoopConfigError
from loopcpp.gguf_io import GGUFModel, ModelFileError, _check_loop_types, read_model
from loopcpp.memory import check_loop_memory, n_ctx_of, n_ubatch_of
from loopcpp.memory import loop_memory_bytes as loop_memory_bytes  # re-exported
from loopcpp.models import resolve_model
from loopcpp.resolve import as_loop

#: ``loop=`` value meaning "run the stock model even if the file has a loop".
OFF = False


def _llama_class() -> type:
    engine.lib()  # raises PatchedLibraryMissing with the fix
    from llama_cpp import Llama

    return Llama


@contextlib.contextmanager
def llama_errors() -> Iterator[list[str]]:
    """Collect llama.cpp's warning and error log lines (still passed to its usual logger).

    llama-cpp-python silences llama.cpp while loading unless verbose=True, so
    the reason a load failed would be lost; this keeps it for the exception.
    """
    import llama_cpp
    from llama_cpp import _logger

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        if level in (3, 4):  # GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR (ggml.h)
            lines.append(text.decode(errors="replace").strip())
        _logger.llama_log_callback(level, text, user_data)

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


#: The fix named when an architecture cannot loop.
STOCK_HINT = "run it as the stock model with --no-loop (loop=False in Python)"


class ContextFullError(ValueError):
    """A prompt (with the conversation so far) that does not fit the context.

    The message keeps llama-cpp-python's "Requested tokens (N) exceed context
    window of M" (its server maps that to HTTP 400) and adds the fix.
    """


class GenerationInProgress(LoopConfigError):
    """set_loop() while a reply is being generated (a stream not yet finished or closed)."""


def check_loop(model: GGUFModel, loop: LoopConfig) -> LoopConfig:
    """Refuse a loop the model cannot run, naming the problem and the fix."""
    if model.architecture not in engine.SUPPORTED_ARCHS:
        raise LoopConfigError(
            f"{model.path.name}: architecture '{model.architecture}' does not support looping "
            f"(supported: {', '.join(engine.SUPPORTED_ARCHS)}); {STOCK_HINT}"
        )
    return loop.check(model.n_layer)


def _as_loop(loop: Any, model: GGUFModel, base: LoopConfig | None = None) -> LoopConfig | None:
    """What ``load(loop=...)`` and ``set_loop`` accept (a LoopConfig, a recipe name, a
    mapping of settings, None/False), as a LoopConfig or None (stock)."""
    return as_loop(loop, model.n_layer, base)


def _read(path: Any, replaced: bool) -> GGUFModel:
    """The file's facts. Invalid loop keys are skipped when ``replaced`` (the caller
    runs another loop or none: kv overrides replace the keys at load)."""
    try:
        return read_model(path)
    except ModelFileError as e:
        if not replaced or not isinstance(e.__cause__, LoopConfigError):
            raise
    m = read_model(path, ignore_loop=True)
    unknown = [k for k in _file_loop_keys(m) if k not in GGUF_KEYS.values()]
    try:
        _check_loop_types(m.file)
    except LoopConfigError as e:
        unknown.append(str(e))
    if unknown:  # llama.cpp refuses these whatever the overrides say (D8)
        raise LoopConfigError(
            f"{m.path}: loop metadata llama.cpp refuses at load whatever the run-time loop "
            f"({'; '.join(unknown)}): write a copy without it, `loopcpp convert {m.path} "
            "-o FIXED.gguf --no-loop` (or with new loop settings), and run that"
        )
    return m


def _file_loop_keys(m: GGUFModel) -> list[str]:
    return [k for k in m.file.fields if k.startswith("loop.")]


def _overrides(config: LoopConfig, m: GGUFModel) -> dict[str, Any]:
    """The kv overrides of ``config``, covering every loop key the file has (so that none
    of the file's values, valid or not, reaches llama.cpp)."""
    overrides = config.to_kv_overrides()
    for f in FIELDS:
        if f.key in _file_loop_keys(m) and f.key not in overrides:
            value = getattr(config, f.name)
            overrides[f.key] = 0.0 if value is None else value  # step 0: the method default
    return overrides


def _make_looped_class() -> type:
    Llama = _llama_class()

    class LoopedLlama(Llama):  # type: ignore[misc, valid-type]
        """A llama_cpp.Llama whose layer loop can be read and changed at run time."""

        gguf: GGUFModel

        @property
        def loop(self) -> LoopConfig | None:
            """The loop of this context (None: the stock model)."""
            return engine.get_loop(self._ctx.ctx)

        _generating = 0  # generations in progress (streams not yet finished or closed)

        def set_loop(self, loop: Any) -> None:
            """Change the loop without reloading weights; None (or False) turns it off.

            Takes what ``load(loop=...)`` takes: a LoopConfig, a recipe name
            (``"paper"``) or a mapping of settings (``{"count": 3}``: the loop in
            use with count 3; ``{"recipe": "paper", "count": 4}``).

            The cached prompt is dropped, since its KV entries were computed
            under the previous loop. Refused (GenerationInProgress) while a
            reply is being generated: a streamed reply must be read to its end
            or closed (``stream.close()``) first, since changing the loop under
            it would corrupt the rest of that reply.
            """
            loop = _as_loop(loop, self.gguf, self.loop)
            if self._generating:
                raise GenerationInProgress(
                    "a reply is being generated: the loop cannot change under it; read the "
                    "stream to its end or close it (stream.close()), then call set_loop"
                )
            if loop is not None:
                check_loop(self.gguf, loop)
                check_loop_memory(self.gguf, loop, self.n_ctx(), self.context_params.n_ubatch)
            engine.set_loop(self._ctx.ctx, self._model.model, loop)
            self.reset()  # the next eval overwrites the cache from position 0

        def generate(self, *args: Any, **kwargs: Any) -> Iterator[int]:
            self._generating += 1
            try:
                yield from super().generate(*args, **kwargs)
            finally:
                self._generating -= 1

        def _create_completion(self, prompt: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
            if prompt == "" or (isinstance(prompt, list) and not prompt):
                raise ValueError("the prompt is empty: give some text to complete")
            try:
                return (yield from super()._create_completion(prompt, *args, **kwargs))
            except ValueError as e:
                if "exceed context window" not in str(e):
                    raise
                asked = re.search(r"Requested tokens \((\d+)\)", str(e))
                n = asked.group(1) if asked else "more"
                raise ContextFullError(
                    f"Requested tokens ({n}) exceed context window of {self._n_ctx}: the "
                    "prompt does not fit the context; shorten it (in a chat: start a new "
                    "conversation) or load with a larger n_ctx"
                ) from e

    return LoopedLlama


_looped_class: type | None = None


def load(
    model: str | os.PathLike[str],
    loop: Any = None,
    *,
    recipe: str | None = None,
    **llama_kwargs: Any,
) -> Any:
    """Load a GGUF (a path or a bundled model name) as a looping llama_cpp.Llama.

    ``loop``: a LoopConfig to run; a recipe name (``"paper"``, ``"paper-moe"``:
    ``config.RECIPES``, placed on this model by its window rule); a mapping of
    settings as a server request's ``"loop"`` (``{"count": 3}`` changes the
    file's loop, ``{"recipe": "paper", "count": 4}``); None to use the file's
    ``loop.*`` keys (if any); False to run the stock model. ``recipe="paper"``
    is ``loop="paper"``. A given loop (False included) replaces the file's keys,
    so a file whose loop keys are invalid still runs with ``loop=False`` or
    another loop. Other keyword arguments go to ``llama_cpp.Llama`` (n_ctx,
    n_threads, type_k, ...). The loop is passed to llama.cpp as kv overrides,
    so the context is sized for it from the start. ``rpc_servers="host:port,..."``
    registers llama.cpp RPC servers first (:mod:`loopcpp.rpc`); ``n_gpu_layers``
    layers then run on them.
    """
    global _looped_class
    if recipe is not None:
        if loop is not None:
            raise LoopConfigError(
                "give the recipe as loop=\"NAME\" or recipe=\"NAME\", not both (a mapping "
                "loop={\"recipe\": NAME, ...} changes its fields)"
            )
        loop = recipe
    path = resolve_model(model)
    info = _read(path, replaced=loop is not None)
    config = info.loop if loop is None else _as_loop(loop, info, info.loop)
    # a stock run of a file with loop keys: load with a valid identity loop over the
    # file's keys (kv overrides cannot remove a key), then turn it off
    load_config = config
    if (config is None and loop is not None and _file_loop_keys(info)
            and info.architecture in engine.SUPPORTED_ARCHS):
        load_config = LoopConfig(0, 1, count=1)
    if load_config is not None:
        check_loop(info, load_config)
        # refused here: a graph too big to allocate aborts the process inside ggml
        check_loop_memory(info, load_config, n_ctx_of(llama_kwargs, info),
                          n_ubatch_of(llama_kwargs))
        overrides = dict(llama_kwargs.pop("kv_overrides", None) or {})
        overrides.update(_overrides(load_config, info))
        llama_kwargs["kv_overrides"] = overrides
    llama_kwargs.setdefault("verbose", False)
    if _looped_class is None:
        _looped_class = _make_looped_class()
    rpc_servers = llama_kwargs.pop("rpc_servers", None)
    if rpc_servers:  # llama-cpp-python 0.3.36 takes this argument but ignores it
        from loopcpp import rpc

        rpc.add_servers(rpc_servers)
    with llama_errors() as errors:
        try:
            llm = _looped_class(model_path=str(path), **llama_kwargs)
        except ValueError as e:
            reason = "; ".join(errors) or f"{e} (run with verbose=True to see its log)"
            if "does not support looping" in reason and _file_loop_keys(info):
                reason += f" (remove its loop keys: `loopcpp convert {path} -o OUT --no-loop`)"
            raise ValueError(f"llama.cpp could not load {path}: {reason}") from e
    llm.gguf = info
    # llama.cpp pads a small context (to 256), llama-cpp-python's token buffer is the size
    # asked for: check prompts against the buffer, or they overflow it with a numpy error
    llm._n_ctx = min(llm._n_ctx, len(llm.input_ids))
    if config is None and load_config is not None:
        llm.set_loop(None)
    return llm
