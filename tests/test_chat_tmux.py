"""``loopcpp chat`` in a real terminal: tmux runs it, the test types and reads the pane.

Needs tmux (installed with apt-get when missing and possible; skipped otherwise),
the patched llama-cpp-python and the bundled SmolLM2.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require_patched

REPO = Path(__file__).resolve().parents[1]
#: One reply of at most N_TOKENS tokens; generous for a busy 2-core machine.
TIMEOUT_S = 120
N_TOKENS = 16
STATUS = re.compile(r"^\[(K=\d+ \w+/\w+ \[\d+, \d+\)|stock)\] \d+ tokens.* tok/s$", re.M)


def _tmux() -> str:
    found = shutil.which("tmux")
    if found:
        return found
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        pytest.skip("tmux is not installed and cannot be (no apt-get, or not root)")
    proc = subprocess.run(
        [apt, "install", "-y", "-q", "tmux"], capture_output=True, text=True, timeout=600
    )
    found = shutil.which("tmux")
    if proc.returncode != 0 or not found:
        pytest.skip(f"tmux is missing and `apt-get install tmux` failed: {proc.stderr[-300:]}")
    return found


class Pane:
    """A detached tmux session running one command."""

    def __init__(self, tmux: str, command: list[str], env: dict[str, str]) -> None:
        self.tmux = tmux
        self.name = f"loopcpp-test-{uuid.uuid4().hex[:8]}"
        shell = " ".join(subprocess.list2cmdline([c]) for c in command)
        # keep the pane after the command ends so its last output can still be read
        subprocess.run(
            [tmux, "new-session", "-d", "-s", self.name, "-x", "200", "-y", "60", shell],
            check=True, env=env,
        )
        subprocess.run([tmux, "set-option", "-t", self.name, "remain-on-exit", "on"])

    def send(self, text: str) -> None:
        subprocess.run([self.tmux, "send-keys", "-t", self.name, "-l", text], check=True)
        subprocess.run([self.tmux, "send-keys", "-t", self.name, "Enter"], check=True)

    def key(self, key: str) -> None:
        subprocess.run([self.tmux, "send-keys", "-t", self.name, key], check=True)

    def text(self) -> str:
        proc = subprocess.run(
            [self.tmux, "capture-pane", "-p", "-J", "-S", "-", "-t", self.name],
            capture_output=True, text=True, check=True,
        )
        return proc.stdout

    def wait_for(self, pattern: re.Pattern[str] | str, count: int = 1) -> str:
        """Poll the pane until ``pattern`` occurs ``count`` times; fail with the pane on timeout."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            text = self.text()
            if len(regex.findall(text)) >= count:
                return text
            if time.monotonic() > deadline:
                pytest.fail(f"no {regex.pattern!r} (x{count}) within {TIMEOUT_S} s; pane:\n{text}")
            time.sleep(0.3)

    def dead(self) -> bool:
        proc = subprocess.run(
            [self.tmux, "display-message", "-p", "-t", self.name, "#{pane_dead}"],
            capture_output=True, text=True,
        )
        return proc.returncode != 0 or proc.stdout.strip() == "1"

    def kill(self) -> None:
        subprocess.run([self.tmux, "kill-session", "-t", self.name], capture_output=True)


def _start_chat(max_tokens: int) -> Pane:
    require_patched()
    tmux = _tmux()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
    }
    return Pane(
        tmux,
        [sys.executable, "-m", "loopcpp", "chat", "smollm2-135m-instruct", "--count", "2",
         "-n", str(max_tokens), "--ctx", "1024", "--threads", "1"],
        env,
    )


@pytest.fixture
def chat_pane(smollm2_path: Path) -> Iterator[Pane]:
    pane = _start_chat(N_TOKENS)
    try:
        yield pane
    finally:
        pane.kill()


@pytest.fixture
def long_chat_pane(smollm2_path: Path) -> Iterator[Pane]:
    pane = _start_chat(600)
    try:
        yield pane
    finally:
        pane.kill()


def test_chat_in_tmux(chat_pane: Pane) -> None:
    pane = chat_pane
    pane.wait_for(r"Ctrl-D to quit")
    pane.key("C-c")  # at the prompt: a hint, not the end
    pane.wait_for(r"\(Ctrl-C stops a reply; /quit or Ctrl-D leaves\)")
    pane.send("What is the capital of France?")
    text = pane.wait_for(STATUS)
    assert "[K=2 euler/block [13, 17)]" in text
    assert "Paris" in text.split("What is the capital of France?", 1)[1]

    pane.send("/loop k=3 method=rk3")
    text = pane.wait_for(r"loop layers \[13, 17\) x K=3 rk3/block")
    pane.send("/loop k=100")
    text = pane.wait_for(r"K=100 is out of range.*K=3 rk3/block .*unchanged")

    pane.send("And of Italy?")
    text = pane.wait_for(STATUS, count=2)
    assert "[K=3 rk3/block [13, 17)]" in text
    reply = text.split("And of Italy?", 1)[1].split("[K=3 rk3/block", 1)[0]
    assert reply.strip(), text

    pane.send("/quit")
    deadline = time.monotonic() + 30
    while not pane.dead():
        assert time.monotonic() < deadline, f"chat did not exit after /quit:\n{pane.text()}"
        time.sleep(0.2)


def test_ctrl_c_stops_a_reply_not_the_chat(long_chat_pane: Pane) -> None:
    pane = long_chat_pane
    pane.wait_for(r"Ctrl-D to quit")
    pane.send("Write a long story about a dragon who learns to bake bread.")
    pane.wait_for(r"bread\.\n\S")  # the reply has started streaming
    pane.key("C-c")
    text = pane.wait_for(STATUS)
    assert "tokens (stopped)" in text, text
    assert not pane.dead()
    pane.send("/loop")  # still alive, and the loop is unchanged
    pane.wait_for(r"loop layers \[13, 17\) x K=2 euler/block", count=2)
    pane.send("/quit")
    deadline = time.monotonic() + 30
    while not pane.dead():
        assert time.monotonic() < deadline, f"chat did not exit after /quit:\n{pane.text()}"
        time.sleep(0.2)
