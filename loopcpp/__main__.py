"""``python -m loopcpp`` and the ``loopcpp`` command: the loopcpp command line.

The import of the command line takes a moment; a Ctrl-C during it ends the
program the way click ends it later ("Aborted!", status 1), without a traceback.
"""

import sys


def main() -> None:
    try:
        from loopcpp.cli import main as cli_main
    except KeyboardInterrupt:
        sys.stderr.write("\nAborted!\n")
        sys.exit(1)
    cli_main()


if __name__ == "__main__":
    main()
