"""The tamp-fx command line: argument parsing, progress and printing over the Python API.
Each command module registers its commands on the one typer app (:mod:`tamp_fx.cli.app`)."""
from __future__ import annotations

import sys

from tamp_fx.cli import evaluate, make, show, testbeds  # noqa: F401 - registers the commands
from tamp_fx.cli.app import app

__all__ = ["app", "main"]


def main() -> int:
    from tamp_fx.cli import run  # takes over Ctrl-C first (the console entry point: tamp_fx.cli.main)
    return run()


if __name__ == "__main__":
    sys.exit(main())
