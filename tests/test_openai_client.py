"""``loopcpp serve`` through the official ``openai`` Python client (issue 14).

A real server process on the bundled SmolLM2 (K=2 euler on the depth rule's
window); every request is greedy and cold (``"cache_prompt": false`` in
``extra_body``), so answers compare exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import http, serve_process

from loopcpp.resolve import NO_LOOP

openai = pytest.importorskip("openai", reason="needs the openai client: pip install openai")

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
COLD = {"cache_prompt": False}


@pytest.fixture(scope="module")
def server(smollm2_path: Path) -> Iterator[str]:
    with serve_process(smollm2_path, "--count", "2", "--ctx", "512", "--threads", "1",
                       "--alias", "smol") as base:
        yield base


@pytest.fixture(scope="module")
def client(server: str) -> Any:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


def _ask(client: Any, **kwargs: Any) -> Any:
    extra = {**COLD, **kwargs.pop("extra_body", {})}
    return client.chat.completions.with_raw_response.create(
        model="smol", messages=QUESTION, max_tokens=8, temperature=0, extra_body=extra, **kwargs
    )


def test_models_and_a_chat_completion(client: Any) -> None:
    assert [m.id for m in client.models.list().data] == ["smol"]
    raw = _ask(client)
    reply = raw.parse()
    assert reply.model == "smol" and reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert "Paris" in reply.choices[0].message.content
    assert reply.usage.prompt_tokens > len(QUESTION[0]["content"]) // 4
    assert reply.usage.completion_tokens <= 8
    assert raw.headers["x-loopcpp-loop"].startswith("layers [13, 17) x K=2 euler")


def test_streaming_gives_the_same_answer(client: Any) -> None:
    whole = _ask(client).parse().choices[0].message.content
    stream = client.chat.completions.create(
        model="smol", messages=QUESTION, max_tokens=8, temperature=0, stream=True,
        extra_body=COLD,
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_a_per_request_loop_through_extra_body(client: Any, server: str) -> None:
    default = _ask(client)
    rk3 = _ask(client, extra_body={"loop": {"count": 3, "method": "rk3"}})
    assert "K=3 rk3/block" in rk3.headers["x-loopcpp-loop"]
    stock = _ask(client, extra_body={"loop": None})
    assert stock.headers["x-loopcpp-loop"] == NO_LOOP
    # the served loop again, and the same answer as before the overrides
    again = _ask(client)
    assert again.headers["x-loopcpp-loop"] == default.headers["x-loopcpp-loop"]
    assert (again.parse().choices[0].message.content
            == default.parse().choices[0].message.content)
    status, _, _ = http(server, "/loop")
    assert status == 200


@pytest.mark.parametrize(
    ("loop", "fragment"),
    [
        ({"count": 0}, "loop count K=0 is out of range"),
        ({"method": "simpson"}, "unknown loop method 'simpson'"),
        ({"start": 20, "end": 40}, "out of range for a model with 30 layers"),
        ("rk3", '"loop" must be an object'),
    ],
)
def test_an_invalid_loop_is_a_400_naming_the_problem(
    client: Any, loop: Any, fragment: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        _ask(client, extra_body={"loop": loop})
    assert info.value.status_code == 400
    assert fragment in info.value.message
    body = info.value.body
    assert isinstance(body, dict) and body.get("param") == "loop", body
