"""Spread a model over machines with llama.cpp's RPC backend.

Each other machine runs llama.cpp's RPC server (``ggml-rpc-server``, built
with ``python -m loopcpp.build dev --rpc``); this process registers those servers
as devices, and ``n_gpu_layers`` layers are placed on them, split in
proportion to their memory. The loop runs where its layers are: the graph is
the same, only where each layer's tensors live changes.

llama-cpp-python 0.3.36 accepts an ``rpc_servers`` argument but ignores it;
``loopcpp.load(..., rpc_servers="host:port,...")`` registers the servers here.
"""

from __future__ import annotations

import ctypes
import socket
from collections.abc import Sequence
from pathlib import Path

BUILD_HINT = (
    "build llama.cpp with its RPC backend: `python -m loopcpp.build dev --rpc`, then run with "
    "LLAMA_CPP_LIB_PATH set to the folder it prints (or build the wheel with "
    "`python -m loopcpp.build wheel --install --cmake-arg=-DGGML_RPC=ON`)"
)

_registered: set[str] = set()


class RpcUnavailable(ImportError):
    """The loaded llama.cpp was built without the RPC backend."""


def parse_servers(servers: str | Sequence[str]) -> list[str]:
    """``"a:1,b:2"`` or ``["a:1", "b:2"]`` -> ``["a:1", "b:2"]``, each checked."""
    items = servers.split(",") if isinstance(servers, str) else list(servers)
    endpoints = [s.strip() for s in items if s.strip()]
    if not endpoints:
        raise ValueError("no RPC servers given: use HOST:PORT[,HOST:PORT...]")
    for endpoint in endpoints:
        host, sep, port = endpoint.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"RPC server {endpoint!r} is not HOST:PORT, e.g. 127.0.0.1:50052")
    return endpoints


def _check_reachable(endpoint: str, timeout: float = 5.0) -> None:
    host, _, port = endpoint.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise ConnectionError(
            f"could not reach an RPC server at {endpoint} ({e}): start it there with "
            "`ggml-rpc-server --host ADDRESS --port PORT`"
        ) from e


def _ggml() -> ctypes.CDLL:
    """libllama's handle: dlsym through it also finds its libggml's functions."""
    import llama_cpp.llama_cpp as raw

    lib = raw._lib
    lib.ggml_backend_reg_by_name.argtypes = [ctypes.c_char_p]
    lib.ggml_backend_reg_by_name.restype = ctypes.c_void_p
    lib.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    lib.ggml_backend_register.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_register.restype = None
    return lib


def supported() -> bool:
    """True when the loaded llama.cpp has the RPC backend."""
    import llama_cpp

    return bool(llama_cpp.llama_supports_rpc())


def add_servers(servers: str | Sequence[str]) -> list[str]:
    """Register RPC servers as devices of this process (once each); returns the new ones.

    Devices are process-wide: every model loaded afterwards with
    ``n_gpu_layers > 0`` places layers on them.
    """
    endpoints = parse_servers(servers)
    if not supported():
        raise RpcUnavailable(f"the loaded llama.cpp has no RPC backend: {BUILD_HINT}")
    lib = _ggml()
    reg = lib.ggml_backend_reg_by_name(b"RPC")
    fn = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_rpc_add_server") if reg else 0
    if not fn:
        raise RpcUnavailable(f"the RPC backend has no ggml_backend_rpc_add_server: {BUILD_HINT}")
    add_server = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)(fn)
    added = []
    for endpoint in endpoints:
        if endpoint in _registered:
            continue
        _check_reachable(endpoint)  # llama.cpp aborts the process on a refused connection
        server_reg = add_server(endpoint.encode())
        if not server_reg:
            raise ConnectionError(
                f"llama.cpp could not add the RPC server at {endpoint}: is it a "
                "ggml-rpc-server of the same llama.cpp version?"
            )
        lib.ggml_backend_register(server_reg)
        _registered.add(endpoint)
        added.append(endpoint)
    return added


#: The server's file name: ``ggml-rpc-server`` in this llama.cpp, ``rpc-server`` before.
SERVER_NAMES = ("ggml-rpc-server", "rpc-server")


def server_binary(lib_dir: str | Path | None = None) -> Path | None:
    """The RPC server next to a built libllama (the dev build's bin folder), if any."""
    if lib_dir is None:
        from loopcpp.build import cache_dir

        lib_dir = cache_dir() / "dev" / "llama.cpp" / "build" / "bin"
    for name in SERVER_NAMES:
        path = Path(lib_dir) / name
        if path.is_file():
            return path
    return None
