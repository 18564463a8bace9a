"""A 10-turn conversation over `loopcpp serve`'s API, with and without the prompt cache.

Starts ``python -m loopcpp serve MODEL [SERVE OPTIONS]`` on a free local port
and holds the same greedy conversation (fixed user turns, each reply appended
to the history) twice per repeat: "reuse", where each turn continues from the
cached prefix of the one before, and "cold", where every turn is sent with
``"cache_prompt": false``. Turn 1 is cold in both. The two modes alternate,
repeat by repeat, so a drift in machine speed touches both alike.

Per turn it prints the median request time (client side, whole reply), the
prompt tokens, how many of them the server evaluated (``x-loopcpp-prompt-
evaluated``) and the reply tokens, then the totals and the first turn whose
reply differs between the modes (a reused prefix's K/V were computed with the
earlier request's batch split, so a looped reply can differ from a cold one).

    .venv/bin/python scripts/serve_turns.py smollm2-135m-instruct -- --count 2 --threads 2
    .venv/bin/python scripts/serve_turns.py MODEL --repeats 3 --json out.json -- --no-loop
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TURNS = (
    "Hi! I am planning a small vegetable garden. What should I grow first?",
    "Which of those grow well in a shady spot?",
    "How often should I water them?",
    "What about in a very hot summer?",
    "Which pests should I watch out for?",
    "Is there a natural way to keep them away?",
    "Can I grow herbs next to the vegetables?",
    "Which herbs are the easiest for a beginner?",
    "How do I dry herbs to keep them for winter?",
    "Thanks! Can you sum up our plan in two sentences?",
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _post(url: str, body: dict[str, Any]) -> tuple[dict[str, str], dict[str, Any], float]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as resp:
        raw = resp.read()
        headers = dict(resp.headers)
    return headers, json.loads(raw), time.perf_counter() - t0


def conversation(base: str, reuse: bool, max_tokens: int) -> list[dict[str, Any]]:
    """One conversation; per turn: seconds, prompt/evaluated/cached/reply tokens, reply."""
    messages: list[dict[str, str]] = []
    rows = []
    for i, text in enumerate(TURNS):
        messages.append({"role": "user", "content": text})
        body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0,
                "cache_prompt": reuse and i > 0}
        headers, reply, seconds = _post(f"{base}/v1/chat/completions", body)
        content = reply["choices"][0]["message"]["content"]
        messages.append({"role": "assistant", "content": content})
        rows.append({
            "turn": i + 1, "seconds": seconds,
            "prompt_tokens": reply["usage"]["prompt_tokens"],
            "evaluated": int(headers["x-loopcpp-prompt-evaluated"]),
            "cached": int(headers["x-loopcpp-prompt-cached"]),
            "reply_tokens": reply["usage"]["completion_tokens"],
            "reply": content,
            "loop": headers["x-loopcpp-loop"],
        })
    return rows


def start_server(model: str, serve_args: list[str]) -> tuple[subprocess.Popen[str], str]:
    port = _free_port()
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH"))
                                         if p)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "loopcpp", "serve", model, "--host", "127.0.0.1",
         "--port", str(port), *serve_args],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}:\n{proc.stderr.read()}")
        try:
            with urllib.request.urlopen(f"{base}/loop", timeout=5):
                return proc, base
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise SystemExit("the server did not start within 300 s") from None
            time.sleep(0.3)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    serve_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, serve_args = argv[:cut], argv[cut + 1:]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 epilog="Options after -- go to `loopcpp serve`.")
    ap.add_argument("model", help="a bundled model name or a GGUF path")
    ap.add_argument("--repeats", type=int, default=3, help="conversations per mode [3]")
    ap.add_argument("--max-tokens", type=int, default=48, help="reply length cap [48]")
    ap.add_argument("--json", type=Path, help="also write every turn of every run here")
    args = ap.parse_args(argv)

    proc, base = start_server(args.model, serve_args)
    runs: dict[str, list[list[dict[str, Any]]]] = {"reuse": [], "cold": []}
    try:
        for r in range(args.repeats):
            for mode in (("reuse", "cold") if r % 2 == 0 else ("cold", "reuse")):
                runs[mode].append(conversation(base, mode == "reuse", args.max_tokens))
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    loop = runs["reuse"][0][0]["loop"]
    print(f"{args.model}; loop {loop}; serve {' '.join(serve_args) or '(defaults)'}; "
          f"{len(TURNS)} turns, replies up to {args.max_tokens} tokens, {args.repeats} "
          f"repeats per mode (median seconds)")
    print("| turn | reuse: s | prompt | evaluated | cold: s | prompt | evaluated |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    totals = {"reuse": 0.0, "cold": 0.0}
    evaluated = {"reuse": 0, "cold": 0}
    for i in range(len(TURNS)):
        cells = []
        for mode in ("reuse", "cold"):
            secs = statistics.median(run[i]["seconds"] for run in runs[mode])
            row = runs[mode][0][i]
            totals[mode] += secs
            evaluated[mode] += row["evaluated"]
            cells += [f"{secs:.2f}", str(row["prompt_tokens"]), str(row["evaluated"])]
        print(f"| {i + 1} | " + " | ".join(cells) + " |")
    print(f"| all | {totals['reuse']:.2f} | | {evaluated['reuse']} | {totals['cold']:.2f} | "
          f"| {evaluated['cold']} |")
    same = [a["reply"] == b["reply"] for a, b in zip(runs["reuse"][0], runs["cold"][0],
                                                       strict=True)]
    first = next((i + 1 for i, s in enumerate(same) if not s), None)
    repeatable = all([t["reply"] for t in run] == [t["reply"] for t in runs[mode][0]]
                     for mode in runs for run in runs[mode])
    print(f"speed-up over the conversation: {totals['cold'] / totals['reuse']:.2f}x; "
          f"prompt tokens evaluated: {evaluated['reuse']} with reuse, {evaluated['cold']} cold")
    print("replies identical in both modes" if first is None else
          f"replies identical up to turn {first - 1}; turn {first} differs (the reused "
          "prefix's batch split)")
    print("each mode gave the same replies in every repeat" if repeatable else
          "replies changed between repeats of a mode")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "serve_args": serve_args,
                                         "loop": loop, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
