"""``loopcpp chat``: the slash-command parser (no model) and a piped-stdin chat (SmolLM2)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from click.testing import CliRunner

from loopcpp.chat import ChatSession, Command, CommandError, Reply, parse_command, status_line
from loopcpp.cli import cli
from loopcpp.config import LoopConfig, LoopConfigError

BASE = LoopConfig(13, 17, count=2)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("/loop", Command("show")),
        ("/loop off", Command("set_loop", None)),
        ("/loop none", Command("set_loop", None)),
        ("/loop k=3", Command("set_loop", BASE.with_(count=3))),
        ("/loop count=3", Command("set_loop", BASE.with_(count=3))),
        ("/loop window=10:20", Command("set_loop", BASE.with_(start=10, end=20))),
        ("/loop start=11 end=12", Command("set_loop", BASE.with_(start=11, end=12))),
        ("/loop method=rk3", Command("set_loop", BASE.with_(method="rk3"))),
        ("/loop mode=layer", Command("set_loop", BASE.with_(mode="layer"))),
        ("/loop kv=first", Command("set_loop", BASE.with_(kv="first"))),
        ("/loop apply=prefill", Command("set_loop", BASE.with_(apply="prefill"))),
        ("/loop routing=fresh", Command("set_loop", BASE.with_(routing="fresh"))),
        (
            "/loop k=3 method=rk3 window=12:18 mode=layer",
            Command("set_loop", LoopConfig(12, 18, count=3, method="rk3", mode="layer")),
        ),
        ("/reset", Command("reset")),
        ("/help", Command("help")),
        ("/quit", Command("quit")),
        ("  /QUIT  ", Command("quit")),
    ],
)
def test_parse_command(line: str, expected: Command) -> None:
    assert parse_command(line, BASE, BASE) == expected


def test_parse_command_while_off_uses_the_last_loop() -> None:
    last = LoopConfig(10, 14, count=4, method="rk3")
    assert parse_command("/loop on", None, last) == Command("set_loop", last)
    assert parse_command("/loop k=2", None, last) == Command("set_loop", last.with_(count=2))
    # changes apply to the loop in use when there is one
    assert parse_command("/loop k=5", BASE, last) == Command("set_loop", BASE.with_(count=5))


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("/loop k=three", "loop count must be an integer, got 'three'"),
        ("/loop k", "write settings as key=value"),
        ("/loop window=13", "write the window as A:B"),
        ("/loop method=simpson", "use one of naive, euler, rk3"),
        ("/loop bogus=0.5", "unknown setting; use start, end, count, k"),
        ("/loop recipe=papers", "unknown recipe 'papers': use one of paper, paper-moe"),
        ("/frobnicate", "unknown command /frobnicate: type /help"),
    ],
)
def test_parse_command_errors(line: str, fragment: str) -> None:
    with pytest.raises((CommandError, LoopConfigError), match=fragment):
        parse_command(line, BASE, BASE)


def test_parse_command_v2_settings_and_recipes() -> None:
    assert parse_command("/loop anchor=0.5 anchor_norm=true", BASE, BASE) == Command(
        "set_loop", BASE.with_(anchor=0.5, anchor_norm=True))
    assert parse_command("/loop recipe=paper", BASE, BASE, n_layer=36) == Command(
        "set_loop", LoopConfig.recipe("paper", 36))
    assert parse_command("/loop recipe=paper k=3", None, None, n_layer=36).loop == \
        LoopConfig.recipe("paper", 36, count=3)
    # the depth rule places a window when there is no loop to change
    assert parse_command("/loop k=3", None, None, n_layer=30).loop == LoopConfig(13, 17, count=3)
    assert parse_command("/loop depth=0.6", BASE, BASE, n_layer=30).loop == BASE.with_(
        start=16, end=20)


def test_parse_command_config_errors_are_loop_config_errors() -> None:
    with pytest.raises(LoopConfigError, match="out of range: use 1..64"):
        parse_command("/loop k=0", BASE, BASE)
    with pytest.raises(LoopConfigError, match="empty or reversed"):
        parse_command("/loop window=17:13", BASE, BASE)


def test_parse_command_without_any_window() -> None:
    with pytest.raises(CommandError, match="give the window too"):
        parse_command("/loop k=3", None, None)
    with pytest.raises(CommandError, match="give the window too"):
        parse_command("/loop on", None, None)
    assert parse_command("/loop window=2:4 k=3", None, None) == Command(
        "set_loop", LoopConfig(2, 4, count=3)
    )


def test_status_line_and_speed() -> None:
    reply = Reply("abc", n_tokens=11, seconds=3.0, first_seconds=1.0)
    assert reply.tokens_per_second == pytest.approx(5.0)  # 10 tokens after the first in 2 s
    line = status_line(reply, LoopConfig(13, 17, count=3, method="rk3"))
    assert line.startswith("[K=3 rk3/block [13, 17)] 11 tokens in 3.0 s")
    assert line.endswith("5.0 tok/s")
    assert status_line(Reply("", 0, 0.5, 0.5, stopped=True), None).startswith(
        "[stock] 0 tokens (stopped)"
    )


class _FakeLlm:
    """Streams a fixed reply; raises KeyboardInterrupt after ``stop_after`` chunks."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.loop: LoopConfig | None = BASE
        self.stop_after = stop_after
        self.seen: list[list[dict[str, str]]] = []
        self.resets = 0

    def create_chat_completion(self, messages, stream, **kwargs):
        assert stream
        self.seen.append([dict(m) for m in messages])
        for i, word in enumerate(["Hello", " there", " friend"]):
            if self.stop_after is not None and i == self.stop_after:
                raise KeyboardInterrupt
            yield {"choices": [{"delta": {"content": word}}]}

    def tokenize(self, text: bytes, add_bos: bool = True) -> list[int]:
        return list(range(len(text.split())))

    def reset(self) -> None:
        self.resets += 1


def test_session_keeps_history_and_partial_replies() -> None:
    llm = _FakeLlm()
    session = ChatSession(llm, system="Be brief.")
    out: list[str] = []
    reply = session.reply("hi", out.append)
    assert reply.text == "Hello there friend" and not reply.stopped and "".join(out) == reply.text
    llm.stop_after = 1
    stopped = session.reply("again", out.append)
    assert stopped.stopped and stopped.text == "Hello"
    assert llm.resets == 1  # the cache is not trusted after an interrupt
    assert llm.seen[1] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello there friend"},
        {"role": "user", "content": "again"},
    ]
    assert session.history[-1] == {"role": "assistant", "content": "Hello"}
    llm.stop_after = 0  # stopped before any text: the question goes too
    assert session.reply("third", out.append).text == ""
    assert session.history[-1] == {"role": "assistant", "content": "Hello"}
    session.reset()
    assert session.messages() == [{"role": "system", "content": "Be brief."}]


def test_session_drops_a_failed_turn() -> None:
    class Full(_FakeLlm):
        def create_chat_completion(self, messages, stream, **kwargs):
            raise ValueError("Requested tokens (600) exceed context window of 512")

    session = ChatSession(Full())
    with pytest.raises(ValueError, match="exceed context window"):
        session.reply("hi", print)
    assert session.history == []


def test_run_chat_with_a_fake_model() -> None:
    from loopcpp.chat import run_chat

    class Settable(_FakeLlm):
        def set_loop(self, loop: LoopConfig | None) -> None:
            if loop is not None:
                loop.check(30)
            self.loop = loop

    llm = Settable()
    stdin = io.StringIO("hi\n/loop k=3 method=rk3\n/loop window=28:40\n/loop off\nbye\n/quit\nno\n")
    stdout, stderr = io.StringIO(), io.StringIO()
    run_chat(ChatSession(llm), stdin, stdout, stderr)
    assert stdout.getvalue() == "Hello there friend\nHello there friend\n"
    err = stderr.getvalue()
    assert "x K=3 rk3/block" in err
    assert "out of range for a model with 30 layers" in err and "K=3 rk3/block" in err
    assert "loop off (the stock model)" in err and "[stock] 3 tokens" in err
    assert len(llm.seen) == 2  # "/quit" ended it before "no"


# -- the real thing ------------------------------------------------------------


def test_chat_cli_with_piped_stdin(patched: None, smollm2_path: Path) -> None:
    script = (
        "What is the capital of France?\n"
        "/loop\n"
        "/loop k=3 method=rk3\n"
        "/loop k=0\n"
        "/loop\n"
        "/reset\n"
        "/loop off\n"
        "What is the capital of France?\n"
        "/quit\n"
    )
    result = CliRunner().invoke(
        cli,
        ["chat", str(smollm2_path), "--count", "2", "-n", "12", "--ctx", "512", "--threads", "1"],
        input=script,
        prog_name="loopcpp",
    )
    assert result.exit_code == 0, result.output
    err = result.stderr
    assert "loop layers [13, 17) x K=2 euler/block" in err  # depth rule window, --count 2
    assert "layers [13, 17) x K=3 rk3/block" in err
    assert "loop count K=0 is out of range" in err and "unchanged" in err
    assert "loop off (the stock model)" in err
    assert "[K=2 euler/block [13, 17)]" in err and "[stock]" in err and "tok/s" in err
    answers = result.stdout.strip().splitlines()
    assert len(answers) == 2 and "Paris" in answers[0]
    assert answers[0] != answers[1]  # looped and stock answer differently (measured)
