"""``loopcpp serve``: loop overrides per request on llama-cpp-python's OpenAI server.

The unit tests check the override parser; the end-to-end test starts the server
on 127.0.0.1 (a free port) in a subprocess with the bundled SmolLM2 and talks
to it over HTTP. Greedy decoding with one thread is deterministic, so answers
and logprobs are compared exactly.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from conftest import require_patched, write_synthetic_gguf

from loopcpp.config import LoopConfig, LoopConfigError
from loopcpp.gguf_io import read_model
from loopcpp.serve import loop_override

REPO = Path(__file__).resolve().parents[1]
STARTUP_S = 180
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


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Client:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def request(self, path: str, body: Any = None) -> tuple[int, dict[str, str], bytes]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.base + path, data=data, headers={"content-type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def chat(self, **extra: Any) -> tuple[str, dict[str, Any]]:
        """(x-loopcpp-loop header, response) of a short greedy chat completion."""
        body = {
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 6,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": 3,
            **extra,
        }
        status, headers, raw = self.request("/v1/chat/completions", body)
        assert status == 200, raw
        return headers["x-loopcpp-loop"], json.loads(raw)


@pytest.fixture(scope="module")
def server(smollm2_path: Path) -> Iterator[Client]:
    require_patched()
    for dep in ("fastapi", "uvicorn", "sse_starlette", "starlette_context", "pydantic_settings"):
        pytest.importorskip(dep, reason="needs the serve extra: pip install 'loopcpp[serve]'")
    port = _free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "loopcpp", "serve", str(smollm2_path), "--count", "2",
         "--host", "127.0.0.1", "--port", str(port), "--ctx", "256", "--threads", "1",
         "--logits-all"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    client = Client(port)
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited with {proc.returncode}:\n{proc.stdout.read()}")
            try:
                if client.request("/loop")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not answer within {STARTUP_S} s")
            time.sleep(0.3)
        yield client
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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
    # the same request right after itself: its prompt is cached, yet the answer is the same
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
        "max_tokens": 6, "temperature": 0, "stream": True,
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
