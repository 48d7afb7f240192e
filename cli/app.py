"""The tamp-fx command line's shared parts: the typer app, option types used by several commands,
logging set-up and the one-line error handling every command runs under."""
from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable, Iterator
from enum import Enum
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from typer.core import TyperGroup

from tamp_fx.config import ALLOCATIONS, METHODS, SCORE_NAMES, TOKEN_NAMES
from tamp_fx.errors import TampError
from tamp_fx.prune.semi_structured import FORMATS
from tamp_fx.runtime.launch import launch_env, lenient
from tamp_fx.runtime.quiet import quiet_dependencies
from tamp_fx.write.quantize import QUANTIZERS  # torchao itself is imported only when used

try:
    from typer._click.exceptions import UsageError  # typer vendors click since 0.2x
except ImportError:
    from click.exceptions import UsageError


class Commands(TyperGroup):
    """The command group: a usage error (an unknown option, a value out of range) is one
    ``error:`` line and exit status 2, like every other error, not typer's boxed usage text."""

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


app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, cls=Commands,
                  help="Prune the language decoder of multimodal LLMs with TAMP, as torch.fx passes.")
console = Console(stderr=True)
out_console = Console()



def choices(name: str, names) -> type[Enum]:
    """A typer choice type of registered names."""
    return Enum(name, {n: n for n in names}, type=str)


Method, Allocation = choices("Method", METHODS), choices("Allocation", ALLOCATIONS)
Score, Tokens = choices("Score", SCORE_NAMES), choices("Tokens", TOKEN_NAMES)
Quantize, Format = choices("Quantize", QUANTIZERS.names()), choices("Format", FORMATS.names())


Overwrite = Annotated[bool, typer.Option(help="Replace --out if it exists (a directory only if tamp-fx wrote it or it is empty).")]
NSamples = Annotated[int, typer.Option(min=1, help="Number of calibration samples.")]
SeqLen = Annotated[int, typer.Option(min=2, help="Tokens per window of a text calibration file.")]
Seed = Annotated[int, typer.Option(help="Seed for drawing calibration samples.")]
DEVICES = "cpu, cuda or cuda:N (default: cuda when available, else cpu)"
Device = Annotated[Optional[str], typer.Option(
    help=f"Where to compute: {DEVICES}. Not part of the plan: a plan is the same wherever it is computed.",
    show_default=False)]
Dtype = Annotated[Optional[str], typer.Option(
    help="Dtype of the forward passes: auto (the checkpoint's), float32, bfloat16 or float16 (default: float32 on "
         "the CPU, auto on CUDA). Statistics stay float32/float64.", show_default=False)]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Log what happens.")]


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


def setup(verbose: bool) -> None:
    try:
        launch_env()                               # torchrun's variables: one line for a bad one
    except TampError as error:
        fail(str(error), code=2)
    os.environ.setdefault("TQDM_DISABLE", "1")  # for tqdm bars of libraries imported later
    level = logging.ERROR if rank() else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False, show_time=False)], force=True)
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
    """Turn a TampError (or an OSError) in a command into a one-line message and exit status 1 (Ctrl-C reaches
    :func:`tamp_fx.cli.main` as ``Interrupted``; a KeyboardInterrupt here is the API's own)."""
    from tamp_fx.errors import TampError, first_line
    from tamp_fx.runtime.distributed import RankFailed
    try:
        yield
    except TampError as error:
        fail(str(error), every_rank=isinstance(error, RankFailed))
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
