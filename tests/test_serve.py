"""``loopcpp serve``: loop overrides per request on llama-cpp-python's OpenAI server.

The unit tests check the override parser; the end-to-end test starts the server
on 127.0.0.1 (a free port) in a subprocess with the bundled SmolLM2 and talks
to it over HTTP. Greedy decoding with one thread is deterministic, so answers
and logprobs are compared exactly.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from conftest import http, serve_process, write_synthetic_gguf

from loopcpp.config import LoopConfig, LoopConfigError
from loopcpp.gguf_io import read_model
from loopcpp.serve import loop_override

BASE = LoopConfig(13, 17, count=2)


@pytest.fixture(scope="module")
def model30(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return read_model(write_synthetic_gguf(tmp_path_factory.mktemp("m") / "m.gguf", n_layer=30))


def test_loop_override_merges_with_the_served_loop(model30: Any) -> None:
    assert loop_override(None, BASE, model30) is None
    assert loop_override({}, BASE, model30) == BASE
    assert loop_override({"count": 3, "method": "rk3"}, BASE, model30) == BASE.with_(
        count=3, method="rk3"
    )
    assert loop_override({"start": 10, "end": 20}, BASE, model30) == BASE.with_(start=10, end=20)
    assert loop_override({"start": 1, "end": 3}, None, model30) == LoopConfig(1, 3)
    # without a served loop the depth rule places the window
    assert loop_override({"count": 3}, None, model30) == LoopConfig(13, 17, count=3)
    assert loop_override({"recipe": "paper", "count": 4}, BASE, model30) == LoopConfig.recipe(
        "paper", 30, count=4)
    assert loop_override({"anchor": 0.5, "kv": "refined"}, BASE, model30) == BASE.with_(
        anchor=0.5, kv="refined")
    assert loop_override({"depth": 0.6}, BASE, model30) == BASE.with_(start=16, end=20)


@pytest.mark.parametrize(
    ("raw", "default", "fragment"),
    [
        ({"count": 0}, BASE, "out of range: use 1..64"),
        ({"method": "simpson"}, BASE, "unknown loop method 'simpson'"),
        ({"start": 20, "end": 40}, BASE, "out of range for a model with 30 layers"),
        ({"deep": 0.5}, BASE, "unknown loop setting 'deep': use start, end, count"),
        ({"count": "3"}, BASE, "must be an integer"),
        ({"recipe": "papr"}, BASE, "unknown recipe 'papr'"),
        (3, BASE, '"loop" must be an object'),
    ],
)
def test_loop_override_errors(model30: Any, raw: Any, default: Any, fragment: str) -> None:
    with pytest.raises(LoopConfigError, match=fragment):
        loop_override(raw, default, model30)


# -- end to end -----------------------------------------------------------------


class Client:
    def __init__(self, base: str) -> None:
        self.base = base

    def request(self, path: str, body: Any = None) -> tuple[int, dict[str, str], bytes]:
        return http(self.base, path, body, {"content-type": "application/json"})

    def chat(self, messages: list[dict[str, str]] | None = None,
             **extra: Any) -> tuple[str, dict[str, Any]]:
        """(x-loopcpp-loop header, response) of a short greedy chat completion.

        Cold (``"cache_prompt": false``) unless ``extra`` says otherwise, so that
        answers compare exactly whatever ran before.
        """
        body = {
            "messages": messages or [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 6,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": 3,
            "cache_prompt": False,
            **extra,
        }
        status, headers, raw = self.request("/v1/chat/completions", body)
        assert status == 200, raw
        self.last_headers = headers
        return headers["x-loopcpp-loop"], json.loads(raw)

    def prompt_counts(self) -> tuple[int, int]:
        """(prompt tokens taken from the cache, evaluated) of the last chat()."""
        return (int(self.last_headers["x-loopcpp-prompt-cached"]),
                int(self.last_headers["x-loopcpp-prompt-evaluated"]))


@pytest.fixture(scope="module")
def server(smollm2_path: Path) -> Iterator[Client]:
    with serve_process(smollm2_path, "--count", "2", "--ctx", "512", "--threads", "1",
                       "--logits-all") as base:
        yield Client(base)


def _answer(response: dict[str, Any]) -> tuple[str, Any]:
    choice = response["choices"][0]
    return choice["message"]["content"], choice["logprobs"]


def test_get_loop(server: Client) -> None:
    status, _, raw = server.request("/loop")
    info = json.loads(raw)
    assert status == 200 and info["n_layer"] == 30
    assert info["loop"] == BASE.to_dict()
    assert info["settings"]["recipes"]["paper"]["loop"] == LoopConfig.recipe("paper", 30).to_dict()
    assert "anchor" in info["settings"]["fields"]


def test_loop_override_per_request(server: Client) -> None:
    header, default = server.chat()
    assert header == BASE.describe()
    rk3 = BASE.with_(count=3, method="rk3")
    header_rk3, looped = server.chat(loop={"count": 3, "method": "rk3"})
    assert header_rk3 == rk3.describe()
    header_stock, stock = server.chat(loop=None)
    assert header_stock == "off (the stock model)"
    header_paper, _ = server.chat(loop={"recipe": "paper", "count": 2})
    assert header_paper == LoopConfig.recipe("paper", 30, count=2).describe()
    header_again, again = server.chat()
    assert header_again == BASE.describe()
    # the same cold request right after itself: the same answer
    assert _answer(server.chat()[1]) == _answer(again)

    # the override changes the logprobs; the served loop is back afterwards, exactly
    assert _answer(looped)[1] != _answer(default)[1]
    assert _answer(stock)[1] != _answer(default)[1]
    assert _answer(again) == _answer(default)
    # an override is deterministic too
    assert _answer(server.chat(loop={"count": 3, "method": "rk3"})[1]) == _answer(looped)
    assert json.loads(server.request("/loop")[2])["loop"] == BASE.to_dict()


def test_concurrent_requests_do_not_share_overrides(server: Client) -> None:
    _, default = server.chat()
    _, looped = server.chat(loop={"count": 3, "method": "rk3"})
    kinds = [{}, {"loop": {"count": 3, "method": "rk3"}}] * 2
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda extra: server.chat(**extra), kinds))
    for extra, (header, response) in zip(kinds, results, strict=True):
        expected = looped if extra else default
        assert "K=3 rk3" in header if extra else "K=2 euler" in header
        assert _answer(response) == _answer(expected)


def test_streaming_with_an_override(server: Client) -> None:
    _, looped = server.chat(loop={"count": 3, "method": "rk3"})
    body = {
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 6, "temperature": 0, "stream": True, "cache_prompt": False,
        "loop": {"count": 3, "method": "rk3"},
    }
    status, headers, raw = server.request("/v1/chat/completions", body)
    assert status == 200 and "K=3 rk3" in headers["x-loopcpp-loop"]
    text = ""
    for line in raw.decode().splitlines():
        if line.startswith("data: {"):
            text += json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
    assert text == _answer(looped)[0]


@pytest.mark.parametrize(
    ("loop", "fragment"),
    [
        ({"count": 0}, "loop count K=0 is out of range"),
        ({"start": 20, "end": 40}, "out of range for a model with 30 layers"),
        ({"method": "simpson"}, "unknown loop method"),
        ("rk3", '"loop" must be an object'),
    ],
)
def test_bad_loop_is_400(server: Client, loop: Any, fragment: str) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "loop": loop}
    status, _, raw = server.request("/v1/chat/completions", body)
    assert status == 400
    error = json.loads(raw)["error"]
    assert fragment in error["message"] and error["param"] == "loop"
    assert json.loads(server.request("/loop")[2])["loop"] == BASE.to_dict()


def test_get_loop_lists_the_settings_from_the_table() -> None:
    from loopcpp.config import FIELDS, RECIPES
    from loopcpp.serve import settings_json

    settings = settings_json(36)
    assert list(settings["fields"]) == [f.name for f in FIELDS]
    assert settings["fields"]["method"]["choices"][:3] == ["naive", "euler", "rk3"]
    assert settings["fields"]["count"]["range"] == "1..64"
    assert set(settings["recipes"]) == set(RECIPES)
    assert settings["recipes"]["paper"]["loop"]["start"] == 15
    assert "recipe" in settings["keys"] and "anchor_norm" in settings["keys"]


# -- the prompt cache -------------------------------------------------------------

TURN1 = [{"role": "user", "content": "What is the capital of France?"}]


def _turn2(server: Client, **extra: Any) -> tuple[list[dict[str, str]], int]:
    """The conversation after a first (cold) turn with a second question, and the
    first turn's prompt tokens."""
    _, first = server.chat(TURN1, **extra)
    assert server.prompt_counts() == (0, first["usage"]["prompt_tokens"])
    reply = first["choices"][0]["message"]["content"]
    conversation = [*TURN1, {"role": "assistant", "content": reply},
                    {"role": "user", "content": "And what is the capital of Italy?"}]
    return conversation, first["usage"]["prompt_tokens"]


def test_a_conversation_reuses_the_cached_prefix(server: Client) -> None:
    conversation, n_first = _turn2(server)
    _, warm = server.chat(conversation, cache_prompt=True)
    cached, evaluated = server.prompt_counts()
    n_prompt = warm["usage"]["prompt_tokens"]
    # the first turn's prompt (and its reply, up to how it is tokenized again) came
    # from the cache; only the rest was evaluated
    assert cached + evaluated == n_prompt
    assert n_first <= cached < n_prompt

    _, cold = server.chat(conversation)  # "cache_prompt": false
    assert server.prompt_counts() == (0, n_prompt)
    assert cold["usage"]["prompt_tokens"] == n_prompt
    # a cold run is reproducible
    _, cold_again = server.chat(conversation)
    assert _answer(cold_again) == _answer(cold)


def test_the_same_request_again_evaluates_one_token(server: Client) -> None:
    server.chat(TURN1)
    _, again = server.chat(TURN1, cache_prompt=True)
    n_prompt = again["usage"]["prompt_tokens"]
    # llama-cpp-python re-evaluates the last prompt token to get fresh logits
    assert server.prompt_counts() == (n_prompt - 1, 1)


def test_a_loop_change_drops_the_cache(server: Client) -> None:
    conversation, _ = _turn2(server)
    rk3 = {"count": 3, "method": "rk3"}
    _, looped = server.chat(conversation, cache_prompt=True, loop=rk3)
    n_prompt = looped["usage"]["prompt_tokens"]
    assert server.prompt_counts() == (0, n_prompt)  # the cache was computed with K=2 euler
    # the same override again keeps its cache
    server.chat(conversation, cache_prompt=True, loop=rk3)
    assert server.prompt_counts()[0] == n_prompt - 1
    # back to the served loop: dropped again; and the stock model likewise
    server.chat(conversation, cache_prompt=True)
    assert server.prompt_counts() == (0, n_prompt)
    server.chat(conversation, cache_prompt=True, loop=None)
    assert server.prompt_counts() == (0, n_prompt)


@pytest.mark.parametrize("value", ["no", 0, None, {"on": True}])
def test_bad_cache_prompt_is_400(server: Client, value: Any) -> None:
    body = {"messages": TURN1, "max_tokens": 2, "cache_prompt": value}
    status, _, raw = server.request("/v1/chat/completions", body)
    assert status == 400, raw
    error = json.loads(raw)["error"]
    assert error["param"] == "cache_prompt" and '"cache_prompt" must be true' in error["message"]


def test_no_prefix_cache_makes_every_request_cold(smollm2_path: Path) -> None:
    with serve_process(smollm2_path, "--count", "2", "--ctx", "512", "--threads", "1",
                       "--logits-all", "--no-prefix-cache") as base:
        client = Client(base)
        conversation, _ = _turn2(client)
        _, first = client.chat(conversation, cache_prompt=True)
        assert client.prompt_counts() == (0, first["usage"]["prompt_tokens"])
        # cold every time: the same answer, exactly
        _, again = client.chat(conversation, cache_prompt=True)
        assert client.prompt_counts() == (0, again["usage"]["prompt_tokens"])
        assert _answer(again) == _answer(first)
