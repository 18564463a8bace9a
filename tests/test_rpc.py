"""A looped model spread over llama.cpp's RPC backend equals the local run.

Needs the dev build with RPC (``python -m loopcpp.build dev --rpc``: libllama
with GGML_RPC=ON and ``ggml-rpc-server``), built on first use. The server runs
on 127.0.0.1 in a subprocess; the looped SmolLM2 runs in another subprocess
(LLAMA_CPP_LIB_PATH must point at the RPC build before llama_cpp is imported),
first all on the local CPU, then with layers placed on the RPC device.

Compared: the logits of a one-batch prompt and of 4 greedy decode steps (which
read the KV cache, held on the RPC device for its layers), for two loops, with
all layers on the RPC device and with the window split between the devices.

Tolerance: the RPC device is a CPU backend in another process running the same
kernels; measured here, the logits are bit-identical (max diff 0.0). ATOL = 1e-4
(logits reach ~35) allows a server whose CPU picks other kernels, and is far
below the > 1e-1 that the loops change (checked too).
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
from conftest import free_port, stop_process

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
    loops = {
        "rk3-block": LoopConfig(13, 17, count=3, method="rk3"),
        "euler-layer-kvfirst": LoopConfig(12, 18, count=2, mode="layer", kv="first"),
    }

    def logits(loop, **extra):
        # the prompt in one batch, then N_DECODE greedy tokens one at a time (the KV cache)
        llm = loopcpp.load(path, loop=loop, **kw, **extra)
        tokens = llm.tokenize(prompt)
        llm.eval(tokens)
        rows = list(llm.scores[: len(tokens)])
        for _ in range(4):
            token = int(np.argmax(rows[-1]))
            llm.eval([token])
            rows.append(llm.scores[llm.n_tokens - 1])
        llm.close()
        return np.array(rows, dtype=np.float32)

    stock = logits(False)
    result = {}
    for name, loop in loops.items():
        local = logits(loop)
        # all layers on the RPC device; layers 16-29 and the output (the window straddles)
        for ngl in (-1, 15):
            remote = logits(loop, rpc_servers=endpoint, n_gpu_layers=ngl)
            result[f"{name} ngl={ngl}"] = float(np.abs(remote - local).max())
        result[f"{name} loop effect"] = float(np.abs(local - stock).max())
    print(json.dumps(result))
    """
)


def test_parse_servers() -> None:
    assert rpc.parse_servers("127.0.0.1:50052, 10.0.0.2:1") == ["127.0.0.1:50052", "10.0.0.2:1"]
    assert rpc.parse_servers(["[::1]:50052"]) == ["[::1]:50052"]
    for bad in ("", "localhost", "host:port", "host:70000", ":50052"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            rpc.parse_servers(bad)


def test_a_build_without_rpc_says_how_to_get_it() -> None:
    pytest.importorskip("llama_cpp")
    if rpc.supported():
        pytest.skip("the loaded llama.cpp has the RPC backend")
    with pytest.raises(rpc.RpcUnavailable, match=r"python -m loopcpp.build dev --rpc"):
        rpc.add_servers("127.0.0.1:50052")


def _env(lib_dir: Path) -> dict[str, str]:
    return {
        **os.environ,
        "LLAMA_CPP_LIB_PATH": str(lib_dir),
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
    }


@pytest.fixture(scope="module")
def rpc_server() -> Iterator[tuple[Path, str]]:
    binary = rpc.server_binary()
    if binary is None:
        # build it (several minutes the first time, then cached): libllama with GGML_RPC=ON,
        # ggml-rpc-server, and the tools tests/test_real_models.py uses from the same tree
        from loopcpp import build

        build.dev_lib(tools=True, rpc=True)
        binary = rpc.server_binary()
    assert binary is not None, "the RPC build did not produce ggml-rpc-server"
    port = free_port()
    proc = subprocess.Popen(
        [str(binary), "--host", "127.0.0.1", "--port", str(port), "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ggml-rpc-server exited with {proc.returncode}:\n{proc.stdout.read()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("ggml-rpc-server did not listen within 60 s")
                time.sleep(0.2)
        yield binary.parent, f"127.0.0.1:{port}"
    finally:
        stop_process(proc, timeout=10)


def test_looped_model_over_rpc_equals_local(
    rpc_server: tuple[Path, str], smollm2_path: Path
) -> None:
    lib_dir, endpoint = rpc_server
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(smollm2_path), endpoint],
        env=_env(lib_dir), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, diff in result.items():
        if name.endswith("loop effect"):
            assert diff > 1e-1, f"{name}: {diff} (is the loop on?)"
        else:
            assert diff <= ATOL, f"{name}: max |logit diff| {diff} > {ATOL} ({result})"


def test_an_unreachable_server_is_a_clear_error(rpc_server: tuple[Path, str]) -> None:
    lib_dir, _ = rpc_server
    # llama.cpp itself would abort the process on a refused connection
    code = (
        "from loopcpp import rpc\n"
        "try:\n"
        f"    rpc.add_servers('127.0.0.1:{free_port()}')\n"
        "except ConnectionError as e:\n"
        "    print(e)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=_env(lib_dir), capture_output=True, text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "could not reach an RPC server at 127.0.0.1:" in proc.stdout
    assert "ggml-rpc-server --host ADDRESS --port PORT" in proc.stdout
