"""Make looped GGUF files: Hugging Face checkpoint or GGUF in, GGUF with ``loop.*`` out.

* ``hf_to_gguf`` runs llama.cpp's own ``convert_hf_to_gguf.py`` (the copy
  vendored in the llama.cpp source that loopcpp builds against).
* ``write_loop_metadata`` copies a GGUF, changing only the ``loop.*`` keys; every
  tensor byte is copied unchanged, whatever its quantization.
* ``convert`` does either or both, choosing the loop window with the
  depth-fraction rule (:mod:`loopcpp.window`) when none is given: K = 2,
  ``euler`` integrator, ``block`` mode, i.e. ``LoopConfig`` defaults.

Outputs appear atomically (temporary file next to the output, then a rename);
the input is never overwritten and an existing output only with ``force``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loopcpp.atomic import atomic_output, scratch_file
from loopcpp.config import GGUF_KEYS, LoopConfig
from loopcpp.gguf_io import (
    ModelFileError,
    TensorOut,
    check_output,
    check_readable,
    loop_kvs,
    read_model,
    rewrite_metadata,
    write_gguf,
)
from loopcpp.resolve import NO_LOOP, LoopRequest, resolve

#: ``--outtype`` values of the vendored convert_hf_to_gguf.py.
OUTTYPES = ("f32", "f16", "bf16", "q8_0", "tq1_0", "tq2_0", "auto")
DEFAULT_OUTTYPE = "f16"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ConvertError(ValueError):
    """A conversion that cannot be done; the message names the problem and the fix."""


def vendored_llama_cpp() -> Path:
    """The llama.cpp source tree whose converter and gguf-py loopcpp uses."""
    from loopcpp.build import vendored_llama_cpp as _vendored

    try:
        return Path(_vendored())
    except (OSError, RuntimeError, ValueError) as e:
        raise ConvertError(
            f"the llama.cpp source tree with the converter is unavailable ({e}): fetch it with "
            "`python -m loopcpp.build source`, then retry"
        ) from e


def converter_script() -> Path:
    script = vendored_llama_cpp() / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise ConvertError(
            f"llama.cpp's converter {script} is missing: fetch the llama.cpp source that "
            "loopcpp builds against (`loopcpp build source`), then retry"
        )
    return script


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def hf_to_gguf(
    src_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    outtype: str = DEFAULT_OUTTYPE,
    force: bool = False,
    extra_args: tuple[str, ...] = (),
) -> Path:
    """Convert a Hugging Face checkpoint folder to a GGUF with llama.cpp's converter.

    ``extra_args`` are further converter flags (e.g. ``--no-mtp``).
    """
    src = Path(src_dir)
    if not (src / "config.json").is_file():
        raise ModelFileError(
            f"{src}: not a Hugging Face checkpoint folder (no config.json): pass the folder "
            "holding config.json, the tokenizer and the *.safetensors weights"
        )
    if outtype not in OUTTYPES:
        raise ConvertError(f"unknown --outtype {outtype!r}: use one of {', '.join(OUTTYPES)}")
    out = check_output(src, out_path, force)
    with atomic_output(out) as tmp:
        _run_converter(src, tmp, outtype, extra_args)
    return out


#: Config fields the vendored converter reads by their transformers 4 names, which
#: transformers 5 moves into ``rope_parameters`` when it loads a config (AutoConfig drops
#: the old name): legacy name -> its key in ``rope_parameters``. GPT-NeoX (Pythia) reads
#: ``rotary_pct`` (a KeyError otherwise, for every real Pythia config.json too).
LEGACY_ROPE_FIELDS = {"rotary_pct": "partial_rotary_factor"}

#: ``python -c CONVERTER_MAIN SCRIPT LEGACY_JSON ARGS...``: llama.cpp's convert_hf_to_gguf.py
#: run as its own ``__main__``, unchanged, with the hparams it loads given back the legacy
#: names of LEGACY_ROPE_FIELDS (an existing field wins). Nothing is written to the source
#: folder, and the vendored tree is not edited.
CONVERTER_MAIN = """
import json, os, runpy, sys
script, legacy = sys.argv[1], json.loads(sys.argv[2])
sys.argv = [script, *sys.argv[3:]]
sys.path[0] = os.path.dirname(script)  # as when the script runs itself
from conversion.base import ModelBase
load = ModelBase.load_hparams

def load_hparams(*args, **kwargs):
    hparams = load(*args, **kwargs)
    rope = hparams.get("rope_parameters") if isinstance(hparams, dict) else None
    if isinstance(rope, dict):
        for old, key in legacy.items():
            if old not in hparams and key in rope:
                hparams[old] = rope[key]
    return hparams

ModelBase.load_hparams = staticmethod(load_hparams)
runpy.run_path(script, run_name="__main__")
"""


def _run_converter(src: Path, dest: Path, outtype: str, extra_args: tuple[str, ...] = ()) -> None:
    script = converter_script()
    env = dict(os.environ)
    gguf_py = str(script.parent / "gguf-py")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (gguf_py, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-c", CONVERTER_MAIN, str(script), json.dumps(LEGACY_ROPE_FIELDS),
           str(src), "--outfile", str(dest), "--outtype", outtype, *extra_args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ConvertError(
            f"llama.cpp's converter failed on {src} (exit {proc.returncode}):\n"
            f"{_tail(proc.stderr + proc.stdout)}\n"
            "Check that the architecture is one llama.cpp supports and that torch, "
            "transformers, sentencepiece and safetensors are installed."
        )
    try:
        read_model(dest)
    except ModelFileError as e:
        raise ConvertError(f"llama.cpp's converter wrote an unreadable GGUF: {e}") from e


def write_loop_metadata(
    src_gguf: str | os.PathLike[str],
    out_gguf: str | os.PathLike[str],
    loop: LoopConfig | None,
    force: bool = False,
) -> Path:
    """Copy a GGUF with its ``loop.*`` keys set to ``loop`` (removed when None).

    Other metadata keeps its exact bytes, tensor data is byte-identical.
    """
    model = read_model(src_gguf, ignore_loop=True)  # its loop keys are replaced
    if loop is not None:
        loop.check(model.n_layer)
    out = check_output(src_gguf, out_gguf, force)
    kvs = rewrite_metadata(
        model.file, loop_kvs(loop) if loop is not None else {}, drop=GGUF_KEYS.values()
    )
    tensors = [TensorOut(t.name, t) for t in model.file.tensors]
    write_gguf(model.file, out, kvs, tensors)
    return out


@dataclass(frozen=True)
class ConvertResult:
    """What ``convert`` wrote and why."""

    out: Path
    source: str  # "gguf" or "hf" (a local file or folder), or "hub" (downloaded)
    architecture: str
    n_layer: int
    loop: LoopConfig | None
    reason: str

    def summary(self) -> str:
        loop = self.loop.describe() if self.loop else NO_LOOP
        text = (
            f"wrote {self.out} ({self.architecture}, {self.n_layer} layers): {loop}\n"
            f"why:    {self.reason}"
        )
        note = unsupported_note(self.architecture)
        if self.loop is not None and note:
            text += f"\nwarning: {note}"
        return text


def unsupported_note(architecture: str) -> str:
    """Empty when the loop engine supports ``architecture``, else why a loop is refused."""
    from loopcpp.engine import SUPPORTED_ARCHS

    if architecture in SUPPORTED_ARCHS:
        return ""
    return (
        f"the loop engine does not support architecture '{architecture}' yet (supported: "
        f"{', '.join(SUPPORTED_ARCHS)}): loading this file with a loop will be refused; "
        "run it as the stock model with --no-loop"
    )


def _refuse_unsupported(src: Any, architecture: str, loop: LoopConfig | None) -> None:
    """A loop on an architecture the engine cannot loop is refused, not written."""
    note = unsupported_note(architecture)
    if loop is not None and note:
        raise ConvertError(
            f"{src}: not written: the loop engine does not support architecture "
            f"'{architecture}' (supported: {', '.join(_supported())}); give --no-loop to write "
            "it without loop keys (it then runs as the stock model)"
        )


def _supported() -> tuple[str, ...]:
    from loopcpp.engine import SUPPORTED_ARCHS

    return SUPPORTED_ARCHS


def loop_request(
    loop: LoopConfig | None = None,
    *,
    depth: float | None = None,
    width: int | None = None,
    options: Mapping[str, Any] | None = None,
    no_loop: bool = False,
    recipe: str | None = None,
) -> LoopRequest:
    """:func:`convert`'s keyword arguments as one request for :func:`loopcpp.resolve.resolve`
    (``loop`` counts as explicit settings: its window and every field)."""
    settings = {**(loop.to_dict() if loop is not None else {}), **dict(options or {})}
    return LoopRequest(settings, recipe=recipe, depth=depth, width=width, no_loop=no_loop)


def _chosen(request: LoopRequest, n_layer: int) -> tuple[LoopConfig | None, str]:
    """The loop to write and why: the one resolver, with no base (the keys are replaced)."""
    r = resolve(request, n_layer)
    if r.loop is None:
        return None, "loop removed as asked"
    return r.loop, r.source


def _hf_layers(folder: Path) -> int | None:
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for c in (cfg, cfg.get("text_config") or {}):
        n = c.get("num_hidden_layers") if isinstance(c, dict) else None
        if isinstance(n, int) and n > 0:
            return n
    return None


def _snapshot(repo_id: str) -> Path:
    try:
        from loopcpp.hub import snapshot  # type: ignore[attr-defined]
    except ImportError as e:
        raise ConvertError(
            f"{repo_id}: not a local file or folder, and hub downloads are unavailable "
            f"({e}): download the checkpoint and pass its folder"
        ) from e
    return Path(snapshot(repo_id))


def _resolve_source(src: str | os.PathLike[str]) -> tuple[str, Path, str]:
    """``(format, local path, origin)``: format "gguf" or "hf", origin "local" or "hub"."""
    p = Path(src)
    origin = "local"
    if not p.exists():
        text = str(src)
        if _HUB_ID.match(text) and not text.lower().endswith(".gguf"):
            p, origin = _snapshot(text), "hub"
        else:
            check_readable(p)  # raises the "no such file" error
    if p.is_dir():
        if (p / "config.json").is_file():
            return "hf", p, origin
        ggufs = sorted(p.glob("*.gguf"))
        if origin == "hub" and len(ggufs) == 1:
            return "gguf", check_readable(ggufs[0]), origin
        hint = (
            f"it holds GGUF files ({', '.join(g.name for g in ggufs[:5])}): pass one of them"
            if ggufs
            else "pass a GGUF file or a folder with config.json and *.safetensors"
        )
        raise ModelFileError(f"{p}: not a Hugging Face checkpoint (no config.json); {hint}")
    return "gguf", check_readable(p), origin


def convert(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    outtype: str | None = None,
    loop: LoopConfig | None = None,
    force: bool = False,
    *,
    depth: float | None = None,
    width: int | None = None,
    options: Mapping[str, Any] | None = None,
    no_loop: bool = False,
    log: Callable[[str], None] | None = None,
    recipe: str | None = None,
    request: LoopRequest | None = None,
) -> ConvertResult:
    """Write ``out``: ``src`` (HF folder, hub id or GGUF) as a GGUF with loop metadata.

    Without ``loop`` the depth-fraction rule chooses the window (``depth``,
    ``width``) and ``options`` the other settings (default K=2 euler block).
    ``outtype`` applies to Hugging Face sources only (default f16); GGUF tensors
    are copied as they are.  ``log`` receives progress lines of slow steps.
    """
    say = log or (lambda _msg: None)
    if request is None:
        request = loop_request(loop, depth=depth, width=width, options=options,
                               no_loop=no_loop, recipe=recipe)
    if outtype is not None and outtype not in OUTTYPES:
        raise ConvertError(f"unknown --outtype {outtype!r}: use one of {', '.join(OUTTYPES)}")
    check_output(src, out, force)  # before any download or conversion
    if not Path(src).exists():
        say(f"looking up {src} on the Hugging Face hub ...")
    fmt, path, origin = _resolve_source(src)
    source = "hub" if origin == "hub" else fmt
    out_p = Path(out)
    if fmt == "gguf":
        if outtype is not None:
            raise ConvertError(
                f"--outtype {outtype} applies to Hugging Face checkpoints only: a GGUF is copied "
                "with its tensors unchanged (requantize with llama.cpp's llama-quantize)"
            )
        check_output(path, out_p, force)
        model = read_model(path, ignore_loop=True)  # its loop keys are replaced
        chosen, reason = _chosen(request, model.n_layer)
        _refuse_unsupported(src, model.architecture, chosen)
        write_loop_metadata(path, out_p, chosen, force=True)
        return ConvertResult(out_p, source, model.architecture, model.n_layer, chosen, reason)

    outtype = DEFAULT_OUTTYPE if outtype is None else outtype
    check_output(path, out_p, force)
    n_hf = _hf_layers(path)
    if n_hf is not None:  # fail fast on a bad window, before the slow conversion
        _chosen(request, n_hf)
    with scratch_file(out_p) as stage:  # the plain conversion, removed afterwards
        say(f"converting {path} to {outtype} GGUF with llama.cpp's convert_hf_to_gguf.py ...")
        _run_converter(path, stage, outtype)
        model = read_model(stage)
        chosen, reason = _chosen(request, model.n_layer)
        _refuse_unsupported(src, model.architecture, chosen)
        write_loop_metadata(stage, out_p, chosen, force=True)
    return ConvertResult(out_p, source, model.architecture, model.n_layer, chosen, reason)
