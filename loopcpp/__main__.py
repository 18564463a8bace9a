"""``python -m loopcpp``: the loopcpp command line."""

from loopcpp.cli import main

main()
