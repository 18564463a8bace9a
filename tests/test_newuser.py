"""What a new user trips over (issue 18): each defect through the interface it was found in.

CLI through click's CliRunner or a real ``python -m loopcpp`` process, the Python
API on the bundled SmolLM2, the server as a real process (as tests/test_serve.py).
"""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import pytest
from click.testing import CliRunner, Result
from conftest import (
    SLOW_CONVERT,
    assert_clean_error,
    assert_usage_error,
    http,
    repo_env,
    require_patched,
    serve_process,
    write_synthetic_gguf,
)

import loopcpp
from loopcpp.atomic import TEMP_SUFFIX
from loopcpp.cli import cli
from loopcpp.config import LoopConfig, LoopConfigError
from loopcpp.gguf_io import read_model

REPO = Path(__file__).resolve().parents[1]
ENV = repo_env()
LOOP = LoopConfig(13, 17, count=2)
U32 = gguf.GGUFValueType.UINT32


def run(*args: str | Path, **kwargs: Any) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], prog_name="loopcpp", **kwargs)


@pytest.fixture
def model16(tmp_path: Path) -> Path:
    return write_synthetic_gguf(tmp_path / "m16.gguf", n_layer=16)


# -- everyday commands -------------------------------------------------------------------


def test_version() -> None:
    for flag in ("--version", "-V"):
        result = run(flag)
        assert result.exit_code == 0 and result.output.strip() == f"loopcpp {loopcpp.__version__}"


def test_models_lists_the_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from loopcpp import models

    entries = models.load_manifest()
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))  # an empty cache: nothing fetched
    rows = json.loads(run("models", "--json").stdout)
    assert [r["name"] for r in rows] == list(entries)
    for r in rows:
        e = entries[r["name"]]
        assert (r["architecture"], r["n_layer"], r["size_bytes"]) == (
            e.architecture, e.n_layer, e.size)
        assert r["fetched"] is False
    # one "fetched": a file of the right size where the cache keeps it
    first = rows[0]["name"]
    path = models.model_path(first)
    path.parent.mkdir(parents=True)
    with path.open("wb") as f:
        f.truncate(entries[first].size)
    table = run("models")
    assert table.exit_code == 0
    lines = {line.split()[0]: line.split() for line in table.stdout.splitlines()[1:]}
    assert lines[first][-1] == "yes" and lines[rows[1]["name"]][-1] == "no"
    assert lines[first][1] == entries[first].architecture


def test_did_you_mean_for_a_mistyped_model_name() -> None:
    for command in (["info"], ["window"], ["generate", "-p", "hi"]):
        result = run(*command[:1], "smollm2-135m-instrct", *command[1:])
        assert_clean_error(result, "did you mean smollm2-135m-instruct?", "loopcpp models")


def test_window_json(model16: Path) -> None:
    text = run("window", model16).output
    facts = json.loads(run("window", model16, "--json").stdout)
    assert facts["n_layer"] == 16 and facts["width"] == facts["end"] - facts["start"]
    assert f"--start {facts['start']} --end {facts['end']}" in text
    assert_usage_error(run("window", model16, "--json", "--calibrate", "sciq"), "--json")


def test_build_subcommand_wraps_loopcpp_build() -> None:
    result = run("build", "--help")
    assert result.exit_code == 0
    assert "loopcpp build" in result.output and "wheel" in result.output
    assert "dev" in result.output
    assert run("build", "nonsense").exit_code == 2


def test_help_texts() -> None:
    top = run("--help").output
    assert "status 2" in top and "_LOOPCPP_COMPLETE=bash_source loopcpp" in top
    assert "The window the depth rule picks" in top and "MODEL,..." not in top
    gen = run("generate", "--help").output
    assert re.search(r"-n, --max-tokens INTEGER RANGE\s+Most tokens to generate", gen), gen
    assert "see below" not in run("bench", "--help").output


def test_readme_documents_completion_and_the_new_commands() -> None:
    readme = (REPO / "README.md").read_text()
    for fragment in ("_LOOPCPP_COMPLETE=", "loopcpp models", "loopcpp build", "--version"):
        assert fragment in readme


# -- usage errors: one exit status --------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["serve", "{m}", "--port", "70000"],
        ["serve", "{m}", "--port", "-1"],
        ["serve", "{m}", "--threads", "0"],
        ["chat", "{m}", "--ctx", "0"],
        ["generate", "{m}", "-p", "hi", "--ctx", "-5"],
        ["generate", "{m}", "-p", "hi", "--temp", "-1"],
        ["chat", "{m}", "--temp", "-1"],
        ["generate", "{m}", "-p", "hi", "-n", "0"],
        ["eval", "{m}", "--task", "sciq", "--threads", "0"],
        ["generate", "{m}", "-p", ""],
    ],
)
def test_out_of_range_values_are_usage_errors(model16: Path, args: list[str]) -> None:
    result = run(*(model16 if a == "{m}" else a for a in args))
    assert_usage_error(result, "Invalid value")


@pytest.mark.parametrize(
    ("item", "fragment"),
    [
        ("general.name", "KEY=TYPE:VALUE"),
        ("general.name=string:x", "KEY=TYPE:VALUE"),
        ("llama.context_length=int:many", "'many' is not a int"),
        ("tokenizer.ggml.add_bos_token=bool:yes", "write true or false"),
        ("loop.count=int:3", "use the loop options"),
    ],
)
def test_override_kv_refuses_bad_items(model16: Path, item: str, fragment: str) -> None:
    result = run("generate", model16, "-p", "hi", "--override-kv", item)
    assert_usage_error(result, fragment)


# -- info on a file with bad loop keys; unsupported architectures --------------------------


def test_info_shows_a_file_with_invalid_loop_keys(tmp_path: Path) -> None:
    bad = write_synthetic_gguf(tmp_path / "bad.gguf", n_layer=8, kv={
        "loop.start": (20, U32), "loop.end": (24, U32), "loop.count": (2, U32)})
    result = run("info", bad)
    assert result.exit_code == 0, result.output
    assert "architecture:  llama" in result.output and "layers:        8" in result.output
    assert "loop:          INVALID" in result.output and "invalid loop metadata" in result.output
    facts = json.loads(run("info", bad, "--json").stdout)
    assert facts["loop"] is None and "invalid loop metadata" in facts["loop_error"]
    assert facts["n_layer"] == 8


def test_convert_refuses_a_loop_on_an_unsupported_architecture(tmp_path: Path) -> None:
    src = write_synthetic_gguf(tmp_path / "kimi-k3.gguf", n_layer=8, arch="kimi-k3")
    out = tmp_path / "out.gguf"
    for window in ([], ["--start", "1", "--end", "2"]):
        result = run("convert", src, "-o", out, *window)
        assert_clean_error(result, "does not support architecture 'kimi-k3'", "--no-loop")
        assert not out.exists() and not list(tmp_path.glob(f".*{TEMP_SUFFIX}"))
    result = run("convert", src, "-o", out, "--no-loop")
    assert result.exit_code == 0, result.output
    assert read_model(out).loop is None


def test_unsupported_architecture_names_no_loop(tmp_path: Path) -> None:
    from loopcpp.api import check_loop

    m = read_model(write_synthetic_gguf(tmp_path / "kimi-k3.gguf", n_layer=8, arch="kimi-k3"))
    with pytest.raises(LoopConfigError, match="--no-loop"):
        check_loop(m, LoopConfig(1, 2))
    loop_file = write_synthetic_gguf(tmp_path / "kimi-k3-loop.gguf", n_layer=8, arch="kimi-k3", kv={
        "loop.start": (1, U32), "loop.end": (2, U32)})
    assert "--no-loop" in run("info", loop_file).output


# -- outputs: eval --json, convert killed -------------------------------------------------


def test_eval_json_is_checked_before_the_evaluation(model16: Path, tmp_path: Path) -> None:
    t0 = time.monotonic()
    missing = tmp_path / "nodir" / "x.json"
    assert_clean_error(run("eval", model16, "--task", "sciq", "--json", missing),
                       "does not exist")
    existing = tmp_path / "x.json"
    existing.write_text("keep")
    assert_clean_error(run("eval", model16, "--task", "sciq", "--json", existing), "--force")
    assert existing.read_text() == "keep"
    assert_usage_error(run("eval", model16, "--task", "sciq", "--json", tmp_path), "folder")
    # refused at once: nothing was loaded (model16 is not a runnable model) or evaluated
    assert time.monotonic() - t0 < 30


def test_compare_json_never_overwrites_an_input(tmp_path: Path) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text("{}")
    b.write_text("{}")
    assert_clean_error(run("compare", a, b, "--json", b), "output already exists")
    assert_clean_error(run("compare", a, b, "--json", b, "--force"), "output is the input")
    assert b.read_text() == "{}"


@pytest.mark.parametrize(("sig", "rc"), [(signal.SIGTERM, 128 + signal.SIGTERM),
                                         (signal.SIGINT, 1)])
def test_convert_killed_by_sigterm_or_sigint_leaves_no_temporary(
    smollm2_path: Path, tmp_path: Path, sig: signal.Signals, rc: int
) -> None:
    out = tmp_path / "out.gguf"
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_CONVERT, str(smollm2_path), str(out)],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    seen = False
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if any(p.stat().st_size > 4_000_000 for p in tmp_path.glob(f".*{TEMP_SUFFIX}")):
                seen = True
                break
            time.sleep(0.01)
        assert seen, f"no temporary file seen; output: {proc.communicate()[0]!r}"
        proc.send_signal(sig)
        output = proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == rc, output
    assert "Traceback" not in output
    assert not out.exists() and not list(tmp_path.glob(f".*{TEMP_SUFFIX}"))


def test_stale_temporaries_in_the_folder_are_swept_on_the_next_write(
    model16: Path, tmp_path: Path
) -> None:
    dead_pid = 2**22 + 12345  # above Linux's pid_max: no such process
    stale = tmp_path / f".killed.gguf.{dead_pid}.abc123{TEMP_SUFFIX}"
    stale.write_bytes(b"partial")
    result = run("convert", model16, "-o", tmp_path / "another.gguf")
    assert result.exit_code == 0, result.output
    assert not stale.exists()


def test_ctrl_c_while_starting_prints_no_traceback(tmp_path: Path) -> None:
    model = write_synthetic_gguf(tmp_path / "m.gguf", n_layer=8)
    # from the interpreter's own start-up time on (site and the editable install's .pth
    # finder, measured here: about 0.1 s on an idle machine, more under load): before that
    # Python itself prints a traceback for a Ctrl-C whatever the program does
    startup = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], env=ENV, check=True)
        startup = max(startup, time.perf_counter() - t0)
    for delay in (max(0.1, startup) + extra for extra in (0.0, 0.05, 0.1, 0.2)):
        proc = subprocess.Popen([sys.executable, "-m", "loopcpp", "info", str(model)],
                                env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert "Traceback" not in err and "KeyboardInterrupt" not in err, (delay, err)
        # 1: "Aborted!"; -SIGINT: ended by the signal the conventional way
        assert proc.returncode in (0, 1, -signal.SIGINT), (delay, proc.returncode, err)


# -- the real model: API ------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm(smollm2_path: Path) -> Any:
    require_patched()
    return loopcpp.load(smollm2_path, loop=LOOP, n_ctx=256, n_threads=1)


def _stream_text(stream: Any) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in stream)


MESSAGES = [{"role": "user", "content": "Name three fruits and their colours."}]


def test_set_loop_during_a_stream_is_refused_and_the_stream_stays_intact(llm: Any) -> None:
    llm.set_loop(LOOP)
    llm.reset()  # both replies from an empty cache (a reused prefix has another batch split)
    expected = _stream_text(llm.create_chat_completion(
        messages=MESSAGES, max_tokens=24, temperature=0, stream=True))
    llm.reset()
    stream = llm.create_chat_completion(messages=MESSAGES, max_tokens=24, temperature=0,
                                        stream=True)
    parts = []
    for i, chunk in enumerate(stream):
        parts.append(chunk["choices"][0]["delta"].get("content") or "")
        if i == 5:
            for loop in (LOOP, LOOP.with_(count=3), None):  # the same loop too
                with pytest.raises(LoopConfigError, match="a reply is being generated"):
                    llm.set_loop(loop)
    assert "".join(parts) == expected
    assert llm.loop == LOOP
    # a stream closed early frees the loop as well
    stream = llm.create_chat_completion(messages=MESSAGES, max_tokens=24, stream=True)
    next(iter(stream))
    stream.close()
    llm.set_loop(LOOP.with_(count=3))
    assert llm.loop == LOOP.with_(count=3)
    llm.set_loop(LOOP)


def test_set_loop_accepts_what_load_accepts(llm: Any) -> None:
    llm.set_loop(False)
    assert llm.loop is None
    for bad in (True, 3):
        with pytest.raises(LoopConfigError, match="loop must be a LoopConfig"):
            llm.set_loop(bad)
    with pytest.raises(LoopConfigError, match="unknown recipe 'rk3'"):
        llm.set_loop("rk3")
    assert llm.loop is None
    llm.set_loop(LOOP)
    assert llm.loop == LOOP
    llm.set_loop({"count": 3})  # a mapping changes the loop in use
    assert llm.loop == LOOP.with_(count=3)
    llm.set_loop("paper")  # a recipe, placed on this model's 30 layers
    assert llm.loop == LoopConfig.recipe("paper", 30)
    llm.set_loop(LOOP)


def test_empty_prompt_and_context_overflow_in_the_api(llm: Any, smollm2_path: Path) -> None:
    from loopcpp.api import ContextFullError

    with pytest.raises(ValueError, match="the prompt is empty"):
        llm.create_completion("", max_tokens=2)
    small = loopcpp.load(smollm2_path, loop=False, n_ctx=8, n_threads=1)
    with pytest.raises(ContextFullError, match=r"exceed context window of 8: .*larger n_ctx"):
        small.create_chat_completion(messages=[{"role": "user", "content": "hello there"}])


def test_chat_loop_change_after_a_stopped_reply(llm: Any) -> None:
    from loopcpp.chat import ChatSession

    session = ChatSession(llm, max_tokens=24)
    shown: list[str] = []

    def write(text: str) -> None:
        shown.append(text)
        if len(shown) == 3:
            raise KeyboardInterrupt  # Ctrl-C during the reply

    reply = session.reply("Name three fruits.", write)
    assert reply.stopped
    session.set_loop(LOOP.with_(count=3))  # /loop right after: the stream was closed
    assert session.loop == LOOP.with_(count=3)
    session.set_loop(LOOP)


# -- the real model: CLI ------------------------------------------------------------------


def test_generate_json(patched: None, smollm2_path: Path) -> None:
    args = ["generate", smollm2_path, "-p", "What is the capital of France?", "-n", "8",
            "--threads", "1", "--ctx", "256", "--count", "2"]
    plain = run(*args)
    assert plain.exit_code == 0, plain.output
    facts = json.loads(run(*args, "--json").stdout)
    assert facts["text"] == plain.stdout.strip()
    assert facts["loop"] == LOOP.to_dict() and facts["n_tokens"] > 0
    both = json.loads(run(*args, "--json", "--compare").stdout)
    assert both["looped"]["text"] == facts["text"] and both["stock"]["loop"] is None


def test_override_kv_reaches_llama_cpp(patched: None, smollm2_path: Path) -> None:
    args = ["generate", smollm2_path, "-p", "The capital of France is", "--raw", "-n", "6",
            "--threads", "1", "--ctx", "64", "--no-loop", "--json"]
    plain = json.loads(run(*args).stdout)["text"]
    result = run(*args, "--override-kv", "llama.attention.layer_norm_rms_epsilon=float:0.5")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["text"] != plain


def test_generate_context_overflow_and_empty_prompt(patched: None, smollm2_path: Path) -> None:
    result = run("generate", smollm2_path, "-p", "hello there", "--ctx", "8", "--threads", "1")
    assert_clean_error(result, "the context is full", "--ctx is 8", "larger --ctx")
    assert "broadcast" not in result.output
    assert_usage_error(run("generate", smollm2_path, "-p", "", "--raw"), "the prompt is empty")


def test_chat_context_overflow_says_what_to_do(patched: None, smollm2_path: Path) -> None:
    questions = "".join(f"Tell me a long story about the number {i}.\n" for i in range(4))
    result = run("chat", smollm2_path, "--ctx", "128", "-n", "40", "--threads", "1",
                 "--no-loop", input=questions)
    assert result.exit_code == 0, result.output
    assert "the context is full" in result.stderr and "/reset" in result.stderr
    assert "--ctx" in result.stderr and "broadcast" not in result.stderr


def test_progress_lines_when_stderr_is_not_a_terminal(
    patched: None, smollm2_path: Path, tmp_path: Path
) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    result = run("eval", smollm2_path, "--task", "ppl", "--text", text, "--ctx", "64",
                 "--limit", "3", "--threads", "1", "--no-loop")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("progress: ")]
    assert lines, result.stderr
    assert re.search(r"progress: \S+ 3/3 \(100 %\), \d+ s elapsed", lines[-1]), lines


# -- the real model: server ---------------------------------------------------------------


def _request(base: str, path: str, body: Any = None,
             headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    status, _, raw = http(base, path, body, headers)
    return status, raw


@pytest.fixture(scope="module")
def keyed_server(smollm2_path: Path) -> Iterator[str]:
    """A server with --api-key secret and --embedding."""
    with serve_process(smollm2_path, "--count", "2", "--ctx", "256", "--threads", "1",
                       "--api-key", "secret", "--embedding", "--alias", "smol") as base:
        yield base


AUTH = {"Authorization": "Bearer secret", "Content-Type": "application/json"}


def test_api_key_is_checked_before_the_loop(keyed_server: str) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            "loop": {"count": 0}}
    status, _ = _request(keyed_server, "/v1/chat/completions", body)
    assert status == 401
    status, _ = _request(keyed_server, "/v1/chat/completions", body,
                         {"Authorization": "Bearer wrong"})
    assert status == 401
    status, raw = _request(keyed_server, "/v1/chat/completions", body, AUTH)
    assert status == 400 and json.loads(raw)["error"]["param"] == "loop"


def test_embeddings_with_embedding_and_the_model_id(keyed_server: str) -> None:
    status, raw = _request(keyed_server, "/v1/embeddings", {"input": "hello"}, AUTH)
    assert status == 200, raw
    reply = json.loads(raw)
    assert reply["data"][0]["embedding"]
    status, raw = _request(keyed_server, "/v1/models", None, AUTH)
    model_id = json.loads(raw)["data"][0]["id"]
    assert model_id == "smol" and reply["model"] == model_id


def _readme_curl() -> list[str]:
    """The README's serve curl command, as a shell would split it."""
    text = (REPO / "README.md").read_text()
    block = text.split("### Serve (OpenAI-compatible)", 1)[1].split("```sh", 1)[1]
    block = block.split("```", 1)[0]
    lines = block.strip().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("curl "))
    command = "\n".join(lines[start:])
    return shlex.split(command, comments=True)


def test_readme_serve_example_verbatim(smollm2_path: Path) -> None:
    from test_serve import Client, server  # noqa: F401 - the shared served model

    argv = _readme_curl()
    assert argv[0] == "curl" and "localhost:8000/v1/chat/completions" in argv
    assert not any(a.lower().startswith("content-type") for a in argv)  # as written
