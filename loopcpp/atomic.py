"""Writing a file whole or not at all.

:func:`atomic_output` yields a temporary path in the destination folder and
renames it onto the destination only when the block succeeds; on an exception
the temporary is removed and the destination is untouched.  A process killed
with SIGKILL can leave its temporary (``.<name>.<pid>.<random>.loopcpp-tmp``);
the next write into the same folder removes the temporaries of dead processes.
:func:`write_text_atomic` writes a text file that way; :func:`scratch_file` is a
temporary next to an output that is always removed.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

TEMP_SUFFIX = ".loopcpp-tmp"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


#: ``.<name>.<pid>.<random>.loopcpp-tmp`` (mkstemp's random part has no dots).
_TEMP_NAME = re.compile(r"^\..+\.(\d+)\.[^.]+" + re.escape(TEMP_SUFFIX) + "$")


def remove_stale_temps(out: Path) -> list[Path]:
    """Remove the temporaries in ``out``'s folder left by killed loopcpp processes.

    Any output's, not only ``out``'s: a temporary whose writer's pid is dead.
    """
    removed = []
    for p in out.parent.glob(f".*{TEMP_SUFFIX}"):
        match = _TEMP_NAME.match(p.name)
        if match and not _pid_alive(int(match.group(1))):
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed


def _temp_next_to(out: Path) -> Path:
    fd, name = tempfile.mkstemp(
        prefix=f".{out.name}.{os.getpid()}.", suffix=TEMP_SUFFIX, dir=out.parent
    )
    os.close(fd)
    return Path(name)


@contextlib.contextmanager
def atomic_output(out: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``out``; rename it onto ``out`` on success.

    On an exception the temporary is removed and ``out`` is untouched (the
    ``loopcpp`` command turns SIGTERM into one).  A SIGKILL can leave the
    temporary (named ``.<out>.<pid>.*.loopcpp-tmp``); the next write into the
    same folder removes it.
    """
    o = Path(out)
    remove_stale_temps(o)
    tmp = _temp_next_to(o)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, o)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write a text file whole or not at all (through :func:`atomic_output`)."""
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


@contextlib.contextmanager
def scratch_file(out: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``out`` that is always removed afterwards."""
    o = Path(out)
    remove_stale_temps(o)
    tmp = _temp_next_to(o)
    try:
        yield tmp
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
