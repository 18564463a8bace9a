"""A looped model spread over llama.cpp's RPC backend equals the local run.

Needs the dev build with RPC (``python -m loopcpp.build dev --rpc``: libllama
with GGML_RPC=ON and ``rpc-server``); skipped without it. The rpc-server runs
on 127.0.0.1 in a subprocess; the looped SmolLM2 runs in another subprocess
(LLAMA_CPP_LIB_PATH must point at the RPC build before llama_cpp is imported),
first all on the local CPU, then with layers placed on the RPC device.

Tolerance: the RPC device is a CPU backend in another process running the same
kernels, so only the split of the graph between the two backends can change
float32 rounding; ATOL = 1e-4 (max abs logit, logits reach ~35) is far below
the > 1e-1 that the loop changes (checked too).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from loopcpp import rpc

REPO = Path(__file__).resolve().parents[1]
ATOL = 1e-4

# runs in a subprocess: argv = model, rpc endpoint; prints one JSON line
SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import loopcpp
    from loopcpp import LoopConfig

    path, endpoint = sys.argv[1], sys.argv[2]
    prompt = b"Tide pools along the rocky coast hold sea anemones, small crabs and fish."
    kw = dict(n_ctx=64, n_batch=64, n_ubatch=64, logits_all=True, n_threads=1,
              n_threads_batch=1, type_k=0, type_v=0)
    loop = LoopConfig(13, 17, count=3, method="rk3")

    def logits(**extra):
        llm = loopcpp.load(path, **kw, **extra)
        tokens = llm.tokenize(prompt)
        llm.eval(tokens)
        out = np.array(llm.scores[: len(tokens)], dtype=np.float32)
        llm.close()
        return out

    local = logits(loop=loop)
    stock = logits(loop=False)
    diff = {}
    for ngl in (-1, 15):  # all layers on the RPC device; layers 15-29 (the window straddles)
        remote = logits(loop=loop, rpc_servers=endpoint, n_gpu_layers=ngl)
        diff[str(ngl)] = float(np.abs(remote - local).max())
    print(json.dumps({"diff": diff, "loop_effect": float(np.abs(local - stock).max())}))
    """
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_parse_servers() -> None:
    assert rpc.parse_servers("127.0.0.1:50052, 10.0.0.2:1") == ["127.0.0.1:50052", "10.0.0.2:1"]
    assert rpc.parse_servers(["[::1]:50052"]) == ["[::1]:50052"]
    for bad in ("", "localhost", "host:port", "host:70000", ":50052"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            rpc.parse_servers(bad)


@pytest.fixture(scope="module")
def rpc_server() -> Iterator[tuple[Path, str]]:
    binary = rpc.server_binary()
    if binary is None:
        pytest.skip(
            "no RPC build of llama.cpp: run `python -m loopcpp.build dev --rpc` "
            "(several minutes of compiling) to build libllama with GGML_RPC=ON and rpc-server"
        )
    port = _free_port()
    proc = subprocess.Popen(
        [str(binary), "--host", "127.0.0.1", "--port", str(port), "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"rpc-server exited with {proc.returncode}:\n{proc.stdout.read()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("rpc-server did not listen within 60 s")
                time.sleep(0.2)
        yield binary.parent, f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_looped_model_over_rpc_equals_local(
    rpc_server: tuple[Path, str], smollm2_path: Path
) -> None:
    lib_dir, endpoint = rpc_server
    env = {
        **os.environ,
        "LLAMA_CPP_LIB_PATH": str(lib_dir),
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
    }
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(smollm2_path), endpoint],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["loop_effect"] > 1e-1  # the loop is on
    for ngl, diff in result["diff"].items():
        assert diff <= ATOL, f"n_gpu_layers={ngl}: max |logit diff| {diff} > {ATOL} ({result})"
