"""``python -m loopcpp`` and the ``loopcpp`` command: the loopcpp command line.

The import of the command line takes a moment; a Ctrl-C during it ends the
program the way click ends it later ("Aborted!", status 1), without a traceback:
``loopcpp/__init__`` installs a quiet SIGINT handler when it is imported as the
start of ``python -m loopcpp`` or the ``loopcpp`` script (the package is imported
before this module can catch anything), and :func:`main` gives SIGINT back to
Python once the command line is imported.
"""

import sys


def main() -> None:
    try:
        from loopcpp.cli import main as cli_main
    except KeyboardInterrupt:
        sys.stderr.write("\nAborted!\n")
        sys.exit(1)
    import signal

    import loopcpp

    # loopcpp/__init__ ends a Ctrl-C during the start quietly (before this module could
    # catch it); from here on it is Python's KeyboardInterrupt again (click, chat, bench)
    if signal.getsignal(signal.SIGINT) is loopcpp._abort_start:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    cli_main()


if __name__ == "__main__":
    main()
