"""Fetch the bundled GGUF models into the loopcpp cache.

    python models/fetch.py                 # all models
    python models/fetch.py smollm2-135m-instruct gemma3-270m
    python models/fetch.py --verify        # re-hash cached files too
    python models/fetch.py --list

Prints one line per model: name, path, sha256.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout


def main(argv: list[str] | None = None) -> int:
    from loopcpp import models

    parser = argparse.ArgumentParser(description="Fetch the bundled GGUF models.")
    parser.add_argument("names", nargs="*", help="model names (default: all)")
    parser.add_argument("--verify", action="store_true", help="re-hash cached files")
    parser.add_argument("--list", action="store_true", help="list the models and exit")
    args = parser.parse_args(argv)
    try:
        entries = models.load_manifest()
        if args.list:
            for entry in entries.values():
                print(
                    f"{entry.name}\t{entry.architecture}\t{entry.n_layer} layers\t"
                    f"{entry.size / 2**20:.0f} MiB\t{entry.license}"
                )
            return 0
        for name in args.names or list(entries):
            start = time.perf_counter()
            path = models.fetch(name, verify=args.verify)
            entry = entries[name]
            print(
                f"{name}\t{path}\t{entry.sha256}\t({time.perf_counter() - start:.1f} s)", flush=True
            )
    except (
        models.ModelNotFoundError,
        models.ManifestError,
        models.ChecksumError,
        models.FetchError,
    ) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
