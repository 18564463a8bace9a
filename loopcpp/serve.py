"""An OpenAI-compatible server for a looped model (``loopcpp serve``).

The routes are llama-cpp-python's own server (``llama_cpp.server``:
``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``,
``/v1/models``, ...) serving one :class:`loopcpp.api.LoopedLlama`. On top:

- a request body may carry ``"loop"``: an object with any loop setting (a row
  of ``config.FIELDS``), ``"recipe"`` (a preset), ``"depth"``/``"width"`` (the
  depth rule) or ``"window"``; the missing settings come from the served loop
  (without one, the window from the depth rule), resolved by
  :func:`loopcpp.resolve.resolve` as every command's; or ``null`` for the
  stock model. The next request without the field runs the served loop
  again. An invalid loop is answered with HTTP 400 and the problem in
  ``error.message``.
- a request body may carry ``"cache_prompt": false`` (default true): start this
  request from an empty prompt cache (see below).
- every response carries the loop it was computed with in ``x-loopcpp-loop``.
- ``GET /loop`` returns the served (default) loop, and under ``"settings"`` what a
  request's ``"loop"`` may hold (every field, the recipes), from the table.
- a POST body that is JSON is read as JSON whatever its Content-Type (``curl -d``
  sends ``application/x-www-form-urlencoded``); every response names the model
  by its ``/v1/models`` id; ``"prompt": ""`` is an HTTP 400; ``/v1/embeddings``
  answers 400 unless the server was started with embeddings on
  (``loopcpp serve --embedding``); with an API key, a request without it gets
  the 401 before its body is looked at.

Requests are served one at a time (one model context), so a loop override
never reaches another request.

The prompt cache: a request continues from the longest prefix of its prompt
that is still in the context from the request before (llama-cpp-python's own
prefix match in ``Llama.generate``), so a chat over the API evaluates only the
new turn, not the whole conversation. The cache is dropped when the loop
changes between requests (``set_loop`` resets the context: its K/V were
computed under the other loop). A reused prefix's K/V were computed with the
earlier request's batch split (its prompt in one or more batches, then its
reply one token at a time), and a looped model's numbers depend on that split
(``apply = prefill`` / ``first`` loop only multi-token batches, and even with
``apply = all`` a token's looped state depends on the batch it was in), so a
looped answer can differ from a cold run of the same request. For cold,
reproducible requests, ``"cache_prompt": false`` in a request body starts that
request from an empty cache, and ``loopcpp serve --no-prefix-cache`` does so for
every request. A non-streamed response says how many prompt tokens were
evaluated and how many came from the cache in ``x-loopcpp-prompt-evaluated``
and ``x-loopcpp-prompt-cached``.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from loopcpp.api import check_loop
from loopcpp.config import FIELDS, RECIPES, LoopConfig, LoopConfigError
from loopcpp.gguf_io import GGUFModel
from loopcpp.resolve import LoopRequest, request_keys, resolve
from loopcpp.resolve import describe as describe_loop

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

SERVE_HINT = "install the server's dependencies with `pip install 'loopcpp[serve]'`"
_UNSET = object()


class ServeDependencyMissing(ImportError):
    """fastapi, uvicorn or another server dependency is not installed."""


def loop_override(raw: Any, default: LoopConfig | None, model: GGUFModel) -> LoopConfig | None:
    """The loop a request's ``"loop"`` field asks for (None: the stock model).

    An object of settings (any row of ``config.FIELDS``, ``recipe``, ``depth``,
    ``width``, ``window``) resolved on the served loop by the one resolver
    (:func:`loopcpp.resolve.resolve`). Raises LoopConfigError naming the
    problem and the fix.
    """
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise LoopConfigError(
            f'"loop" must be an object such as {{"count": 3, "method": "rk3"}} or '
            f'{{"recipe": "paper"}}, or null (the stock model), got {json.dumps(raw)}'
        )
    request = LoopRequest.from_mapping(raw)
    loop = resolve(request, model.n_layer, base=default, base_source="the served loop").loop
    assert loop is not None  # a mapping never asks for no loop
    return check_loop(model, loop)


def describe(loop: LoopConfig | None) -> str:
    return describe_loop(loop)


def settings_json(n_layer: int) -> dict[str, Any]:
    """What a request's ``"loop"`` may hold, from the table: every field (type, default,
    choices or range, help), the recipes on this model, and the other keys."""
    kinds = {int: "integer", float: "number", bool: "boolean", str: "string"}
    fields = {
        f.name: {
            "key": f.key,
            "type": kinds[f.kind],
            "default": f.default,
            **({"choices": list(f.choices)} if f.choices else {}),
            **({"range": f.range_text()} if f.kind in (int, float) else {}),
            **({"aliases": list(f.aliases)} if f.aliases else {}),
            "help": f.help,
        }
        for f in FIELDS
    }
    recipes = {
        name: {"help": r.help, "loop": LoopConfig.recipe(name, n_layer).to_dict()}
        for name, r in RECIPES.items()
    }
    return {"fields": fields, "recipes": recipes, "keys": request_keys()}


def cache_prompt_field(raw: Any) -> bool:
    """A request's ``"cache_prompt"``: true (continue from the cached prefix) or false."""
    if not isinstance(raw, bool):
        raise LoopConfigError(
            f'"cache_prompt" must be true (reuse the cached prompt prefix) or false (start '
            f"from an empty cache), got {json.dumps(raw)}"
        )
    return raw


class PromptStats:
    """What the first evaluation of a request took from the cache and evaluated.

    Wraps ``llm.eval``: llama-cpp-python's ``generate`` evaluates the prompt
    after its prefix match in one ``eval`` call (an empty one when the whole
    prompt is cached), then each sampled token in a call of its own.
    """

    def __init__(self, llm: Any) -> None:
        self.cached: int | None = None
        self.evaluated: int | None = None
        original = llm.eval

        def counting_eval(tokens: Any) -> Any:
            if self.evaluated is None:
                self.cached, self.evaluated = int(llm.n_tokens), len(tokens)
            return original(tokens)

        llm.eval = counting_eval

    def start(self) -> None:
        self.cached = self.evaluated = None

    def headers(self) -> list[tuple[bytes, bytes]]:
        if self.evaluated is None:  # nothing evaluated yet (a stream's headers come first)
            return []
        return [(b"x-loopcpp-prompt-evaluated", str(self.evaluated).encode()),
                (b"x-loopcpp-prompt-cached", str(self.cached).encode())]


class LoopState:
    """The served model, its default loop and the lock that serialises requests."""

    def __init__(
        self,
        llm: Any,
        model: GGUFModel,
        alias: str,
        api_key: str | None = None,
        prefix_cache: bool = True,
    ) -> None:
        import anyio

        self.llm = llm
        self.model = model
        self.alias = alias
        self.api_key = api_key
        self.prefix_cache = prefix_cache
        self.default: LoopConfig | None = llm.loop
        self.lock = anyio.Lock()
        self.prompt = PromptStats(llm)

    def use(self, loop: LoopConfig | None) -> None:
        """Run the next evaluations with ``loop`` (a no-op when it is already in use).

        A change drops the prompt cache (``set_loop`` resets the context).
        """
        if self.llm.loop != loop:
            self.llm.set_loop(loop)

    def begin(self, loop: LoopConfig | None, cache_prompt: bool) -> None:
        """Set up the context for a request: its loop, and an empty cache if asked."""
        self.use(loop)
        if not (cache_prompt and self.prefix_cache):
            self.llm.reset()  # the next eval starts at position 0: a cold request
        self.prompt.start()

    def loop_json(self) -> dict[str, Any]:
        loop = self.default
        return {
            "model": self.alias,
            "n_layer": self.model.n_layer,
            "loop": loop.to_dict() if loop is not None else None,
            "description": describe(loop),
            "settings": settings_json(self.model.n_layer),
        }


async def _read_body(receive: Receive) -> tuple[bytes, list[Message]]:
    chunks: list[bytes] = []
    messages: list[Message] = []
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return b"".join(chunks), messages
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), messages


def _error(message: str, param: str | None, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "param": param,
                      "code": code}}


def _authorized(scope: Scope, api_key: str) -> bool:
    for k, v in scope["headers"]:
        if k.lower() == b"authorization":
            scheme, _, token = v.decode(errors="replace").partition(" ")
            return scheme.lower() == "bearer" and token.strip() == api_key
    return False


def _empty_prompt(prompt: Any) -> bool:
    return prompt == "" or prompt == [] or prompt == [""]


async def _json_response(send: Send, status: int, payload: Any) -> None:
    body = json.dumps(payload).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())],
    })
    await send({"type": "http.response.body", "body": body})


class LoopMiddleware:
    """Per-request loop overrides, ``GET /loop`` and one request at a time."""

    def __init__(self, app: ASGIApp, state: LoopState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = self.state
        if scope["path"].rstrip("/") == "/loop" and scope["method"] == "GET":
            await _json_response(send, 200, state.loop_json())
            return
        path = scope["path"].rstrip("/")
        if (state.api_key is not None and path.startswith("/v1")
                and not _authorized(scope, state.api_key)):
            # authenticate before anything in the body is judged (401 before a 400)
            await _json_response(send, 401, {"detail": "Invalid API key"})
            return
        body, messages = await _read_body(receive)
        wanted: Any = _UNSET
        cache_prompt = True
        if scope["method"] == "POST" and body:
            try:
                data = json.loads(body)
            except ValueError:
                data = None  # the route answers malformed JSON itself
            if isinstance(data, dict):
                if path.endswith("/embeddings") and not state.llm.context_params.embeddings:
                    await _json_response(send, 400, _error(
                        "embeddings are off: start the server with `loopcpp serve MODEL "
                        "--embedding`", None, "embeddings_disabled"))
                    return
                if path.endswith("/v1/completions") and _empty_prompt(data.get("prompt", "")):
                    await _json_response(send, 400, _error(
                        '"prompt" is empty: give some text to complete', "prompt",
                        "empty_prompt"))
                    return
                if "cache_prompt" in data:
                    try:
                        cache_prompt = cache_prompt_field(data.pop("cache_prompt"))
                    except LoopConfigError as e:
                        await _json_response(send, 400, _error(str(e), "cache_prompt",
                                                               "invalid_cache_prompt"))
                        return
                if "loop" in data:
                    try:
                        wanted = loop_override(data.pop("loop"), state.default, state.model)
                    except LoopConfigError as e:
                        await _json_response(send, 400, _error(str(e), "loop", "invalid_loop"))
                        return
                if path.startswith("/v1"):
                    data["model"] = state.alias  # responses name the model as /v1/models does
                body = json.dumps(data).encode()
                # a JSON body is JSON whatever its Content-Type (curl -d says form data)
                headers = [(k, v) for k, v in scope["headers"]
                           if k.lower() not in (b"content-length", b"content-type")]
                scope = dict(scope)
                scope["headers"] = [*headers, (b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]
        replay = [{"type": "http.request", "body": body, "more_body": False}]
        replay += [m for m in messages if m["type"] != "http.request"]

        async def receive_again() -> Message:
            return replay.pop(0) if replay else await receive()

        async with state.lock:
            loop = state.default if wanted is _UNSET else wanted
            # the loop stays in the context after the request, so that requests with the
            # same override keep the cache; the next request switches if it differs
            state.begin(loop, cache_prompt)
            header = (b"x-loopcpp-loop", describe(loop).encode())

            async def send_with_loop(message: Message) -> None:
                if message["type"] == "http.response.start":
                    message = dict(message)
                    message["headers"] = [*message.get("headers", []), header,
                                          *state.prompt.headers()]
                await send(message)

            await self.app(scope, receive_again, send_with_loop)


class _Proxy:
    """What llama_cpp.server's routes call to get the model: always the served one."""

    def __init__(self, state: LoopState) -> None:
        self.state = state

    def __call__(self, model: str | None = None) -> Any:
        return self.state.llm

    def __iter__(self) -> Any:
        yield self.state.alias


def create_app(
    llm: Any,
    model: GGUFModel,
    alias: str,
    api_key: str | None = None,
    prefix_cache: bool = True,
) -> ASGIApp:
    """The ASGI app: llama-cpp-python's routes behind :class:`LoopMiddleware`.

    ``prefix_cache=False`` starts every request from an empty prompt cache.
    """
    try:
        import llama_cpp.server.app as server
        from fastapi import FastAPI
        from fastapi.middleware import Middleware
        from llama_cpp.server.settings import ServerSettings
        from starlette_context.middleware import RawContextMiddleware
        from starlette_context.plugins import RequestIdPlugin
    except ImportError as e:
        raise ServeDependencyMissing(f"{e}: {SERVE_HINT}") from e
    import llama_cpp

    state = LoopState(llm, model, alias, api_key, prefix_cache=prefix_cache)
    server.set_server_settings(ServerSettings(api_key=api_key, interrupt_requests=False))
    # llama_cpp.server keeps its model in this module global (set_llama_proxy would
    # load a second, stock copy of the weights)
    server._llama_proxy = _Proxy(state)
    app = FastAPI(
        middleware=[Middleware(RawContextMiddleware, plugins=(RequestIdPlugin(),))],
        title=f"loopcpp: {alias}",
        version=llama_cpp.__version__,
    )
    app.include_router(server.router)
    return LoopMiddleware(app, state)


def run(
    llm: Any,
    model: GGUFModel,
    alias: str,
    host: str,
    port: int,
    api_key: str | None = None,
    log_level: str = "info",
    prefix_cache: bool = True,
) -> None:
    """Serve until interrupted."""
    try:
        import uvicorn
    except ImportError as e:
        raise ServeDependencyMissing(f"{e}: {SERVE_HINT}") from e
    app = create_app(llm, model, alias, api_key, prefix_cache=prefix_cache)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
