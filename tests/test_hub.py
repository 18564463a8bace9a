"""loopcpp.hub.snapshot against hand-made hub caches; never touches the network."""

from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub import constants

from loopcpp import hub

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _fake_cache(root: Path, repo: str = "org/tiny", commit: str = COMMIT) -> Path:
    """The hub cache layout: models--org--name/{refs/main, blobs/, snapshots/<commit>/}."""
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo_dir / "blobs").mkdir()
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)  # no newline, as the hub writes it
    (snap / "config.json").write_text('{"model_type": "llama"}')
    return snap


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Online mode, but the hub endpoint is a closed local port."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")


def test_local_folder_is_returned_as_is(tmp_path: Path, offline) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert hub.snapshot(tmp_path) == tmp_path.resolve()
    assert hub.snapshot(str(tmp_path)) == tmp_path.resolve()


def test_missing_local_path_is_a_clear_error(tmp_path: Path, offline) -> None:
    with pytest.raises(FileNotFoundError, match="no folder"):
        hub.snapshot(tmp_path / "nope")
    with pytest.raises(NotADirectoryError, match="is a file"):
        (tmp_path / "f").write_text("x")
        hub.snapshot(tmp_path / "f")


def test_cached_repo_resolves_offline(tmp_path: Path, offline) -> None:
    snap = _fake_cache(tmp_path)
    assert hub.snapshot("org/tiny", cache_dir=tmp_path) == snap
    assert hub.snapshot("org/tiny", revision=COMMIT, cache_dir=tmp_path) == snap
    assert (hub.snapshot("org/tiny", cache_dir=tmp_path) / "config.json").is_file()


def test_cache_from_hf_hub_cache_env(tmp_path: Path, offline, monkeypatch) -> None:
    snap = _fake_cache(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    assert hub.hub_cache() == tmp_path
    assert hub.snapshot("org/tiny") == snap


def test_cached_repo_needs_no_network(tmp_path: Path, unreachable, monkeypatch) -> None:
    snap = _fake_cache(tmp_path)
    calls = []
    real = hub.snapshot_download

    def spy(*args, **kwargs):
        calls.append(kwargs.get("local_files_only", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(hub, "snapshot_download", spy)
    assert hub.snapshot("org/tiny", cache_dir=tmp_path) == snap
    assert calls == [True]  # served from the cache, the hub was never asked


def test_uncached_repo_offline_is_a_clear_error(tmp_path: Path, offline) -> None:
    _fake_cache(tmp_path)
    with pytest.raises(hub.HubOfflineError) as info:
        hub.snapshot("org/other", cache_dir=tmp_path)
    msg = str(info.value)
    assert "org/other" in msg and str(tmp_path) in msg
    assert "HF_HUB_OFFLINE" in msg and "HF_HUB_CACHE" in msg and "local checkpoint folder" in msg
    with pytest.raises(hub.HubOfflineError, match="org/tiny@v9"):
        hub.snapshot("org/tiny", revision="v9", cache_dir=tmp_path)


def test_uncached_repo_with_unreachable_hub(tmp_path: Path, unreachable) -> None:
    with pytest.raises(hub.HubOfflineError) as info:
        hub.snapshot("org/other", cache_dir=tmp_path)
    msg = str(info.value)
    assert "could not be reached" in msg and "org/other" in msg and "HF_HUB_CACHE" in msg


def test_invalid_repo_id(tmp_path: Path, offline) -> None:
    with pytest.raises(ValueError, match="valid hub repo id"):
        hub.snapshot("bad id!", cache_dir=tmp_path)
