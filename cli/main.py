"""The tamp-fx command line: argument parsing, progress and printing over the Python API."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Prune the language decoder of multimodal LLMs with TAMP, as torch.fx passes.")
console = Console(stderr=True)
out_console = Console()


from tamp_fx.config import ALLOCATIONS, METHODS, SCORE_NAMES, TOKEN_NAMES  # noqa: E402
from tamp_fx.quantize import QUANTIZERS  # noqa: E402 - torchao itself is imported only when used
from tamp_fx.semi_structured import FORMATS  # noqa: E402

Method = Enum("Method", {m: m for m in METHODS}, type=str)
Allocation = Enum("Allocation", {m: m for m in ALLOCATIONS}, type=str)
Score = Enum("Score", {m: m for m in SCORE_NAMES}, type=str)
Tokens = Enum("Tokens", {m: m for m in TOKEN_NAMES}, type=str)
Quantize = Enum("Quantize", {q: q for q in QUANTIZERS}, type=str)
Format = Enum("Format", {f: f for f in FORMATS}, type=str)
VqaSplit = Enum("VqaSplit", {k: k for k in ("llava", "next")}, type=str)  # the keys of tamp_fx.vqa.SPLITS


Overwrite = Annotated[bool, typer.Option(help="Replace --out if it exists (a directory only if tamp-fx wrote it or it is empty).")]
NSamples = Annotated[int, typer.Option(help="Number of calibration samples.")]
SeqLen = Annotated[int, typer.Option(help="Tokens per window of a text calibration file.")]
Seed = Annotated[int, typer.Option(help="Seed for drawing calibration samples.")]
Device = Annotated[Optional[str], typer.Option(
    help="Where to compute: cpu, cuda or cuda:N (default: cuda when available, else cpu). Not part of the plan: "
         "a plan is the same wherever it is computed.", show_default=False)]
Dtype = Annotated[Optional[str], typer.Option(
    help="Dtype of the forward passes: auto (the checkpoint's), float32, bfloat16 or float16 (default: float32 on "
         "the CPU, auto on CUDA). Statistics stay float32/float64.", show_default=False)]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Log what happens.")]


def _rank() -> int:
    """This process's rank under torchrun (0 without it): only rank 0 prints."""
    return int(os.environ.get("RANK", "0"))


def _setup(verbose: bool) -> None:
    os.environ.setdefault("TQDM_DISABLE", "1")  # for tqdm bars of libraries imported later
    level = logging.ERROR if _rank() else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False, show_time=False)], force=True)
    import transformers
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("torchao").setLevel(logging.ERROR)  # it warns about CUDA-only extensions on import
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)  # and torch about its enums


def _fail(message: str, code: int = 1, every_rank: bool = False) -> None:
    """Print ``message`` as one line and exit with ``code``. Under torchrun only rank 0 prints;
    with ``every_rank`` (all ranks know of the failure) the others wait until it has printed."""
    # the message is plain text: no rich markup ("[...]") and no emoji codes (":M:" in "N:M: ...")
    if not _rank() or not every_rank:            # a rank's own failure (the others are stopped by torchrun)
        prefix = f"rank {_rank()}: " if _rank() else ""
        console.print(f"[bold red]error:[/] {prefix}{escape(message)}", highlight=False, soft_wrap=True, emoji=False)
    if every_rank:
        from tamp_fx import distributed
        distributed.barrier()
    raise typer.Exit(code)


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Turn a TampError (or an OSError) in a command into a one-line message and exit status 1 (Ctrl-C reaches
    :func:`tamp_fx.cli.main` as ``Interrupted``; a KeyboardInterrupt here is the API's own)."""
    from tamp_fx.distributed import RankFailed
    from tamp_fx.errors import TampError, first_line
    try:
        yield
    except TampError as error:
        _fail(str(error), every_rank=isinstance(error, RankFailed))
    except OSError as error:        # the file system said no (permissions, a full disk) somewhere tamp-fx did not expect
        _fail(f"{error.filename or 'a file'}: {error.strerror or first_line(error)}: check the path, its permissions "
              "and the free space")
    except KeyboardInterrupt:
        if _rank():                                 # Ctrl-C reached every rank: rank 0 says it
            raise typer.Exit(130) from None
        _fail("interrupted: nothing was written", 130)


def _check_output(out: Path, overwrite: bool, protect: tuple[Path, ...] = (), file: bool = False) -> None:
    """Refuse an --out that clashes with an input, exists without --overwrite or cannot be
    written, before any work (:func:`tamp_fx.model_io.check_output`)."""
    from tamp_fx.model_io import check_output
    check_output(out, overwrite=overwrite, protect=protect, file=file)


@contextlib.contextmanager
def _process_group() -> Iterator:
    """Under torchrun: join the process group for the command and leave it after (tamp_fx.distributed)."""
    from tamp_fx import distributed
    try:
        yield distributed.init_from_env()
    finally:
        distributed.shutdown()


@app.command()
def plan(
    model: Annotated[Path, typer.Argument(help="Hugging Face model directory, .gguf file, or .pt2 exported program.")],
    calib: Annotated[Path, typer.Option(help="Calibration data: a text file, or LLaVA-style .json/.jsonl conversations; "
                                             "for a .pt2 program its inputs (.safetensors, e.g. from `tamp-fx export`).")],
    out: Annotated[Path, typer.Option(help="Directory to write plan.json and masks.safetensors to.")],
    method: Annotated[Method, typer.Option(help="Pruning method: a shortcut for allocation + score + tokens "
                                                "(tamp = das + wanda + amia).")] = Method.wanda,
    sparsity: Annotated[Optional[float], typer.Option(
        help="Target sparsity of the decoder linears (overall), in [0, 1). Default 0.5; with --pattern, "
             "N/M under uniform allocation and min(0.5, N/M) otherwise.", show_default=False)] = None,
    pattern: Annotated[Optional[str], typer.Option(
        help="N:M sparsity such as 2:4: N zeros in every M consecutive input weights of each row. With uniform "
             "allocation every linear is N:M and the sparsity is N/M, whatever --sparsity says; with any other "
             "allocation each linear is dense or N:M, the least important made N:M until --sparsity "
             "(at most N/M) is met overall.")] = None,
    allocation: Annotated[Optional[Allocation], typer.Option(help="Override the method's sparsity allocation.")] = None,
    score: Annotated[Optional[Score], typer.Option(help="Override the method's weight score.")] = None,
    tokens: Annotated[Optional[Tokens], typer.Option(help="Override the method's token selection.")] = None,
    max_sparsity_delta: Annotated[float, typer.Option(help="DAS / ECoFLaP: no group sparser than sparsity + this.")] = 0.1,
    nsamples: NSamples = 128,
    seqlen: SeqLen = 512,
    seed: Seed = 0,
    device: Device = None,
    dtype: Dtype = None,
    offload_activations: Annotated[bool, typer.Option(
        help="Keep the calibration activations in host memory (pinned on CUDA) and move them to --device a sample "
             "at a time, for GPUs smaller than the activations.")] = False,
    layer_by_layer: Annotated[bool, typer.Option(
        "--layer-by-layer/--whole-model",
        help="Read each decoder layer from the safetensors shards when it is planned (the model is built on the meta "
             "device; memory holds the embeddings, towers and projector, one decoder layer and the activations), or "
             "load the model whole. A GGUF file and --allocation ecoflap always load whole (GGUF is de-quantized).")
    ] = True,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Calibrate MODEL on --calib and save a pruning plan to --out."""
    _setup(verbose)

    with _process_group() as world, _user_errors():
        import tamp_fx
        from tamp_fx import distributed
        from tamp_fx.api import plan_inputs
        with distributed.guarded():                      # under torchrun: one line for what every rank refuses
            config = tamp_fx.PlanConfig(method=method.value, sparsity=sparsity, pattern=pattern, nsamples=nsamples,
                                        seqlen=seqlen, seed=seed, allocation=allocation.value if allocation else None,
                                        score=score.value if score else None, tokens=tokens.value if tokens else None,
                                        max_sparsity_delta=max_sparsity_delta)
            protect = plan_inputs(model, calib)
            _check_output(out, overwrite, protect)
        start = time.perf_counter()
        whole_only = model.suffix == ".gguf" or config.allocation == "ecoflap"
        result = tamp_fx.plan(model, calib, config, progress=not quiet, device=device, dtype=dtype,
                              offload_activations=offload_activations,
                              layer_by_layer=None if layer_by_layer and whole_only else layer_by_layer)
        with distributed.guarded():                      # every rank learns whether rank 0 wrote it
            if world.rank == 0:
                result.save(out, overwrite=overwrite, protect=protect)
        if world.rank:
            return
        s = result.summary()
        console.print(f"{config.method} ({config.allocation} + {config.score} + {config.tokens}"
                      f"{', ' + config.pattern if config.pattern else ''}): "
                      f"planned {s['linears']} linears, {s['sparsity']:.2%} of {s['parameters']:,} parameters "
                      f"pruned, in {time.perf_counter() - start:.1f} s -> {out}", highlight=False)


@app.command()
def apply(
    model: Annotated[Path, typer.Argument(help="The model the plan was made for: Hugging Face directory, .gguf or .pt2.")],
    plan_dir: Annotated[Path, typer.Argument(help="A directory written by `tamp-fx plan`.")],
    out: Annotated[Path, typer.Option(help="Directory to write the pruned model to (a .pt2 file for a .pt2 model).")],
    quantize: Annotated[Optional[Quantize], typer.Option(
        help="Also quantize with torchao (pip install --no-deps torchao==0.18.0). int8-weight: the pruned decoder "
             "linears of a Hugging Face / GGUF model, int8 weight-only, loadable with from_pretrained. pt2e-x86: a "
             ".pt2 program, PT2E static int8 (X86InductorQuantizer) calibrated on --calib.")] = None,
    calib: Annotated[Optional[Path], typer.Option(
        help="Calibration inputs (.safetensors) for --quantize pt2e-x86 of a .pt2 program.")] = None,
    format: Annotated[Format, typer.Option(
        help="dense: as the input. semi-structured: a 2:4 plan (--pattern 2:4) written in bfloat16 with its 2:4 "
             "linears listed in semi_structured.json; tamp_fx.semi_structured.load runs them with the 2:4 sparse "
             "kernels of a CUDA GPU (sm80+), from_pretrained loads it dense.")] = Format.dense,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Apply a plan to MODEL and save a pruned model that loads like the original."""
    _setup(verbose)

    with _user_errors():
        import tamp_fx
        from tamp_fx.api import apply_inputs
        from tamp_fx.semi_structured import cuda_problem
        plan_ = tamp_fx.Plan.load(plan_dir)
        _check_output(out, overwrite, apply_inputs(model, plan_, calib), file=model.suffix == ".pt2")
        start = time.perf_counter()
        scheme = quantize.value if quantize else None
        tamp_fx.apply(model, plan_, out, overwrite=overwrite, progress=not quiet, quantize=scheme, calib=calib,
                      format=format.value)
        semi = format.value == "semi-structured"
        console.print(f"applied {len(plan_.linears)} masks{f', quantized {scheme},' if scheme else ''}"
                      f"{', 2:4 semi-structured (bfloat16),' if semi else ''} "
                      f"in {time.perf_counter() - start:.1f} s -> {out}", highlight=False)
        problem = cuda_problem() if semi else None
        if problem:
            console.print(f"note: {out} is written, but its 2:4 kernels run only on a CUDA GPU (sm80+) via "
                          f"tamp_fx.semi_structured.load ({problem}); from_pretrained loads it dense",
                          highlight=False, soft_wrap=True)


@app.command()
def export(
    model: Annotated[Path, typer.Argument(help="Hugging Face model directory or .gguf file.")],
    calib: Annotated[Path, typer.Option(help="Calibration data, as for `tamp-fx plan`.")],
    out: Annotated[Path, typer.Option(help="The .pt2 file to write the language decoder to.")],
    calib_out: Annotated[Path, typer.Option(help="The .safetensors file to write its calibration inputs to.")],
    nsamples: NSamples = 128,
    seqlen: SeqLen = 512,
    seed: Seed = 0,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Write the language decoder of MODEL as an exported program (inputs_embeds -> logits) and the
    inputs the full model gives it on --calib (image / audio tokens embedded, modality labels kept),
    for `tamp-fx plan model.pt2 --calib inputs.safetensors`."""
    _setup(verbose)

    with _user_errors():
        from tamp_fx.export import export_decoder
        start = time.perf_counter()
        result = export_decoder(model, calib, out, calib_out, nsamples=nsamples, seqlen=seqlen, seed=seed,
                                overwrite=overwrite, progress=not quiet)
        console.print(f"exported the language decoder to {result.program} and {result.samples} calibration inputs "
                      f"to {result.calibration} in {time.perf_counter() - start:.1f} s", highlight=False)


def _shorten(names: list[str]) -> list[str]:
    """Drop a suffix every name shares (``q_proj``, ``up_proj`` -> ``q``, ``up``) so tables fit."""
    suffix = os.path.commonprefix([n[::-1] for n in names])[::-1] if len(names) > 1 else ""
    cut = suffix.find("_") if "_" in suffix else -1
    if cut < 0:
        return names
    suffix = suffix[cut:]
    return [n[: -len(suffix)] for n in names]


@app.command()
def inspect(
    plan_dir: Annotated[Path, typer.Argument(help="A directory written by `tamp-fx plan`.")],
    plot: Annotated[Optional[Path], typer.Option(help="Also write the plan's figures (PNG) into this directory "
                                                 "(needs matplotlib: pip install 'tamp-fx\\[plot]').")] = None,
    html: Annotated[Optional[Path], typer.Option(help="Also write one self-contained HTML page (summary and "
                                                 "figures) to this file.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace --plot / --html if they exist.")] = False,
) -> None:
    """Show a plan: per-layer sparsity of every linear; --plot / --html draw its statistics."""
    _setup(False)

    with _user_errors():
        from tamp_fx import report
        from tamp_fx.artifact import Plan
        data = Plan.load(plan_dir).to_json()          # the whole plan checked against itself (one line if damaged)
        grid = report.Grid.of(data)
        s = data["summary"]
        pattern = f" ({data['config']['pattern']})" if data["config"].get("pattern") else ""
        table = Table(title=f"{data['method']}{pattern} plan for {data['model'].get('source')}: "
                            f"{s['sparsity']:.2%} of {s['parameters']:,} parameters pruned")
        table.add_column("layer", justify="right")
        for p in _shorten(grid.projections):
            table.add_column(p, justify="right")
        table.add_column("layer total", justify="right", style="bold")
        for layer in grid.layers:
            cells = [grid.cells.get((layer, p)) for p in grid.projections]
            sizes = [(lp["shape"][0] * lp["shape"][1], lp["sparsity"]) for lp in cells if lp]
            total = sum(n * sp for n, sp in sizes) / sum(n for n, _ in sizes)
            table.add_row(str(layer), *(f"{lp['sparsity']:.1%}" if lp else "-" for lp in cells), f"{total:.1%}")
        out_console.print(table)
        protect = (plan_dir.resolve(),)
        if plot is not None:
            written = report.write_figures(data, plot, overwrite=overwrite, protect=protect)
            console.print(f"{len(written)} figures ({', '.join(p.stem for p in written)}) -> {plot}", highlight=False)
        if html is not None:
            report.write_html(data, html, overwrite=overwrite, protect=protect)
            console.print(f"report -> {html}", highlight=False)


@app.command()
def diff(
    plan_a: Annotated[Path, typer.Argument(help="A directory written by `tamp-fx plan`.")],
    plan_b: Annotated[Path, typer.Argument(help="Another plan of the same model.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the comparison as JSON on stdout.")] = False,
) -> None:
    """Compare two plans of one model: per linear the sparsity of each and the Jaccard index of their kept weights."""
    _setup(False)

    with _user_errors():
        import tamp_fx
        from tamp_fx.compare import diff_plans
        a, b = tamp_fx.Plan.load(plan_a), tamp_fx.Plan.load(plan_b)
        result = diff_plans(a, b)
        if as_json:
            out_console.print_json(json.dumps({"a": str(plan_a), "b": str(plan_b), **result.to_json()}))
            return
        table = Table(title=f"A = {plan_a} ({a.config.method}), B = {plan_b} ({b.config.method}): "
                            f"kept weights overlap {result.jaccard:.1%} (Jaccard)")
        for col in ("layer", "projection", "sparsity A", "sparsity B", "kept overlap (Jaccard)"):
            table.add_column(col, justify="left" if col == "projection" else "right")
        for d in result.linears.values():
            table.add_row(str(d.layer), d.projection, f"{d.sparsity_a:.1%}", f"{d.sparsity_b:.1%}", f"{d.jaccard:.1%}")
        table.add_row("all", "", f"{result.sparsity_a:.2%}", f"{result.sparsity_b:.2%}", f"{result.jaccard:.2%}",
                      style="bold")
        out_console.print(table)


@app.command(name="eval")
def evaluate(
    model: Annotated[Path, typer.Argument(help="Hugging Face model directory or .gguf file.")],
    text: Annotated[Optional[Path], typer.Option(help="Plain text file for perplexity.")] = None,
    vqa: Annotated[Optional[bool], typer.Option("--vqa/--no-vqa", help="VQA on the fixture's held-out split "
                                                "(default: when the model takes images).")] = None,
    vqa_samples: Annotated[int, typer.Option(help="Held-out questions (the six tasks in equal numbers).")] = 600,
    vqa_split: Annotated[VqaSplit, typer.Option(help="Whose held-out split: llava (fixture 1, 600 questions) or "
                                                "next (fixture 2, 1,200 questions).")] = "llava",
    seqlen: Annotated[int, typer.Option(help="Tokens per perplexity window.")] = 512,
    max_windows: Annotated[Optional[int], typer.Option(help="Evaluate at most this many windows.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
    device: Device = None,
    dtype: Dtype = None,
    quiet: Quiet = False,
) -> None:
    """VQA accuracy of MODEL (per task and overall) and its perplexity on --text."""
    _setup(False)

    with _user_errors():
        from tamp_fx.evaluate import evaluate as run_eval
        from tamp_fx.progress import Bars
        if vqa_samples < 1:
            _fail(f"--vqa-samples must be at least 1, got {vqa_samples}")
        with Bars(not quiet and not as_json) as bars:
            result = run_eval(model, text=text, vqa=vqa, vqa_samples=vqa_samples, seqlen=seqlen,
                              max_windows=max_windows, bars=bars, device=device, dtype=dtype,
                              vqa_split=VqaSplit(vqa_split).value)
        report = _evaluation_json(model, text, result)
        if as_json:
            out_console.print_json(json.dumps(report))
            return
        table = Table(title=f"{model}")
        for col in ("metric", "value", "measured on"):
            table.add_column(col, justify="left" if col != "value" else "right")
        if result.vqa is not None:
            for task, acc in result.vqa.per_task.items():
                table.add_row(f"VQA {task}", f"{acc:.1%}", f"{result.vqa.samples // len(result.vqa.per_task)} held-out questions")
            table.add_row("VQA overall", f"{result.vqa.accuracy:.1%}",
                          f"{result.vqa.samples} held-out questions ({VqaSplit(vqa_split).value} split)")
        if result.perplexity is not None:
            p = result.perplexity
            table.add_row("perplexity", f"{p.perplexity:.3f}",
                          f"{text}: {p.windows} window{'s' if p.windows != 1 else ''} of {p.seqlen} tokens")
        out_console.print(table)
        out_console.print("wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items()), highlight=False)


def _evaluation_json(model: Path, text: Optional[Path], result) -> dict:
    report: dict = {"model": str(model), "seconds": {k: round(v, 2) for k, v in result.seconds.items()}}
    if result.vqa is not None:
        report["vqa"] = {"accuracy": result.vqa.accuracy, "per_task": result.vqa.per_task,
                         "samples": result.vqa.samples}
    if result.perplexity is not None:
        p = result.perplexity
        report.update(text=str(text), perplexity=p.perplexity, windows=p.windows, seqlen=p.seqlen)
    return report


@app.command()
def convert(
    model: Annotated[Path, typer.Argument(help="A .gguf file.")],
    out: Annotated[Path, typer.Option(help="Directory to write the Hugging Face model to.")],
    overwrite: Overwrite = False,
) -> None:
    """Convert a GGUF model to a Hugging Face directory (de-quantized), which loads faster."""
    _setup(False)

    with _user_errors():
        import tamp_fx
        from tamp_fx.model_io import resolve_source
        _check_output(out, overwrite, (resolve_source(model).path,))
        start = time.perf_counter()
        tamp_fx.convert(model, out, overwrite=overwrite)
        console.print(f"converted {model.name} in {time.perf_counter() - start:.1f} s -> {out}", highlight=False)


#: fixture kind -> (module with build_fixture, module with write_conversations)
FIXTURES = {"llava": ("tamp_fx.fixture.model", "tamp_fx.fixture.data"),
            "next": ("tamp_fx.fixture2.model", "tamp_fx.fixture2.data")}
FixtureKind = Enum("FixtureKind", {k: k for k in FIXTURES}, type=str)


@app.command()
def fixture(
    out: Annotated[Path, typer.Option(help="Directory to write the fixture model (a transformers directory) to.")],
    calib_out: Annotated[Optional[Path], typer.Option(help="Also write calibration conversations (calib.jsonl + "
                                                      "images/) from the training distribution here.")] = None,
    conversations: Annotated[int, typer.Option(help="How many conversations --calib-out gets.")] = 128,
    kind: Annotated[FixtureKind, typer.Option(help="llava: fixture 1 (LLaVA, 16 image tokens, question-answer "
                                              "calibration); next: fixture 2 (LLaVA-NeXT, anyres, 88 image tokens, "
                                              "ShareGPT4V-style calibration).")] = FixtureKind.llava,
    overwrite: Overwrite = False,
) -> None:
    """Assemble a multimodal fixture: SmolLM2-135M-Instruct + the committed vision tower, projector and LoRA."""
    _setup(False)

    with _user_errors():
        import importlib
        fixture_model = importlib.import_module(FIXTURES[kind.value][0])
        build_fixture, WEIGHTS = fixture_model.build_fixture, fixture_model.WEIGHTS
        write_conversations = importlib.import_module(FIXTURES[kind.value][1]).write_conversations
        _check_output(out, overwrite, (WEIGHTS, *([calib_out] if calib_out else [])))
        if calib_out is not None:
            _check_output(calib_out, overwrite, (WEIGHTS, out))
            if conversations < 1:
                _fail(f"--conversations must be at least 1, got {conversations}")
        start = time.perf_counter()
        build_fixture(out, overwrite=overwrite)
        console.print(f"fixture written to {out} in {time.perf_counter() - start:.1f} s", highlight=False)
        if calib_out is not None:
            path = write_conversations(calib_out, conversations, overwrite=overwrite)
            console.print(f"{conversations} calibration conversations written to {path}", highlight=False)


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Where the demo writes its models and plan.")] = Path("demo-out"),
    quiet: Quiet = False,
) -> None:
    """Prune the multimodal fixture with TAMP at 50%; compare VQA and perplexity before and after."""
    _setup(False)

    with _user_errors():
        from tamp_fx.demo import EVAL_TEXT, run_demo
        r = run_demo(workdir, progress=not quiet)
        c, d, p = r.config, r.dense, r.pruned
        table = Table(title=f"fixture (SmolLM2-135M-Instruct + trained SigLIP tower), {c.method} at {c.sparsity:.0%}, "
                            f"calibrated on {c.nsamples} conversations")
        for col in ("metric", "dense", "pruned"):
            table.add_column(col, justify="right")
        table.add_row("decoder sparsity", "0.00%", f"{r.sparsity:.2%}")
        for task in d.vqa.per_task:
            table.add_row(f"VQA {task}", f"{d.vqa.per_task[task]:.1%}", f"{p.vqa.per_task[task]:.1%}")
        table.add_row(f"VQA overall ({d.vqa.samples} questions)", f"{d.vqa.accuracy:.1%}", f"{p.vqa.accuracy:.1%}")
        table.add_row(f"perplexity ({d.perplexity.windows} x {d.perplexity.seqlen} tokens)",
                      f"{d.perplexity.perplexity:.2f}", f"{p.perplexity.perplexity:.2f}")
        out_console.print(table)
        e = r.example
        out_console.print(_half_blocks(e.sample.image))
        out_console.print(f"{e.image} asks: {e.sample.question}  expected: {e.sample.answer}  "
                          f"dense: {e.dense.strip()!r}  pruned: {e.pruned.strip()!r}", highlight=False)
        out_console.print(f"text: {EVAL_TEXT.name} (bundled WikiText-2 excerpt); wall time: "
                          + ", ".join(f"{k} {v:.1f} s" for k, v in r.seconds.items()), highlight=False)
        out_console.print(f"outputs in {r.workdir}/ (try `tamp-fx inspect {r.workdir}/plan "
                          f"--html {r.workdir}/plan.html`)", highlight=False)


def _half_blocks(image, step: int = 2):
    """An RGB image (H, W, 3) as terminal text: one '▀' per two pixel rows, every ``step``-th pixel."""
    from rich.text import Text
    small = image[::step, ::step]
    text = Text()
    for top, bottom in zip(small[0::2], small[1::2]):
        for (r1, g1, b1), (r2, g2, b2) in zip(top, bottom):
            text.append("\u2580", style=f"rgb({r1},{g1},{b1}) on rgb({r2},{g2},{b2})")
        text.append("\n")
    return text


def main() -> int:
    from tamp_fx.cli import run                 # takes over Ctrl-C first (the console entry point: tamp_fx.cli.main)
    return run()


if __name__ == "__main__":
    sys.exit(main())
