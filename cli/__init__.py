"""The tamp-fx command line. :func:`main` is the console entry point; it lives here, not in
``main.py``, so that Ctrl-C is taken over before anything heavy (typer, torch, transformers)
is imported: however early it comes, the user sees one line and exit status 130."""
import os
import signal
import sys

from tamp_fx.runtime.launch import lenient  # light: no torch


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM. Not a KeyboardInterrupt, which typer turns into a silent exit: this
    one unwinds through every ``finally`` (temporary outputs are removed) up to :func:`run`."""


def _interrupt(signum, frame) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # a second Ctrl-C must not cut the clean-up short
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Interrupted(signum)


def run() -> int:
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        from tamp_fx.cli.main import app
        app(prog_name="tamp-fx")
    except Interrupted as stop:
        output = sys.modules.get("tamp_fx.runtime.output")
        written = [str(p) for p in getattr(output, "WRITTEN", []) if p.exists()]
        if lenient().rank == 0:                         # under torchrun every rank is interrupted: rank 0 says it
            sys.stderr.write(f"error: interrupted: {', '.join(written) + ' was' if written else 'nothing was'} written\n")
        return 128 + stop.args[0]
    return 0


def _signals_end_quietly(code: int | str | None) -> None:
    """The command is over: a Ctrl-C or SIGTERM from now on (torchrun stopping the other ranks
    once one has failed, while this one leaves its process group) ends the process with the
    command's own status, not with a traceback from wherever it lands."""
    status = code if isinstance(code, int) else 0 if code is None else 1

    def stop(signum, frame) -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):                # a closed pipe: nothing more to say
                pass
        os._exit(status)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)


def main() -> None:
    """The console entry point (and ``python -m tamp_fx.cli``): :func:`run`, then exit with its
    status; under torchrun through :func:`tamp_fx.runtime.distributed.end_process`."""
    try:
        code = run()
    except SystemExit as done:                          # typer ends every command this way
        code = done.code
    _signals_end_quietly(code)
    if lenient().size > 1:                              # a bad WORLD_SIZE: the command said so in one line
        from tamp_fx.runtime.distributed import end_process
        end_process(code)
    sys.exit(code)
