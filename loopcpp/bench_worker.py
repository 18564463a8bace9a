"""The worker process of ``loopcpp bench``: one variant loaded, timed run by run.

:class:`Worker` starts ``python -m loopcpp.bench_worker SPEC`` with the
variant's library (``LLAMA_CPP_LIB_PATH``) and weights; the process loads the
model once, answers each "run" line on its stdin with the wall-clock and CPU
seconds of a prefill and a greedy decode and a digest of every logit row, and
"quit" with its state size, peak RSS and memory placement. The orchestration
(rounds, order, reloads) is :mod:`loopcpp.bench`, the statistics
:mod:`loopcpp.bench_stats`.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Variant:
    """One thing to measure: a library, a model file and kv overrides."""

    name: str
    lib: Path | None  # None: the installed llama-cpp-python's own library
    model: Path
    overrides: dict[str, int | str] = field(default_factory=dict)
    layer_evals: int | None = None  # per token, for the ideal time ratio (None: unknown)


_MARK = "@@loopcpp-bench "  # protocol lines; anything else a library prints is ignored


def _serve(spec: dict[str, Any]) -> None:
    """Runs inside the worker process: load once, then time a run per "run" line on stdin.

    Each run resets the context, evaluates the prompt in one batch and decodes
    greedily; it answers with wall-clock and CPU seconds of both phases and a
    digest of every logit row. "quit" answers with the state size and peak RSS.
    """
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(
        spec["model"],
        n_ctx=spec["n_ctx"],
        n_batch=spec["n_prompt"],
        n_ubatch=spec["n_prompt"],
        n_threads=spec["threads"],
        n_threads_batch=spec["threads"],
        verbose=False,
        seed=0,
        kv_overrides=spec["overrides"] or None,
        logits_all=False,
        use_mmap=spec["weights"] == "mmap",
    )
    vocab = llm.n_vocab()
    prompt = [(7 * i + 11) % (vocab - 100) + 50 for i in range(spec["n_prompt"])]
    llm.eval(prompt[:8])  # warm up

    def say(data: dict[str, Any]) -> None:
        print(_MARK + json.dumps(data), flush=True)

    def last_logits() -> np.ndarray:
        # llama-cpp-python keeps no scores without logits_all: read llama_get_logits
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,)).copy()

    say({"ready": True})
    for line in sys.stdin:
        if line.strip() != "run":
            break
        llm.reset()
        digest = hashlib.sha256()
        c0, t0 = time.process_time(), time.perf_counter()
        llm.eval(prompt)
        t1, c1 = time.perf_counter(), time.process_time()
        logits = last_logits()
        digest.update(logits.tobytes())
        # the decode clock leaves out the logits copy of the prompt's last token
        c2, t2 = time.process_time(), time.perf_counter()
        for _ in range(spec["n_decode"]):
            token = int(np.argmax(logits))
            llm.eval([token])
            logits = last_logits()
            digest.update(logits.tobytes())
        t3, c3 = time.perf_counter(), time.process_time()
        say({
            "prefill_s": t1 - t0, "decode_s": t3 - t2,
            "prefill_cpu_s": c1 - c0, "decode_cpu_s": c3 - c2,
            "logits_sha": digest.hexdigest(),
        })
    import llama_cpp

    say({
        "state_bytes": int(llama_cpp.llama_state_get_size(llm._ctx.ctx)),
        "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **_memory_facts(spec["model"]),
    })


def _memory_facts(path: str) -> dict[str, Any]:
    """Whether this process maps the file ``path``, and its MiB in transparent huge pages.

    Read from /proc/self/smaps; None where there is none (not Linux).
    """
    smaps = Path("/proc/self/smaps")
    if not smaps.exists():
        return {"model_mapped": None, "huge_mib": None, "libggml_cpu": None}
    real = os.path.realpath(path)
    mapped, huge_kib, ggml_cpu = False, 0, None
    for line in smaps.read_text().splitlines():
        fields = line.split()
        if fields and fields[0].count("-") == 1 and len(fields) >= 6:  # a mapping's header
            file = fields[-1]
            mapped = mapped or file == real
            if ggml_cpu is None and Path(file).name.startswith("libggml-cpu"):
                ggml_cpu = file
        elif line.startswith("AnonHugePages:"):
            huge_kib += int(fields[1])
    return {"model_mapped": mapped, "huge_mib": huge_kib / 1024, "libggml_cpu": ggml_cpu}


# how a worker holds the weights: read into huge pages, read into 4 KiB pages, or mapped
WEIGHTS = ("hugepages", "read", "mmap")


def library_dir(lib: Path | None) -> Path:
    """The folder of a variant's libllama: ``lib``, or the installed llama-cpp-python's."""
    if lib is not None:
        return lib
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("llama-cpp-python is not installed: run make setup")
    return Path(next(iter(spec.submodule_search_locations))) / "lib"


def worker_env(lib: Path | None, weights: str) -> dict[str, str]:
    """The environment of a worker: its library, and glibc's huge-page tunable if asked."""
    env = dict(os.environ)
    env.pop("LLAMA_CPP_LIB_PATH", None)
    if lib is not None:
        env["LLAMA_CPP_LIB_PATH"] = str(lib)
        # libllama finds libggml* through its build's absolute RUNPATH, which the
        # loader searches after LD_LIBRARY_PATH: this keeps a library folder whole
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            [str(lib), *([env["LD_LIBRARY_PATH"]] if env.get("LD_LIBRARY_PATH") else [])]
        )
    if weights == "hugepages":
        # glibc >= 2.35: madvise(MADV_HUGEPAGE) on malloc's mmapped chunks, which
        # hold the weights; the kernel's THP setting "madvise" or "always" grants them
        tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
        env["GLIBC_TUNABLES"] = ":".join([*tunables, "glibc.malloc.hugetlb=1"])
    return env


class Worker:
    """A process that keeps one variant loaded (its library, its model) and times runs.

    Keeping every variant resident lets runs of different variants alternate
    seconds apart, without a reload between them.
    """

    def __init__(self, v: Variant, n_prompt: int, n_decode: int, threads: int,
                 n_ctx: int | None = None, weights: str = "hugepages",
                 fresh_lib: bool = True) -> None:
        self.variant, self.n_prompt, self.n_decode = v, n_prompt, n_decode
        spec = {
            "model": str(v.model),
            "overrides": v.overrides,
            "n_prompt": n_prompt,
            "n_decode": n_decode,
            "threads": threads,
            "n_ctx": n_ctx or max(512, n_prompt + n_decode + 8),
            "weights": weights,
        }
        if weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
        lib = v.lib
        self._lib_copy: Path | None = None
        if fresh_lib:
            # the code is mapped from its files like a model: a fresh copy per process
            # draws its placement anew, as reading the weights does for them
            self._lib_copy = Path(tempfile.mkdtemp(prefix="loopcpp-bench-lib-"))
            lib = self._lib_copy / "lib"
            try:
                shutil.copytree(library_dir(v.lib), lib, symlinks=True)
            except BaseException:
                shutil.rmtree(self._lib_copy, ignore_errors=True)
                raise
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "loopcpp.bench_worker", json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True,
            env=worker_env(lib, weights),
        )
        try:
            self._read()  # ready
        except BaseException:
            self.kill()
            raise

    def _read(self) -> dict[str, Any]:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            if line.startswith(_MARK):
                return json.loads(line[len(_MARK):])
        self._proc.wait()
        self._stderr.seek(0)
        raise RuntimeError(f"benchmark of {self.variant.name} failed (exit status "
                           f"{self._proc.returncode}):\n{self._stderr.read()[-3000:]}")

    def _send(self, command: str) -> dict[str, Any]:
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(command + "\n")
            self._proc.stdin.flush()
        except BrokenPipeError:
            pass  # the process is gone: _read reports why
        return self._read()

    def run(self) -> dict[str, Any]:
        """One timed run: tokens per second (wall and CPU) and the logits digest."""
        out = self._send("run")
        return {
            "prefill_tps": self.n_prompt / out["prefill_s"],
            "decode_tps": self.n_decode / out["decode_s"],
            "prefill_cpu_tps": self.n_prompt / max(out["prefill_cpu_s"], 1e-9),
            "decode_cpu_tps": self.n_decode / max(out["decode_cpu_s"], 1e-9),
            "logits_sha": out["logits_sha"],
        }

    def close(self) -> dict[str, Any]:
        """Stop the process: its state size (KV cache + logits) and peak RSS."""
        try:
            return self._send("quit")
        finally:
            self.kill()

    def kill(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        self._stderr.close()
        if self._lib_copy is not None:
            shutil.rmtree(self._lib_copy, ignore_errors=True)


if __name__ == "__main__":
    _serve(json.loads(sys.argv[1]))
