"""A streaming terminal chat with a looped model (``loopcpp chat``).

The conversation goes through the model's own chat template
(``create_chat_completion(stream=True)``). Slash commands change the loop
between replies without reloading the weights (``llm.set_loop``):

    /loop                       show the loop
    /loop off                   the stock model
    /loop on                    back to the last loop that was on
    /loop k=3 method=rk3        change settings (several at once; every loop setting)
    /loop window=13:17          the window [13, 17)
    /loop recipe=paper          a preset (``loopcpp.config.RECIPES``)
    /reset   /help   /quit

Ctrl-C during a reply stops the reply: the part already shown stays in the
history (it is what the user saw; /reset clears it). Ctrl-C at the prompt only
prints a hint; Ctrl-D or /quit ends the chat.

Replies go to stdout; the prompt, status lines and messages go to stderr, so
``loopcpp chat MODEL < questions.txt > answers.txt`` keeps only the answers.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

from loopcpp.config import FIELDS, RECIPES, LoopConfig, LoopConfigError
from loopcpp.resolve import NO_LOOP, LoopRequest, request_keys, resolve


def _help() -> str:
    """The /help text: one line per row of FIELDS, the recipes and the depth rule."""
    rows = []
    for f in FIELDS:
        token, note = f.range_text(), ""
        if f.kind in (int, float):
            token = f.symbol or ("N" if f.kind is int else "X")
            has_range = f.lo is not None or f.hi is not None
            note = f"; {f.range_text()}" if has_range and f.name != "start" else ""
        elif len(token) > 24:
            token, note = "NAME", f": {', '.join(f.choices)}"
        names = " | ".join(f"{n}={token}" for n in (*f.aliases, f.name))
        rows.append(f"    {names:<28} {f.help}{note}")
    recipes = " | ".join(RECIPES)
    return "\n".join([
        "/loop                     show the loop in use",
        "/loop off                 run the stock model (also: /loop none)",
        "/loop on                  turn the last loop back on",
        "/loop KEY=VALUE ...       change the loop, several keys at once:",
        f"    {'window=A:B':<28} layers [A, B) (or start=A end=B)",
        *rows,
        f"    {'recipe=' + recipes:<28} a preset (the other keys change its fields)",
        f"    {'depth=D width=W':<28} move the window by the depth rule",
        "/reset                    forget the conversation",
        "/help                     this text",
        "/quit                     leave (also Ctrl-D); Ctrl-C stops a reply",
    ])


HELP = _help()
_OFF = ("off", "none", "stock")
_NO_WINDOW = "no loop to change yet: give the window too, e.g. /loop window=13:17 k=2"


class CommandError(ValueError):
    """A slash command that cannot be understood; the message says how to write it."""


@dataclass(frozen=True)
class Command:
    """One parsed slash command.

    ``kind`` is ``show``, ``set_loop``, ``reset``, ``help`` or ``quit``; for
    ``set_loop``, ``loop`` is the new loop (None: the stock model).
    """

    kind: str
    loop: LoopConfig | None = None


def loop_changes(args: list[str]) -> LoopRequest:
    """``["k=3", "window=13:17"]`` -> the request ``{"count": 3, "start": 13, "end": 17}``
    (the keys and values of ``config.FIELDS``, plus recipe, depth, width, window)."""
    raw: dict[str, str] = {}
    for arg in args:
        key, eq, value = arg.partition("=")
        key, value = key.strip().lower(), value.strip()
        if not eq or not value:
            raise CommandError(f"/loop {arg}: write settings as key=value, e.g. /loop k=3")
        if key not in request_keys():
            raise CommandError(
                f"/loop {key}=...: unknown setting; use {', '.join(request_keys())}"
            )
        raw[key] = value
    return LoopRequest.from_mapping(raw, text=True)


def parse_command(
    line: str,
    current: LoopConfig | None,
    last_on: LoopConfig | None = None,
    n_layer: int | None = None,
) -> Command:
    """Parse a line that starts with ``/``.

    ``current`` is the loop in use (None: stock), ``last_on`` the loop that
    ``/loop on`` restores and that settings apply to while the loop is off.
    ``n_layer`` is the model's layer count (for a recipe or the depth rule);
    the loop comes from :func:`loopcpp.resolve.resolve`, and ``llm.set_loop``
    checks it against the model.
    """
    words = line.strip().split()
    name = words[0].lower() if words else "/"
    args = words[1:]
    if name in ("/quit", "/exit", "/q"):
        return Command("quit")
    if name == "/reset":
        return Command("reset")
    if name in ("/help", "/?", "/h"):
        return Command("help")
    if name != "/loop":
        raise CommandError(f"unknown command {name}: type /help for the commands")
    if not args:
        return Command("show")
    if args[0].lower() in _OFF:
        if len(args) == 1:
            return Command("set_loop", None)
        request = loop_changes(args[1:])
        resolve(LoopRequest(request.settings, request.recipe, request.depth, request.width,
                            no_loop=True), n_layer or 1)  # refuses: off with settings
    base = current if current is not None else last_on
    if len(args) == 1 and args[0].lower() == "on":
        if last_on is None:
            raise CommandError(_NO_WINDOW)
        return Command("set_loop", last_on)
    request = loop_changes(args)
    if n_layer is None:  # no model to place a window on: the window must be given
        s = request.settings
        if base is None and not ("start" in s and "end" in s):
            raise CommandError(_NO_WINDOW)
        n_layer = max(base.end if base is not None else 0, s.get("end") or 0, 1)
        if request.recipe is not None or request.depth is not None or request.width is not None:
            raise CommandError("recipe, depth and width need the model's layer count: "
                               "give the window instead")
    return Command("set_loop", resolve(request, n_layer, base, "the loop in use").loop)


def cmd_is_loop(line: str) -> bool:
    return line.split(maxsplit=1)[0].lower() == "/loop"


def describe_loop(loop: LoopConfig | None) -> str:
    return f"loop {loop.describe()}" if loop is not None else f"loop {NO_LOOP}"


@dataclass
class Reply:
    """A streamed reply: ``seconds`` in all, ``first_seconds`` until its first token."""

    text: str
    n_tokens: int
    seconds: float
    first_seconds: float
    stopped: bool = False

    @property
    def tokens_per_second(self) -> float:
        """Generation speed: the tokens after the first over the time after it."""
        rest = self.seconds - self.first_seconds
        return (self.n_tokens - 1) / rest if self.n_tokens > 1 and rest > 0 else 0.0


@dataclass
class ChatSession:
    """The conversation and the loop of one chat; UI-free (see :func:`run_chat`)."""

    llm: Any
    system: str | None = None
    max_tokens: int = 512
    temperature: float = 0.0
    seed: int = 0
    history: list[dict[str, str]] = field(default_factory=list)
    last_on: LoopConfig | None = None

    def __post_init__(self) -> None:
        if self.last_on is None:
            self.last_on = self.llm.loop

    @property
    def loop(self) -> LoopConfig | None:
        return self.llm.loop  # type: ignore[no-any-return]

    @property
    def n_layer(self) -> int | None:
        gguf = getattr(self.llm, "gguf", None)
        return getattr(gguf, "n_layer", None)

    def set_loop(self, loop: LoopConfig | None) -> None:
        """Change the loop (no reload); an invalid loop raises and keeps the old one."""
        if loop == self.loop:
            return
        self.llm.set_loop(loop)
        if loop is not None:
            self.last_on = loop

    def reset(self) -> None:
        self.history.clear()

    def messages(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history

    def reply(self, user: str, write: Callable[[str], None]) -> Reply:
        """Stream the answer to ``user`` through ``write``; both join the history.

        Ctrl-C (KeyboardInterrupt) stops the reply: the partial text is kept
        (a reply stopped before its first token drops the question too) and
        ``Reply.stopped`` is set. A failed request (e.g. a full context) leaves
        the history as it was and re-raises.
        """
        self.history.append({"role": "user", "content": user})
        parts: list[str] = []
        stopped = False
        t0 = time.perf_counter()
        first = 0.0
        stream: Iterator[dict[str, Any]] | None = None
        try:
            stream = self.llm.create_chat_completion(
                messages=self.messages(),
                stream=True,
                max_tokens=self.max_tokens,
                temperature=self.temperature,
                seed=self.seed,
            )
            for chunk in stream:
                text = chunk["choices"][0]["delta"].get("content") or ""
                if text:
                    if not parts:
                        first = time.perf_counter() - t0
                    parts.append(text)
                    write(text)
        except KeyboardInterrupt:
            stopped = True
            # the interrupt may have landed between a decode and its bookkeeping:
            # re-evaluate the history next time rather than trust the cache
            self.llm.reset()
        except BaseException:
            self.history.pop()
            self.llm.reset()
            raise
        finally:
            if stream is not None and hasattr(stream, "close"):
                stream.close()
        seconds = time.perf_counter() - t0
        text = "".join(parts)
        if text or not stopped:
            self.history.append({"role": "assistant", "content": text})
        else:  # stopped before any text: as if the question had not been asked
            self.history.pop()
        n_tokens = len(self.llm.tokenize(text.encode(), add_bos=False)) if text else 0
        return Reply(text, n_tokens, seconds, first or seconds, stopped)


def context_full(e: Exception, llm: Any) -> str:
    """What overflowed and what to do, for a full context (else "")."""
    asked = re.search(r"Requested tokens \((\d+)\) exceed context window", str(e))
    if asked is None:
        return ""
    n_ctx = getattr(llm, "_n_ctx", None) or llm.n_ctx()
    return (
        f"the context is full: the conversation so far and this question need "
        f"{asked.group(1)} tokens, the context holds {n_ctx} (--ctx); the question was not "
        "sent. /reset starts a new conversation, or restart with a larger --ctx"
    )


def status_line(reply: Reply, loop: LoopConfig | None) -> str:
    loop_text = (
        f"K={loop.count} {loop.method}/{loop.mode} [{loop.start}, {loop.end})"
        if loop is not None else "stock"
    )
    stopped = " (stopped)" if reply.stopped else ""
    return (
        f"[{loop_text}] {reply.n_tokens} tokens{stopped} in {reply.seconds:.1f} s "
        f"(first after {reply.first_seconds:.1f} s), {reply.tokens_per_second:.1f} tok/s"
    )


def run_chat(
    session: ChatSession,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> None:
    """The read-reply loop until /quit or end of input."""
    from rich.console import Console
    from rich.text import Text

    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    err = Console(file=stderr or sys.stderr, highlight=False, soft_wrap=True)
    interactive = stdin is sys.stdin and stdin.isatty()  # input() reads sys.stdin
    if interactive:
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:  # pragma: no cover - platform without readline
            pass

    def dim(text: str) -> None:
        err.print(Text(text, style="dim"))

    def write(text: str) -> None:
        stdout.write(text)
        stdout.flush()

    dim(f"{describe_loop(session.loop)}; /help for commands, Ctrl-D to quit")
    while True:
        try:
            if interactive:
                line = input("> ")
            else:
                line = stdin.readline()
                if not line:
                    raise EOFError
        except EOFError:
            if interactive:
                err.print()
            return
        except KeyboardInterrupt:
            err.print()
            dim("(Ctrl-C stops a reply; /quit or Ctrl-D leaves)")
            continue
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            try:
                cmd = parse_command(line, session.loop, session.last_on, session.n_layer)
                if cmd.kind == "quit":
                    return
                if cmd.kind == "help":
                    err.print(HELP, markup=False)
                elif cmd.kind == "reset":
                    session.reset()
                    dim("conversation cleared")
                elif cmd.kind == "set_loop":
                    session.set_loop(cmd.loop)
                    dim(describe_loop(session.loop))
                else:
                    dim(describe_loop(session.loop))
            except (CommandError, LoopConfigError) as e:
                kept = f"; {describe_loop(session.loop)} unchanged" if cmd_is_loop(line) else ""
                err.print(f"error: {e}{kept}", markup=False)
            continue
        try:
            reply = session.reply(line, write)
        except ValueError as e:  # e.g. the context is full
            write("\n")
            full = context_full(e, session.llm)
            text = full or f"{e} (type /reset to start a new conversation)"
            err.print(f"error: {text}", markup=False)
            continue
        write("\n")
        dim(status_line(reply, session.loop))

