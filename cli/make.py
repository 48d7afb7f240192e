"""Commands that make something: ``plan``, ``apply``, ``export`` and ``convert``."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from tamp_fx.allocate.strategies import ALLOCATORS
from tamp_fx.cli.app import (
    COMPUTE,
    Allocation,
    AllowNonfinite,
    Device,
    Dtype,
    Format,
    Log,
    LogFormat,
    Method,
    NSamples,
    Overwrite,
    Quantize,
    Quiet,
    Score,
    Seed,
    SeqLen,
    Sequential,
    Tokens,
    Verbose,
    app,
    console,
    done,
    fraction,
    next_steps,
    positive,
    process_group,
    quote,
    setup,
    user_errors,
)
from tamp_fx.config import ALLOCATIONS, METHODS, SCORE_NAMES, TOKEN_NAMES

METHOD, PARTS = "Method", "A method's parts"        # plan's options, grouped in --help
WRITE_PLAN = "write plan"                           # the last phase of the plan's progress


@app.command()
def plan(
    model: Annotated[Path, typer.Argument(metavar="MODEL", help="Hugging Face model directory, .gguf file or "
                                                                ".pt2 program.")],
    calib: Annotated[Path, typer.Option(help="Calibration data: .txt, LLaVA-style .json/.jsonl conversations, or "
                                             ".safetensors inputs for a .pt2 program.")],
    out: Annotated[Path, typer.Option(help="Directory to write the plan to.")],
    method: Annotated[Method, typer.Option(metavar="NAME", help=f"{', '.join(METHODS)}.", rich_help_panel=METHOD)
                      ] = Method.wanda,
    sparsity: Annotated[Optional[float], typer.Option(
        callback=fraction,
        help="Fraction of the decoder's linear weights to prune, in [0, 1) (default: 0.5; N/M with --pattern "
             "under uniform allocation).",
        show_default=False, rich_help_panel=METHOD)] = None,
    pattern: Annotated[Optional[str], typer.Option(
        metavar="N:M", help="N zeros in every M consecutive input weights, e.g. 2:4.", rich_help_panel=METHOD)] = None,
    allocation: Annotated[Optional[Allocation], typer.Option(
        metavar="NAME", help=f"Instead of the method's: {', '.join(ALLOCATIONS)}.", rich_help_panel=PARTS)] = None,
    score: Annotated[Optional[Score], typer.Option(
        metavar="NAME", help=f"Instead of the method's: {', '.join(SCORE_NAMES)}.", rich_help_panel=PARTS)] = None,
    tokens: Annotated[Optional[Tokens], typer.Option(
        metavar="NAME", help=f"Instead of the method's: {', '.join(TOKEN_NAMES)}.", rich_help_panel=PARTS)] = None,
    atv_alpha: Annotated[float, typer.Option(
        callback=positive,
        help="atv: image tokens kept per text token, x the layer's mean change.", rich_help_panel=PARTS)] = 1.0,
    max_sparsity_delta: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="das, ecoflap: no group sparser than --sparsity + this.", rich_help_panel=PARTS)] = 0.1,
    sequential: Annotated[Optional[Sequential], typer.Option(
        metavar="UNIT", help="groups or layers.",
        show_default=False, rich_help_panel=PARTS)] = None,
    nsamples: NSamples = 128,
    seqlen: SeqLen = 512,
    seed: Seed = 0,
    device: Device = None,
    dtype: Dtype = None,
    offload_activations: Annotated[bool, typer.Option(
        "--offload-activations", help="Keep the activations in host memory (a GPU too small for them).",
        rich_help_panel=COMPUTE)] = False,
    layer_by_layer: Annotated[bool, typer.Option(
        "--layer-by-layer/--whole-model", help="Read one decoder layer at a time, or load the model whole.",
        rich_help_panel=COMPUTE)] = True,
    allow_nonfinite: AllowNonfinite = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
    log_format: Log = LogFormat.auto,
) -> None:
    """Calibrate MODEL on --calib and save a pruning plan to --out.

    A method is a shortcut for an allocation, a score and a token selection (tamp: das, wanda, amia).

    Best measured on fixture 2: sparsegpt where a Hessian per linear fits in memory, else wanda-atv.
    """
    setup(verbose, log_format)

    with process_group() as world, user_errors():
        import tamp_fx
        from tamp_fx.api import plan_inputs
        from tamp_fx.load.source import resolve_source
        from tamp_fx.runtime import distributed
        from tamp_fx.runtime.output import check_output
        from tamp_fx.runtime.progress import Bars
        with distributed.guarded():                      # under torchrun: one line for what every rank refuses
            config = tamp_fx.PlanConfig(method=method.value, sparsity=sparsity, pattern=pattern, nsamples=nsamples,
                                        seqlen=seqlen, seed=seed, allocation=allocation.value if allocation else None,
                                        score=score.value if score else None, tokens=tokens.value if tokens else None,
                                        max_sparsity_delta=max_sparsity_delta, atv_alpha=atv_alpha,
                                        sequential=sequential.value if sequential else None)
            source = resolve_source(model)                # once for the command
            protect = plan_inputs(source, calib)
            check_output(out, overwrite=overwrite, protect=protect)
        whole_only = source.kind == "gguf" or ALLOCATORS[config.allocation].needs_zeroth_order
        with Bars(not quiet and world.rank == 0) as bars:
            bars.expect(WRITE_PLAN, 1.0)                  # about one pass of the samples through a layer
            result = tamp_fx.plan(source, calib, config, progress=bars, device=device, dtype=dtype,
                                  offload_activations=offload_activations,
                                  layer_by_layer=None if layer_by_layer and whole_only else layer_by_layer,
                                  allow_nonfinite=allow_nonfinite)
            with distributed.guarded():                  # every rank learns whether rank 0 wrote it
                if world.rank == 0:
                    with bars.task(WRITE_PLAN, 1) as advance:
                        result.save(out, overwrite=overwrite, protect=protect)
                        advance()
        if world.rank:
            return
        s = result.summary()
        done(f"{config.method} ({config.allocation} + {config.score} + {config.tokens}"
             f"{', ' + config.pattern if config.pattern else ''}): planned {s['linears']} linears "
             f"in {result.wall_seconds:.1f} s",        # the plan's own record, as `inspect --html` shows it
             f"pruned {s['sparsity']:.2%} of {s['parameters']:,} decoder parameters",
             f"plan written to {out}",
             *next_steps(f"tamp-fx inspect {quote(out)}", f"tamp-fx apply {quote(model)} {quote(out)} --out pruned/"))


@app.command()
def apply(
    model: Annotated[Path, typer.Argument(metavar="MODEL", help="The model the plan was made for.")],
    plan_dir: Annotated[Path, typer.Argument(metavar="PLAN", help="A directory written by `tamp-fx plan`.")],
    out: Annotated[Path, typer.Option(help="Directory to write the pruned model to (a .pt2 file for a .pt2).")],
    quantize: Annotated[Optional[Quantize], typer.Option(
        metavar="NAME", help="Also quantize with torchao: int8-weight (Hugging Face, GGUF) or pt2e-x86 (.pt2).")
    ] = None,
    calib: Annotated[Optional[Path], typer.Option(help="Calibration inputs (.safetensors) for pt2e-x86.")] = None,
    format: Annotated[Format, typer.Option(
        metavar="NAME", help="dense, or semi-structured: a 2:4 plan for the 2:4 kernels of CUDA GPUs.")
    ] = Format.dense,
    allow_nonfinite: AllowNonfinite = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
    log_format: Log = LogFormat.auto,
) -> None:
    """Apply a plan to MODEL and save a pruned model that loads like the original, with tamp-fx.json and a
    model card (README.md) saying how it was pruned (`tamp-fx inspect OUT` prints it).

    --quantize needs torchao: pip install --no-deps torchao==0.18.0.

    --format semi-structured writes bfloat16; tamp_fx.prune.semi_structured.load runs it on a CUDA GPU.
    """
    setup(verbose, log_format)

    with user_errors():
        import tamp_fx
        from tamp_fx.prune.semi_structured import cuda_problem
        plan_ = tamp_fx.Plan.load(plan_dir)
        start = time.perf_counter()
        scheme = quantize.value if quantize else None
        tamp_fx.apply(model, plan_, out, overwrite=overwrite, progress=not quiet, quantize=scheme, calib=calib,
                      format=format.value, command=["tamp-fx", *sys.argv[1:]], allow_nonfinite=allow_nonfinite)
        semi = format.value == "semi-structured"
        problem = cuda_problem() if semi else None
        if problem:
            console.print(f"note: {out} is written, but its 2:4 kernels run only on a CUDA GPU (sm80+) via "
                          f"tamp_fx.prune.semi_structured.load ({problem}); from_pretrained loads it dense",
                          highlight=False, soft_wrap=True)
        program = model.suffix == ".pt2"                 # eval takes Hugging Face and GGUF models
        done(f"applied {len(plan_.linears)} masks{f', quantized {scheme},' if scheme else ''}"
             f"{', 2:4 semi-structured (bfloat16),' if semi else ''} in {time.perf_counter() - start:.1f} s",
             f"pruned model written to {out}",
             *([] if program else next_steps(f"tamp-fx eval {quote(out)} --text FILE.txt")))


@app.command()
def export(
    model: Annotated[Path, typer.Argument(metavar="MODEL", help="Hugging Face model directory or .gguf file.")],
    calib: Annotated[Path, typer.Option(help="Calibration data, as for `tamp-fx plan`.")],
    out: Annotated[Path, typer.Option(help="The .pt2 file to write the language decoder to.")],
    calib_out: Annotated[Path, typer.Option(help="The .safetensors file to write its calibration inputs to.")],
    nsamples: NSamples = 128,
    seqlen: SeqLen = 512,
    seed: Seed = 0,
    allow_nonfinite: AllowNonfinite = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
    log_format: Log = LogFormat.auto,
) -> None:
    """Write MODEL's language decoder as a .pt2 program, and its inputs on --calib for `tamp-fx plan`.

    The program maps inputs_embeds to logits; the inputs keep image/audio tokens embedded and modality labels.
    """
    setup(verbose, log_format)

    with user_errors():
        from tamp_fx.write.export import export_decoder
        start = time.perf_counter()
        result = export_decoder(model, calib, out, calib_out, nsamples=nsamples, seqlen=seqlen, seed=seed,
                                overwrite=overwrite, progress=not quiet, allow_nonfinite=allow_nonfinite)
        done(f"exported the language decoder and {result.samples} calibration inputs "
             f"in {time.perf_counter() - start:.1f} s",
             f"program written to {result.program}", f"inputs written to {result.calibration}",
             *next_steps(f"tamp-fx plan {quote(result.program)} --calib {quote(result.calibration)} --out plan/"))


@app.command()
def convert(
    model: Annotated[Path, typer.Argument(metavar="MODEL", help="A .gguf file.")],
    out: Annotated[Path, typer.Option(help="Directory to write the Hugging Face model to.")],
    overwrite: Overwrite = False,
    verbose: Verbose = False,
) -> None:
    """Convert a GGUF model to a Hugging Face directory (de-quantized), which loads faster."""
    setup(verbose)

    with user_errors():
        import tamp_fx
        start = time.perf_counter()
        tamp_fx.convert(model, out, overwrite=overwrite)
        done(f"converted {model.name} in {time.perf_counter() - start:.1f} s", f"model written to {out}",
             *next_steps(f"tamp-fx plan {quote(out)} --calib FILE --out plan/"))
