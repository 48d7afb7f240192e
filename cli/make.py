"""Commands that make something: ``plan``, ``apply``, ``export`` and ``convert``."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from tamp_fx.allocate.strategies import ALLOCATORS
from tamp_fx.cli.app import (
    Allocation,
    Device,
    Dtype,
    Format,
    Method,
    NSamples,
    Overwrite,
    Quantize,
    Quiet,
    Score,
    Seed,
    SeqLen,
    Tokens,
    Verbose,
    app,
    console,
    fraction,
    positive,
    process_group,
    setup,
    user_errors,
)


@app.command()
def plan(
    model: Annotated[Path, typer.Argument(help="Hugging Face model directory, .gguf file, or .pt2 exported program.")],
    calib: Annotated[Path, typer.Option(help="Calibration data: a text file, or LLaVA-style .json/.jsonl conversations; "
                                             "for a .pt2 program its inputs (.safetensors, e.g. from `tamp-fx export`).")],
    out: Annotated[Path, typer.Option(help="Directory to write plan.json and masks.safetensors to.")],
    method: Annotated[Method, typer.Option(
        help="Pruning method: a shortcut for allocation + score + tokens (tamp = das + wanda + amia). Best measured "
             "on fixture 2 (README, 'Which method'): sparsegpt where a Hessian per linear fits (das-sparsegpt-atv "
             "ties it), wanda-atv where it does not.")] = Method.wanda,
    sparsity: Annotated[Optional[float], typer.Option(
        callback=fraction,
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
    atv_alpha: Annotated[float, typer.Option(
        callback=positive,
        help="--tokens atv: image tokens kept per text token, as a multiple of the layer's mean change.")] = 1.0,
    max_sparsity_delta: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="DAS / ECoFLaP: no group sparser than sparsity + this.")] = 0.1,
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
    setup(verbose)

    with process_group() as world, user_errors():
        import tamp_fx
        from tamp_fx.api import plan_inputs
        from tamp_fx.load.source import resolve_source
        from tamp_fx.runtime import distributed
        from tamp_fx.runtime.output import check_output
        with distributed.guarded():                      # under torchrun: one line for what every rank refuses
            config = tamp_fx.PlanConfig(method=method.value, sparsity=sparsity, pattern=pattern, nsamples=nsamples,
                                        seqlen=seqlen, seed=seed, allocation=allocation.value if allocation else None,
                                        score=score.value if score else None, tokens=tokens.value if tokens else None,
                                        max_sparsity_delta=max_sparsity_delta, atv_alpha=atv_alpha)
            source = resolve_source(model)                # once for the command
            protect = plan_inputs(source, calib)
            check_output(out, overwrite=overwrite, protect=protect)
        start = time.perf_counter()
        whole_only = source.kind == "gguf" or ALLOCATORS[config.allocation].needs_zeroth_order
        result = tamp_fx.plan(source, calib, config, progress=not quiet, device=device, dtype=dtype,
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
             "linears listed in semi_structured.json; tamp_fx.prune.semi_structured.load runs them with the 2:4 sparse "
             "kernels of a CUDA GPU (sm80+), from_pretrained loads it dense.")] = Format.dense,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Apply a plan to MODEL and save a pruned model that loads like the original, with tamp-fx.json and a model
    card (README.md) saying how it was pruned (`tamp-fx inspect OUT` prints it)."""
    setup(verbose)

    with user_errors():
        import tamp_fx
        from tamp_fx.prune.semi_structured import cuda_problem
        plan_ = tamp_fx.Plan.load(plan_dir)
        start = time.perf_counter()
        scheme = quantize.value if quantize else None
        tamp_fx.apply(model, plan_, out, overwrite=overwrite, progress=not quiet, quantize=scheme, calib=calib,
                      format=format.value, command=["tamp-fx", *sys.argv[1:]])
        semi = format.value == "semi-structured"
        console.print(f"applied {len(plan_.linears)} masks{f', quantized {scheme},' if scheme else ''}"
                      f"{', 2:4 semi-structured (bfloat16),' if semi else ''} "
                      f"in {time.perf_counter() - start:.1f} s -> {out}", highlight=False)
        problem = cuda_problem() if semi else None
        if problem:
            console.print(f"note: {out} is written, but its 2:4 kernels run only on a CUDA GPU (sm80+) via "
                          f"tamp_fx.prune.semi_structured.load ({problem}); from_pretrained loads it dense",
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
    setup(verbose)

    with user_errors():
        from tamp_fx.write.export import export_decoder
        start = time.perf_counter()
        result = export_decoder(model, calib, out, calib_out, nsamples=nsamples, seqlen=seqlen, seed=seed,
                                overwrite=overwrite, progress=not quiet)
        console.print(f"exported the language decoder to {result.program} and {result.samples} calibration inputs "
                      f"to {result.calibration} in {time.perf_counter() - start:.1f} s", highlight=False)


@app.command()
def convert(
    model: Annotated[Path, typer.Argument(help="A .gguf file.")],
    out: Annotated[Path, typer.Option(help="Directory to write the Hugging Face model to.")],
    overwrite: Overwrite = False,
) -> None:
    """Convert a GGUF model to a Hugging Face directory (de-quantized), which loads faster."""
    setup(False)

    with user_errors():
        import tamp_fx
        start = time.perf_counter()
        tamp_fx.convert(model, out, overwrite=overwrite)
        console.print(f"converted {model.name} in {time.perf_counter() - start:.1f} s -> {out}", highlight=False)
