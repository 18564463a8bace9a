"""GGUF metadata reading, loop metadata rewriting and ``convert`` (loopcpp.convert, gguf_io)."""

from __future__ import annotations

import filecmp
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from conftest import SLOW_CONVERT, is_patched, llama_logits, write_synthetic_gguf

from loopcpp.atomic import TEMP_SUFFIX, remove_stale_temps
from loopcpp.config import GGUF_KEYS, LoopConfig, LoopConfigError
from loopcpp.convert import ConvertError, convert, write_loop_metadata
from loopcpp.gguf_io import ModelFileError, read_gguf, read_model

REPO = Path(__file__).resolve().parents[1]
U32, STR = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.STRING


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def raw_field_bytes(f: gguf.ReaderField) -> bytes:
    return b"".join(part.tobytes() for part in f.parts)


def stored_kv_count(path: Path) -> int:
    return int(gguf.GGUFReader(path).fields["GGUF.kv_count"].contents())


def tensor_digests(path: Path) -> list[tuple[str, int, tuple[int, ...], str]]:
    """(name, type, shape, sha256 of the data) of every tensor, read straight from the file."""
    out = []
    with path.open("rb") as fh:
        for t in read_gguf(path).tensors:
            fh.seek(t.data_offset)
            data = fh.read(t.n_bytes)
            assert len(data) == t.n_bytes
            out.append((t.name, t.tensor_type, t.shape, hashlib.sha256(data).hexdigest()))
    return out


def assert_same_tensors(a: Path, b: Path) -> None:
    assert tensor_digests(a) == tensor_digests(b)


def no_temps(folder: Path) -> bool:
    return not list(folder.glob(f"*{TEMP_SUFFIX}"))


LOOP = LoopConfig(
    start=13,
    end=17,
    count=3,
    mode="layer",
    method="rk3",
    kv="first",
    routing="fresh",
    apply="prefill",
)


@pytest.fixture(scope="module")
def looped_smollm2(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("looped") / "smollm2-loop.gguf"
    write_loop_metadata(smollm2_path, out, LOOP)
    return out


# -- loop metadata on the real Q4_1 model ----------------------------------------


def test_loop_metadata_written_exactly(smollm2_path: Path, looped_smollm2: Path) -> None:
    model = read_model(looped_smollm2)
    assert (model.architecture, model.n_layer) == ("llama", 30)
    assert model.loop == LOOP
    assert_same_tensors(smollm2_path, looped_smollm2)
    # checked with the reference reader: types, values, untouched fields, kv count
    src, out = gguf.GGUFReader(smollm2_path), gguf.GGUFReader(looped_smollm2)
    for name in ("start", "end", "count"):
        assert out.fields[GGUF_KEYS[name]].types == [U32]
    for name in ("mode", "method", "kv", "routing", "apply"):
        assert out.fields[GGUF_KEYS[name]].types == [STR]
    assert out.fields["loop.method"].contents() == "rk3"
    assert out.fields["loop.end"].contents() == 17
    kept = [k for k in out.fields if not k.startswith(("loop.", "GGUF."))]
    assert kept == [k for k in src.fields if not k.startswith("GGUF.")]
    for k in kept:
        assert raw_field_bytes(out.fields[k]) == raw_field_bytes(src.fields[k]), k
    n_kv = int(out.fields["GGUF.kv_count"].contents())
    assert n_kv == len([k for k in out.fields if not k.startswith("GGUF.")])
    assert any(t.tensor_type == gguf.GGMLQuantizationType.Q4_1 for t in out.tensors)
    for ta, tb in zip(src.tensors, out.tensors, strict=True):
        assert np.array_equal(ta.data.view(np.uint8), tb.data.view(np.uint8)), ta.name


def test_removing_the_loop_restores_the_original_bytes(
    smollm2_path: Path, looped_smollm2: Path, tmp_path: Path
) -> None:
    out = write_loop_metadata(looped_smollm2, tmp_path / "plain.gguf", None)
    assert filecmp.cmp(out, smollm2_path, shallow=False)
    assert read_model(out).loop is None


def test_looped_file_in_llama_cpp(
    stock_llama: Any, smollm2_path: Path, looped_smollm2: Path
) -> None:
    n0, ref = llama_logits(stock_llama, smollm2_path)
    n1, got = llama_logits(stock_llama, looped_smollm2)
    assert n0 == n1 == 30
    if not is_patched(stock_llama):
        # stock llama.cpp ignores the loop.* keys: same model, same logits
        assert np.array_equal(ref, got)
        return
    # the loop engine runs the loop read from the metadata, exactly as the same
    # loop given as load-time overrides of the plain file
    assert np.isfinite(got).all() and not np.array_equal(ref, got)
    _, overridden = llama_logits(stock_llama, smollm2_path, kv_overrides=LOOP.to_kv_overrides())
    assert np.array_equal(got, overridden)


@pytest.mark.slow
def test_q4_k_tensors_are_copied_exactly(gemma3_path: Path, tmp_path: Path) -> None:
    out = write_loop_metadata(gemma3_path, tmp_path / "g.gguf", LoopConfig(7, 10, 2))
    types = {t.tensor_type for t in gguf.GGUFReader(out).tensors}
    assert gguf.GGMLQuantizationType.Q4_K in types
    assert_same_tensors(gemma3_path, out)
    assert read_model(out).loop == LoopConfig(7, 10, 2)


# -- replacing metadata, convert() on GGUF sources -------------------------------


def test_replacing_a_loop(synthetic_gguf: Any, tmp_path: Path) -> None:
    src = synthetic_gguf(n_layer=16)
    first = write_loop_metadata(src, tmp_path / "a.gguf", LoopConfig(2, 5, 4, method="naive"))
    second = write_loop_metadata(first, tmp_path / "b.gguf", LoopConfig(6, 8, 2))
    model = read_model(second)
    assert model.loop == LoopConfig(6, 8, 2)
    assert stored_kv_count(second) == len(model.file.fields)
    assert_same_tensors(src, second)


def test_convert_gguf_applies_the_depth_rule(smollm2_path: Path, tmp_path: Path) -> None:
    result = convert(smollm2_path, tmp_path / "out.gguf")
    assert result.loop == LoopConfig(13, 17, 2, mode="block", method="euler")
    assert result.source == "gguf" and result.n_layer == 30
    assert "30/8 = 3.75, rounded to 4" in result.reason and "[13, 17)" in result.summary()
    assert read_model(result.out).loop == result.loop


def test_convert_rule_with_options(synthetic_gguf: Any, tmp_path: Path) -> None:
    src = synthetic_gguf(n_layer=16)
    r = convert(src, tmp_path / "o.gguf", options={"count": 3, "method": "rk3"}, depth=0.6)
    assert r.loop == LoopConfig(9, 11, 3, method="rk3")
    r = convert(src, tmp_path / "w.gguf", width=5)
    assert (r.loop.start, r.loop.end) == (6, 11)


def test_convert_explicit_loop_and_no_loop(synthetic_gguf: Any, tmp_path: Path) -> None:
    src = synthetic_gguf(n_layer=16)
    looped = convert(src, tmp_path / "l.gguf", loop=LoopConfig(0, 16, 5)).out
    assert read_model(looped).loop == LoopConfig(0, 16, 5)
    plain = convert(looped, tmp_path / "p.gguf", no_loop=True).out
    assert filecmp.cmp(plain, src, shallow=False)
    with pytest.raises(LoopConfigError, match="not both"):
        convert(src, tmp_path / "x.gguf", loop=LoopConfig(1, 2), depth=0.5)


def test_window_out_of_range_writes_nothing(synthetic_gguf: Any, tmp_path: Path) -> None:
    src = synthetic_gguf(n_layer=6)
    out = tmp_path / "bad.gguf"
    with pytest.raises(LoopConfigError, match=r"\[4, 7\) is out of range .* 6 layers"):
        convert(src, out, loop=LoopConfig(4, 7))
    with pytest.raises(LoopConfigError, match="width 7"):
        convert(src, out, width=7)
    assert not out.exists() and no_temps(tmp_path)


def test_refuses_to_overwrite_without_force(synthetic_gguf: Any, tmp_path: Path) -> None:
    src = synthetic_gguf()
    out = tmp_path / "out.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(ModelFileError, match="already exists: pass --force"):
        convert(src, out)
    assert out.read_bytes() == b"keep me"
    convert(src, out, force=True)
    assert read_model(out).loop is not None
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # not the temp file's 0600


def test_never_overwrites_the_input(synthetic_gguf: Any, tmp_path: Path) -> None:
    src = synthetic_gguf()
    digest = sha256(src)
    link = tmp_path / "link.gguf"
    link.symlink_to(src)
    hard = tmp_path / "hard.gguf"
    os.link(src, hard)
    for out in (src, link, hard, tmp_path / "." / src.name):
        with pytest.raises(ModelFileError, match="output is the input"):
            convert(src, out, force=True)
        with pytest.raises(ModelFileError, match="output is the input"):
            write_loop_metadata(src, out, None, force=True)
    assert sha256(src) == digest and no_temps(tmp_path)


def test_outtype_applies_to_hf_only(synthetic_gguf: Any, tmp_path: Path) -> None:
    with pytest.raises(ConvertError, match="llama-quantize"):
        convert(synthetic_gguf(), tmp_path / "o.gguf", outtype="q8_0")


def test_output_folder_must_exist(synthetic_gguf: Any, tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="does not exist: create it"):
        convert(synthetic_gguf(), tmp_path / "nope" / "o.gguf")
    with pytest.raises(ModelFileError, match="is a directory"):
        convert(synthetic_gguf(), tmp_path)


# -- unusable inputs -------------------------------------------------------------


def _bad_inputs(tmp_path: Path, smollm2_path: Path) -> dict[str, tuple[Path, str]]:
    text = tmp_path / "notes.gguf"
    text.write_text("hello\n")
    empty = tmp_path / "empty.gguf"
    empty.touch()
    truncated = tmp_path / "truncated.gguf"
    with smollm2_path.open("rb") as fh, truncated.open("wb") as out:
        out.write(fh.read(smollm2_path.stat().st_size // 2))
    head_only = tmp_path / "head.gguf"
    with smollm2_path.open("rb") as fh, head_only.open("wb") as out:
        out.write(fh.read(100_000))
    folder = tmp_path / "folder"
    folder.mkdir()
    return {
        "missing": (tmp_path / "missing.gguf", "no such file"),
        "directory": (folder, "is a directory"),
        "text": (text, "not a GGUF file"),
        "empty": (empty, "is empty"),
        "truncated data": (truncated, "truncated GGUF file"),
        "truncated metadata": (head_only, "truncated GGUF file"),
    }


def test_unusable_inputs_give_clear_errors(tmp_path: Path, smollm2_path: Path) -> None:
    for what, (path, problem) in _bad_inputs(tmp_path, smollm2_path).items():
        with pytest.raises(ModelFileError) as info:
            read_model(path)
        msg = str(info.value)
        assert str(path) in msg and problem in msg, what
        assert ":" in msg.split(problem, 1)[1], f"{what}: no fix in {msg!r}"
        with pytest.raises(ModelFileError):
            write_loop_metadata(path, tmp_path / "out.gguf", None)
    assert not (tmp_path / "out.gguf").exists()


def test_every_truncation_is_a_model_file_error(tmp_path: Path) -> None:
    src = write_synthetic_gguf(tmp_path / "m.gguf", n_layer=2)
    data = src.read_bytes()
    cut = tmp_path / "cut.gguf"
    for n in [*range(1, 400, 7), *range(400, len(data), 97), len(data) - 1]:
        cut.write_bytes(data[:n])
        with pytest.raises(ModelFileError, match="cut.gguf"):
            read_model(cut)


def test_bad_loop_metadata_in_a_file(tmp_path: Path) -> None:
    partial = write_synthetic_gguf(tmp_path / "p.gguf", kv={"loop.start": (1, U32)})
    with pytest.raises(ModelFileError, match="incomplete.*loop.end"):
        read_model(partial)
    wide = write_synthetic_gguf(
        tmp_path / "w.gguf",
        kv={"loop.start": (2, U32), "loop.end": (9, U32), "loop.count": (2, U32)},
    )
    with pytest.raises(ModelFileError, match=r"out of range .*--no-loop"):
        read_model(wide)
    typo = write_synthetic_gguf(
        tmp_path / "t.gguf",
        kv={
            "loop.start": (2, U32),
            "loop.end": (3, U32),
            "loop.count": (2, U32),
            "loop.method": ("simpson", STR),
        },
    )
    with pytest.raises(ModelFileError, match="unknown loop method 'simpson'"):
        read_model(typo)
    # a bad loop can still be replaced
    fixed = write_loop_metadata(
        write_synthetic_gguf(tmp_path / "ok.gguf"), tmp_path / "fixed.gguf", LoopConfig(1, 2)
    )
    assert read_model(fixed).loop == LoopConfig(1, 2)


def test_no_architecture_or_block_count(tmp_path: Path) -> None:
    path = tmp_path / "noblocks.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("x", np.zeros(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelFileError, match="llama.block_count"):
        read_model(path)


# -- atomic writes ---------------------------------------------------------------


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path: Path) -> None:
    out = tmp_path / "m.gguf"
    dead = tmp_path / f".m.gguf.{2**22 + 12345}.x1{TEMP_SUFFIX}"
    alive = tmp_path / f".m.gguf.{os.getpid()}.x2{TEMP_SUFFIX}"
    other = tmp_path / f".n.gguf.{2**22 + 12345}.x3{TEMP_SUFFIX}"
    for p in (dead, alive, other):
        p.write_bytes(b"partial")
    # every dead process's temporary in the folder goes, not only those of this output
    assert sorted(remove_stale_temps(out)) == sorted([dead, other])
    assert alive.exists() and not other.exists() and not dead.exists()


def test_sigkill_mid_write_leaves_input_intact_and_no_output(
    smollm2_path: Path, tmp_path: Path
) -> None:
    src = tmp_path / "in.gguf"
    shutil.copyfile(smollm2_path, src)
    digest = sha256(src)
    out = tmp_path / "out.gguf"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_CONVERT, str(src), str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    partial: list[Path] = []
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            partial = [
                p
                for p in tmp_path.glob(f".out.gguf.*{TEMP_SUFFIX}")
                if p.stat().st_size > 8_000_000
            ]
            if partial:
                break
            time.sleep(0.01)
        assert partial, f"no temporary file seen; output: {proc.communicate()[0]!r}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    assert sha256(src) == digest
    assert partial[0].exists()  # SIGKILL leaves the temporary; the next write removes it
    convert(src, out)
    assert no_temps(tmp_path)
    assert read_model(out).loop == LoopConfig(13, 17, 2)


# -- Hugging Face and hub sources ------------------------------------------------


def test_hf_source_errors(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    with pytest.raises(ModelFileError, match="no config.json"):
        convert(folder, tmp_path / "o.gguf")
    (folder / "config.json").write_text('{"num_hidden_layers": 4}')
    with pytest.raises(ConvertError, match="unknown --outtype 'q4_0'"):
        convert(folder, tmp_path / "o.gguf", outtype="q4_0")
    # the window is checked against config.json before the (slow) conversion
    with pytest.raises(LoopConfigError, match="4 layers"):
        convert(folder, tmp_path / "o.gguf", loop=LoopConfig(2, 6))
    assert not (tmp_path / "o.gguf").exists() and no_temps(tmp_path)


def test_hf_conversion_failure_is_reported(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text('{"architectures": ["NoSuchForCausalLM"]}')
    lines: list[str] = []
    with pytest.raises(ConvertError, match="converter failed"):
        convert(folder, tmp_path / "o.gguf", log=lines.append)
    assert len(lines) == 1 and "convert_hf_to_gguf.py" in lines[0]
    assert not (tmp_path / "o.gguf").exists() and no_temps(tmp_path)


def test_hf_checkpoint_to_looped_gguf(tmp_path: Path) -> None:
    tiny = pytest.importorskip("loopcpp.tiny")
    hf_dir, reference = tiny.tiny_checkpoint("llama")
    result = convert(
        hf_dir, tmp_path / "tiny.gguf", outtype="f32", loop=LoopConfig(1, 3, 2, method="rk3")
    )
    assert result.source == "hf" and result.n_layer == 4
    model = read_model(result.out)
    assert model.loop == LoopConfig(1, 3, 2, method="rk3")
    assert_same_tensors(reference, result.out)
    assert no_temps(tmp_path)


def test_pythia_config_converts(tmp_path: Path) -> None:
    """A GPT-NeoX checkpoint with Pythia's own config.json (rotary_pct, rotary_emb_base).

    transformers 5 loads rotary_pct into rope_parameters and drops the name, which the
    vendored converter reads (a KeyError); loopcpp's converter run gives it back. The
    source folder is left as it was.
    """
    tiny = pytest.importorskip("loopcpp.tiny")
    hf_dir, reference = tiny.tiny_checkpoint("gptneox")
    src = tmp_path / "pythia"
    shutil.copytree(hf_dir, src, ignore=shutil.ignore_patterns("*.gguf"))
    cfg = json.loads((src / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg.update(rotary_pct=rope["partial_rotary_factor"], rotary_emb_base=rope["rope_theta"])
    (src / "config.json").write_text(json.dumps(cfg, indent=2))
    before = {f.name: sha256(f) for f in src.iterdir()}
    result = convert(src, tmp_path / "pythia.gguf", outtype="f32", no_loop=True)
    assert {f.name: sha256(f) for f in src.iterdir()} == before
    fields = gguf.GGUFReader(result.out).fields
    assert fields["gptneox.rope.dimension_count"].contents() == 4  # 0.25 of head dim 16
    assert_same_tensors(reference, result.out)


def test_hub_id_goes_through_loopcpp_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    hub = pytest.importorskip("loopcpp.hub")
    repo = tmp_path / "snapshot"
    repo.mkdir()
    write_synthetic_gguf(repo / "model.gguf", n_layer=16)
    asked: list[str] = []

    def fake_snapshot(repo_id: str, *args: Any, **kwargs: Any) -> Path:
        asked.append(repo_id)
        return repo

    monkeypatch.setattr(hub, "snapshot", fake_snapshot)
    result = convert("someone/some-model", tmp_path / "o.gguf")
    assert asked == ["someone/some-model"] and result.source == "hub"
    assert (result.loop.start, result.loop.end) == (7, 9)


def test_corrupt_bytes_are_a_model_file_error(tmp_path: Path) -> None:
    src = write_synthetic_gguf(tmp_path / "m.gguf", n_layer=2)
    data = bytearray(src.read_bytes())
    first_key_len = int.from_bytes(data[24:32], "little")
    type_at = 32 + first_key_len
    bad = tmp_path / "bad.gguf"
    data[type_at : type_at + 4] = (99).to_bytes(4, "little")
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="corrupt GGUF file .*value type 99.*convert it again"):
        read_model(bad)
    data = bytearray(src.read_bytes())
    data[8:16] = (2**40).to_bytes(8, "little")  # absurd tensor count
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="bad.gguf"):
        read_model(bad)
