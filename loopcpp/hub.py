"""Local folders or Hugging Face Hub snapshots, offline first.

``snapshot(x)`` returns a folder holding a checkpoint:

* an existing local folder is returned as is (resolved);
* a hub id (``org/name``) is looked up in the hub cache first
  (``local_files_only=True``: no network when it is cached, so a cached
  revision is never refreshed; delete it from the cache to re-download);
* otherwise it is downloaded with ``huggingface_hub.snapshot_download``, unless
  ``HF_HUB_OFFLINE`` is set;
* when the hub cannot be reached (offline mode, no network) and nothing is
  cached, :class:`HubOfflineError` names the repo, the cache searched and the fixes.

The cache is ``cache_dir`` if given, else ``$HF_HUB_CACHE`` read at call time,
else huggingface_hub's default (``$HF_HOME/hub``, ``~/.cache/huggingface/hub``).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)


class HubOfflineError(ConnectionError):
    """The hub cannot be reached and the repo is not in the local cache."""


class HubRepoError(LookupError):
    """The hub answered that the repo or revision does not exist or is not accessible."""


def _network_errors() -> tuple[type[BaseException], ...]:
    """Errors meaning 'the hub could not be reached' (the HTTP client's transport errors)."""
    errors: list[type[BaseException]] = [
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        ConnectionError,
        TimeoutError,
    ]
    for module, name in (
        ("httpx2", "TransportError"),
        ("httpx", "TransportError"),
        ("requests", "ConnectionError"),
    ):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def hub_cache(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The hub cache folder used for ``cache_dir`` (see the module doc)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("HF_HUB_CACHE")
    return Path(env).expanduser() if env else Path(constants.HF_HUB_CACHE)


def _offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE", os.environ.get("TRANSFORMERS_OFFLINE"))
    if value is not None:
        return value.strip().upper() in {"1", "ON", "YES", "TRUE"}
    return bool(constants.HF_HUB_OFFLINE)


def _looks_like_path(text: str) -> bool:
    return (
        text.startswith(("/", ".", "~"))
        or text.count("/") > 1
        or "\\" in text
        or (os.sep != "/" and os.sep in text)
    )


def snapshot(
    repo_id_or_path: str | os.PathLike[str],
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """The folder of a local checkpoint or of a hub repo snapshot (see the module doc)."""
    text = os.fspath(repo_id_or_path)
    local = Path(text).expanduser()
    if local.is_dir():
        return local.resolve()
    if local.exists():
        raise NotADirectoryError(f"{local} is a file; pass the checkpoint folder or a hub repo id")
    if _looks_like_path(text):
        raise FileNotFoundError(
            f"no folder {local}; pass an existing checkpoint folder or a hub repo id 'org/name'"
        )
    cache = hub_cache(cache_dir)
    where = text + (f"@{revision}" if revision else "") + f" (no local folder {str(local)!r})"
    try:
        return Path(
            snapshot_download(text, revision=revision, cache_dir=cache, local_files_only=True)
        )
    except HFValidationError as exc:
        raise ValueError(
            f"{text!r} is neither an existing folder nor a valid hub repo id ('org/name'): {exc}"
        ) from None
    except LocalEntryNotFoundError:
        pass  # not cached (or incomplete): go online below
    offline_fix = (
        f"pass a local checkpoint folder instead, point HF_HUB_CACHE (or cache_dir) at a hub "
        f"cache holding models--{text.replace('/', '--')}, or download it where the hub is "
        "reachable"
    )
    if _offline():
        raise HubOfflineError(
            f"{where} is not in the hub cache {cache} and HF_HUB_OFFLINE is set, so it cannot "
            f"be downloaded: unset HF_HUB_OFFLINE, or {offline_fix}"
        )
    try:
        return Path(snapshot_download(text, revision=revision, cache_dir=cache))
    except RevisionNotFoundError:
        raise HubRepoError(
            f"revision {revision!r} of {text} does not exist on the hub; pass an existing "
            "branch, tag or commit"
        ) from None
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        raise HubRepoError(
            f"{text} was not found on the hub or needs access ({type(exc).__name__}); check the "
            "id, or log in (HF_TOKEN) if it is private or gated"
        ) from None
    except _network_errors() as exc:
        raise HubOfflineError(
            f"the hub could not be reached for {where} ({type(exc).__name__}) and it is not in "
            f"the hub cache {cache}: {offline_fix}"
        ) from exc
