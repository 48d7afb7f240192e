"""The tamp-fx command line's shared parts: the typer app, option types used by several commands,
logging set-up and the one-line error handling every command runs under."""
from __future__ import annotations

import contextlib
import logging
import math
import os
import shlex
from collections.abc import Callable, Iterator
from enum import Enum
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from tamp_fx.config import ALLOCATIONS, METHODS, SCORE_NAMES, TOKEN_NAMES
from tamp_fx.errors import TampError
from tamp_fx.prune.semi_structured import FORMATS
from tamp_fx.runtime.launch import launch_env, lenient
from tamp_fx.runtime.progress import STYLES, configure, console, plain  # progress and messages share stderr's console
from tamp_fx.runtime.quiet import quiet_dependencies
from tamp_fx.write.quantize import QUANTIZERS  # torchao itself is imported only when used

try:
    from typer._click.exceptions import UsageError  # typer vendors click since 0.2x
except ImportError:
    from click.exceptions import UsageError


class _FlagsTakeNoValue:
    """Show no type beside a flag in --help: typer's rich help prints each option's type, ``<bool>``
    for a flag (``--help`` included), unless the option has a metavar; an empty one hides it."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        return params


class Group(_FlagsTakeNoValue, TyperGroup):
    """The command group: commands listed in the order a user meets them; a usage error (an unknown
    option, a value out of range) is one ``error:`` line and exit status 2, not typer's boxed usage text."""
    ORDER = ("demo", "fixture", "plan", "inspect", "apply", "eval", "diff", "export", "convert")

    def list_commands(self, ctx):
        names = super().list_commands(ctx)
        return sorted(names, key=lambda n: self.ORDER.index(n) if n in self.ORDER else len(self.ORDER))

    def make_context(self, *args, **kwargs):
        with _usage_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        with _usage_errors():
            return super().invoke(ctx)


@contextlib.contextmanager
def _usage_errors() -> Iterator[None]:
    try:
        yield
    except UsageError as error:
        if type(error).__name__ == "NoArgsIsHelpError":       # `tamp-fx` alone: the help, as typer shows it
            raise
        where = f" (see {error.ctx.command_path} --help)" if getattr(error, "ctx", None) else ""
        fail(" ".join(error.format_message().split()) + where, code=2)


class Command(_FlagsTakeNoValue, TyperCommand):
    pass


class App(typer.Typer):
    """The typer app whose commands all show flags without a type (:class:`_FlagsTakeNoValue`)."""

    def command(self, *args, **kwargs):
        return super().command(*args, cls=kwargs.pop("cls", Command), **kwargs)


app = App(cls=Group, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
          help="Prune the language decoder of multimodal LLMs with TAMP, as torch.fx passes.")
out_console = Console()


def choices(name: str, names) -> type[Enum]:
    """A typer choice type of registered names."""
    return Enum(name, {n: n for n in names}, type=str)


Method, Allocation = choices("Method", METHODS), choices("Allocation", ALLOCATIONS)
Score, Tokens = choices("Score", SCORE_NAMES), choices("Tokens", TOKEN_NAMES)
Sequential = choices("Sequential", ("groups", "layers"))
Quantize, Format = choices("Quantize", QUANTIZERS.names()), choices("Format", FORMATS.names())
LogFormat = choices("LogFormat", STYLES)

# options several commands take, under one name each (tests/cli/test_help.py checks it); rich markup
# is on in --help, so no [brackets] in help texts
CALIBRATION, COMPUTE = "Calibration", "Compute"     # --help panels
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace --out if it exists (only what tamp-fx wrote).")]
NSamples = Annotated[int, typer.Option(min=1, help="Calibration samples.", rich_help_panel=CALIBRATION)]
SeqLen = Annotated[int, typer.Option(min=2, help="Tokens per window of a text calibration file.",
                                     rich_help_panel=CALIBRATION)]
Seed = Annotated[int, typer.Option(help="Seed for drawing calibration samples.", rich_help_panel=CALIBRATION)]
DEVICES = "cpu, cuda or cuda:N (default: cuda if there is one)"
Device = Annotated[Optional[str], typer.Option(help=f"{DEVICES}.", show_default=False, rich_help_panel=COMPUTE)]
Dtype = Annotated[Optional[str], typer.Option(
    help="Of the forward passes: auto (the checkpoint's), float32, bfloat16 or float16 (default: plan bfloat16 "
         "where the hardware has it; else float32 on CPU, auto on CUDA).", show_default=False, rich_help_panel=COMPUTE)]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")]
AllowNonfinite = Annotated[bool, typer.Option("--allow-nonfinite", help="Use weights holding NaN or inf (refused "
                                                                        "by default).")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Log each step (with bars: each layer too).")]
Json = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
Log = Annotated[LogFormat, typer.Option(
    "--log-format", metavar="STYLE", help="Progress: rich (bars), plain (a line per layer) or auto (plain when "
                                          "not a terminal).")]


def _print_version(value: bool) -> None:
    if value:
        out_console.print(f"tamp-fx {version()}", highlight=False)
        raise typer.Exit()


def version() -> str:
    """The installed distribution's version; else the package's own (a source tree on sys.path)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed
    try:
        return installed("tamp-fx")
    except PackageNotFoundError:
        import tamp_fx
        return getattr(tamp_fx, "__version__", "unknown")


@app.callback()
def _options(_version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                    help="Print the version and exit.")] = False) -> None:
    pass


def quote(path) -> str:
    """A path as a shell word, for a command to copy."""
    return shlex.quote(str(path))


def next_steps(*commands: str) -> list[str]:
    """The closing lines that say what to run next."""
    return [f"{'next:' if i == 0 else '':5} {command}" for i, command in enumerate(commands)]


def done(*lines: str) -> None:
    """A command's closing lines, on stdout: short, and printed as they are (never folded by rich)."""
    for line in lines:
        out_console.print(line, highlight=False, markup=False, emoji=False, soft_wrap=True)


def checked(test: Callable[[float], bool], expected: str) -> Callable:
    """A typer callback refusing, as a usage error, a value for which ``test`` is false: for
    bounds that ``min=`` / ``max=`` cannot say (open ones, finite)."""
    def check(value):
        if value is not None and not test(value):
            raise typer.BadParameter(f"{value} is not {expected}")
        return value
    return check


fraction = checked(lambda v: 0 <= v < 1, "in [0, 1): pass a fraction such as 0.5")
positive = checked(lambda v: 0 < v < math.inf, "a positive number")


def rank() -> int:
    """This process's rank under torchrun (0 without it): only rank 0 prints."""
    return lenient().rank


def setup(verbose: bool, log_format: str = "auto") -> None:
    """Logging (-v: INFO) and the progress style of every :class:`~tamp_fx.runtime.progress.Bars` after it;
    both plain text, one line a message, where progress is plain (a log file)."""
    try:
        launch_env()                               # torchrun's variables: one line for a bad one
    except TampError as error:
        fail(str(error), code=2)
    configure(getattr(log_format, "value", log_format), verbose and not rank())
    os.environ.setdefault("TQDM_DISABLE", "1")  # for tqdm bars of libraries imported later
    level = logging.ERROR if rank() else logging.INFO if verbose else logging.WARNING
    handler = logging.StreamHandler() if plain() else RichHandler(console=console, show_path=False, show_time=False)
    logging.basicConfig(level=level, format="%(levelname)s: %(message)s" if plain() else "%(message)s",
                        handlers=[handler], force=True)
    import transformers
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    quiet_dependencies()                                  # torchao's and torch's pytree import-time warnings


def fail(message: str, code: int = 1, every_rank: bool = False) -> None:
    """Print ``message`` as one line and exit with ``code``. Under torchrun only rank 0 prints;
    with ``every_rank`` (all ranks know of the failure) the others wait until it has printed."""
    # the message is plain text: no rich markup ("[...]") and no emoji codes (":M:" in "N:M: ...")
    if not rank() or not every_rank:            # a rank's own failure (the others are stopped by torchrun)
        prefix = f"rank {rank()}: " if rank() else ""
        console.print(f"[bold red]error:[/] {prefix}{escape(message)}", highlight=False, soft_wrap=True, emoji=False)
    if every_rank:
        from tamp_fx.runtime import distributed
        distributed.barrier()
    raise typer.Exit(code)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn a TampError (or an OSError, or a collective that lost another rank) in a command into a one-line
    message and exit status 1 (Ctrl-C reaches :func:`tamp_fx.cli.main` as ``Interrupted``; a KeyboardInterrupt
    here is the API's own)."""
    from tamp_fx.errors import TampError, first_line
    from tamp_fx.runtime.distributed import RankFailed, peer_lost, world
    try:
        yield
    except TampError as error:
        fail(str(error), every_rank=isinstance(error, RankFailed))
    except RuntimeError as error:
        if not peer_lost(error):
            raise
        fail(f"another of the {world().size} processes stopped without a word (killed, out of memory?): see torchrun's "
             "report below for which one; nothing was written")
    except OSError as error:        # the file system said no (permissions, a full disk) somewhere tamp-fx did not expect
        fail(f"{error.filename or 'a file'}: {error.strerror or first_line(error)}: check the path, its permissions "
              "and the free space")
    except KeyboardInterrupt:
        if rank():                                 # Ctrl-C reached every rank: rank 0 says it
            raise typer.Exit(130) from None
        fail("interrupted: nothing was written", 130)


@contextlib.contextmanager
def process_group() -> Iterator:
    """Under torchrun: join the process group for the command and leave it after (tamp_fx.runtime.distributed)."""
    from tamp_fx.runtime import distributed
    try:
        yield distributed.init_from_env()
    finally:
        distributed.shutdown()
