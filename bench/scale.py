"""Plan random-weight checkpoints with the shapes of real models: wall time, peak RSS, peak GPU memory.

The checkpoint is written a decoder layer at a time (bfloat16 safetensors shards, one per layer,
values from a seeded generator per tensor), so writing it needs about one layer of memory too;
each method is then planned in a fresh process, whose peak RSS is reported (writing does not
count). With ``--apply`` each plan is saved and applied to the checkpoint in another fresh process,
whose time and peak RSS are reported too. The checkpoint (and the plans) are deleted afterwards unless ``--keep``.

    python bench/scale.py --case a        # CPU, Llama-3-8B shapes, wanda + tamp, 4 x 128 tokens
    python bench/scale.py --case a --methods wanda --apply   # and the memory apply needs at 8B
    python bench/scale.py --case b        # CPU, Qwen2.5-14B shapes (29 GB), wanda, 2 x 64 tokens
    python bench/scale.py --case c        # CUDA, LLaVA-NeXT with (a)'s LM, ~2,900 image tokens, 128 samples
    python bench/scale.py --case a --layers 2 --hidden 256 --intermediate 512 --vocab 4096   # scaled down

Calibration: (a)/(b) windows of the bundled WikiText-2 excerpt; (c) conversations with one
672 x 672 image each (LLaVA-NeXT anyres: 5 x 576 patch tokens, 2,928 image tokens) and about
100 text tokens. The tokenizer is tamp_fx.testbeds.tiny's small BPE (its ids fit any vocabulary).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch


@dataclass(frozen=True)
class Shape:
    family: str               # "llama", "qwen2" or "llava_next" (with a small CLIP tower)
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int


@dataclass(frozen=True)
class Case:
    shape: Shape
    methods: tuple[str, ...]
    nsamples: int
    seqlen: int
    device: str


LLAMA3_8B = Shape("llama", 4096, 14336, 32, 32, 8, 128256)
CASES = {
    "a": Case(LLAMA3_8B, ("wanda", "tamp"), 4, 128, "cpu"),
    "b": Case(Shape("qwen2", 5120, 13824, 48, 40, 8, 152064), ("wanda",), 2, 64, "cpu"),
    "c": Case(replace(LLAMA3_8B, family="llava_next"), ("wanda", "tamp"), 128, 0, "cuda"),
}
IMAGE = 672                   # px: anyres 2 x 2 tiles of 336 + the base image -> 2,928 image tokens
TEXT_WORDS = 28               # about 100 tokens of the small BPE per conversation (with the template)


# --- writing the checkpoint ---------------------------------------------------------------

def _config(shape: Shape, tokenizer):
    import transformers
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    text = dict(hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_hidden_layers=shape.layers,
                num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, vocab_size=shape.vocab,
                max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False, **ids)
    if shape.family == "qwen2":
        config = transformers.Qwen2Config(**text)
    elif shape.family == "llama":
        config = transformers.LlamaConfig(**text)
    else:
        vision = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                               num_attention_heads=4, image_size=336, patch_size=14)
        config = transformers.LlavaNextConfig(
            text_config=transformers.LlamaConfig(**text).to_dict(), vision_config=vision.to_dict(),
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
            vision_feature_select_strategy="default", tie_word_embeddings=False,
            image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]])
    config.architectures = [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                             "llava_next": "LlavaNextForConditionalGeneration"}[shape.family]]
    config.dtype = "bfloat16"
    return config


def _random(name: str, shape: torch.Size, seed: int, pool: ThreadPoolExecutor) -> torch.Tensor:
    """bfloat16 values for tensor ``name``: norms 1, biases and 1-D vectors small, matrices
    N(0, 1/fan_in); drawn in 16M-value chunks, each from its own generator seeded by the name
    and the chunk, on every core (torch releases the GIL), so a 16 GB model is written in minutes."""
    out = torch.empty(shape, dtype=torch.bfloat16)
    if len(shape) == 1 and "norm" in name:
        return out.fill_(1.0)
    std = 0.02 if len(shape) < 2 or "embed" in name else shape[-1] ** -0.5
    flat, step, base = out.view(-1), 1 << 24, zlib.crc32(name.encode())

    def fill(a: int) -> None:
        generator = torch.Generator().manual_seed((seed * 2**32 + base) * 4099 + a // step)
        n = min(step, flat.numel() - a)
        flat[a:a + n] = torch.randn(n, generator=generator).mul_(std)
    list(pool.map(fill, range(0, flat.numel(), step)))
    return out


def write_checkpoint(shape: Shape, out: Path, seed: int = 0) -> Path:
    """A random ``shape`` model as a Hugging Face directory: config, tokenizer (or processor), one
    safetensors shard per decoder layer plus one for the rest, and the shard index."""
    import transformers
    from safetensors.torch import save_file

    from tamp_fx.testbeds import tiny
    spec = tiny.family_spec("llava_next" if shape.family == "llava_next" else "llama")
    tokenizer = tiny._build_tokenizer(spec)
    config = _config(shape, tokenizer)
    with torch.device("meta"):
        model = getattr(transformers, config.architectures[0])(config)
    names = {n: t.shape for n, t in model.state_dict().items()}
    layer_of = {n: int(n.split("layers.")[1].split(".")[0]) if ".layers." in n and "vision" not in n else -1
                for n in names}
    out.mkdir(parents=True)
    weight_map, total = {}, 0
    pool = ThreadPoolExecutor(os.cpu_count())
    for shard_index in range(-1, shape.layers):
        members = [n for n in names if layer_of[n] == shard_index]
        file = f"model-{shard_index + 1:05d}-of-{shape.layers + 1:05d}.safetensors"
        tensors = {n: _random(n, names[n], seed, pool) for n in members}
        save_file(tensors, out / file, metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({n: file for n in members})
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=1))
    config.save_pretrained(out)
    if shape.family == "llava_next":
        _processor(tokenizer, config).save_pretrained(out)
    else:
        tokenizer.save_pretrained(out)
    return out


def _processor(tokenizer, config):
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                                 image_grid_pinpoints=config.image_grid_pinpoints)
    return LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=tokenizer.chat_template)


def write_calibration(case: Case, out: Path, seed: int = 0) -> Path:
    """(a)/(b): the bundled WikiText-2 excerpt; (c): conversations with one 672 x 672 image each."""
    from tamp_fx.testbeds.demo import CALIB_TEXT
    if case.shape.family != "llava_next":
        return CALIB_TEXT
    from PIL import Image
    words = CALIB_TEXT.read_text(encoding="utf-8").split()
    rng = np.random.default_rng(seed)
    (out / "images").mkdir(parents=True)
    with (out / "calib.jsonl").open("w", encoding="utf-8") as f:
        for k in range(case.nsamples):
            pixels = rng.integers(0, 256, (IMAGE // 16, IMAGE // 16, 3), dtype=np.uint8).repeat(16, 0).repeat(16, 1)
            Image.fromarray(pixels).save(out / "images" / f"{k}.png")
            start = int(rng.integers(0, len(words) - TEXT_WORDS))
            f.write(json.dumps({"image": f"images/{k}.png", "conversations": [
                {"from": "human", "value": "<image>\n" + " ".join(words[start:start + TEXT_WORDS // 2])},
                {"from": "gpt", "value": " ".join(words[start + TEXT_WORDS // 2:start + TEXT_WORDS])}]}) + "\n")
    return out / "calib.jsonl"


# --- planning, one method per process -----------------------------------------------------

def one(method: str, model: Path, calib: Path, nsamples: int, seqlen: int, device: str, dtype: str | None,
        offload: bool, plan_dir: Path | None) -> dict:
    import tamp_fx
    from tamp_fx.runtime.memory import process_peak_mib
    cuda = device.startswith("cuda")
    start = time.perf_counter()
    plan = tamp_fx.plan(model, calib, tamp_fx.PlanConfig(method=method, sparsity=0.5, nsamples=nsamples,
                                                         seqlen=seqlen or 512),
                        device=device, dtype=dtype, offload_activations=offload)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = plan.linears[next(iter(plan.linears))].stats.get("tokens")
    row = {"method": method, "seconds": round(seconds, 1),
           "peak_rss_gib": round(process_peak_mib() / 1024, 2),
           "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
           "threads": torch.get_num_threads(), "sparsity": round(plan.summary()["sparsity"], 6),
           "samples": plan.model["calibration"]["samples"], "tokens_layer0_linear0": tokens,
           "device": torch.cuda.get_device_name() if cuda else "cpu"}
    if plan_dir is not None:
        plan.save(plan_dir, overwrite=True)
        del plan
        done = subprocess.run([sys.executable, __file__, "--apply-one", str(plan_dir), "--model", str(model)],
                              capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"applying the {method} plan failed:\n{done.stderr[-3000:]}")
        row.update(json.loads(done.stdout.strip().splitlines()[-1]))
    return row


def apply_one(plan_dir: Path, model: Path) -> dict:
    """Apply a saved plan to ``model`` (into a directory beside the plan, deleted after): time and peak RSS."""
    import tamp_fx
    from tamp_fx.runtime.memory import process_peak_mib
    out = plan_dir.with_name(plan_dir.name + "-applied")
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    try:
        tamp_fx.apply(model, plan_dir, out)
        return {"apply_seconds": round(time.perf_counter() - start, 1),
                "apply_peak_rss_gib": round(process_peak_mib() / 1024, 2)}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=sorted(CASES))
    parser.add_argument("--out-dir", type=Path, default=Path("bench-out"), help="where the checkpoint is written")
    for field in ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab"):
        parser.add_argument(f"--{field.replace('_', '-')}", type=int, help=f"override the case's {field}")
    parser.add_argument("--methods", nargs="+")
    parser.add_argument("--nsamples", type=int)
    parser.add_argument("--device")
    parser.add_argument("--dtype", help="compute dtype (default: tamp-fx plan's: bfloat16 where the hardware computes it "
                                        "natively, else float32 on the CPU and the checkpoint's on CUDA)")
    parser.add_argument("--offload-activations", action="store_true")
    parser.add_argument("--apply", action="store_true", help="also save each plan and apply it (time, peak RSS)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the checkpoint (it is reused when present) and the plans")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--apply-one", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--plan-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--calib", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.apply_one:
        print(json.dumps(apply_one(args.apply_one, args.model)))
        return
    if args.case is None:
        parser.error("the following arguments are required: --case")
    case = CASES[args.case]
    overrides = {f: getattr(args, f) for f in ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab")
                 if getattr(args, f) is not None}
    case = replace(case, shape=replace(case.shape, **overrides), methods=tuple(args.methods or case.methods),
                   nsamples=args.nsamples or case.nsamples, device=args.device or case.device)
    if args.one:
        print(json.dumps(one(args.one, args.model, args.calib, case.nsamples, case.seqlen, case.device, args.dtype,
                             args.offload_activations, args.plan_dir)))
        return
    s = case.shape
    name = f"scale-{s.family}-{s.layers}x{s.hidden}-{s.intermediate}-v{s.vocab}"
    model = args.out_dir / name
    if not (model / "config.json").is_file():
        shutil.rmtree(model, ignore_errors=True)
        start = time.perf_counter()
        write_checkpoint(s, model)
        size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
        print(f"wrote {model} ({size / 2**30:.1f} GiB) in {time.perf_counter() - start:.0f} s", flush=True)
    calib_dir = args.out_dir / f"{name}-calib-{case.nsamples}"
    shutil.rmtree(calib_dir, ignore_errors=True)
    calib = write_calibration(case, calib_dir)
    rows = []
    try:
        for method in case.methods:
            command = [sys.executable, __file__, "--one", method, "--case", args.case, "--model", str(model),
                       "--calib", str(calib), "--nsamples", str(case.nsamples), "--device", case.device,
                       *[f"--{k.replace('_', '-')}={v}" for k, v in overrides.items()]]
            if args.dtype:
                command += ["--dtype", args.dtype]
            if args.offload_activations:
                command.append("--offload-activations")
            if args.apply:
                command += ["--plan-dir", str(args.out_dir / f"{name}-plan-{method}")]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"planning {method} failed:\n{done.stderr[-3000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
            if args.json:                             # after every method: a later one may be stopped
                args.json.write_text(json.dumps({"case": args.case, "shape": s.__dict__, "nsamples": case.nsamples,
                                                 "rows": rows}, indent=1))
    finally:
        shutil.rmtree(calib_dir, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(model, ignore_errors=True)
            for method in case.methods:
                shutil.rmtree(args.out_dir / f"{name}-plan-{method}", ignore_errors=True)
    params = s.layers * (2 * s.hidden * s.hidden + 2 * s.hidden * s.hidden * s.kv_heads // s.heads
                         + 3 * s.hidden * s.intermediate)
    print(f"\ncase ({args.case}): {s.family}, {s.layers} layers, hidden {s.hidden}, intermediate {s.intermediate}, "
          f"heads {s.heads}/{s.kv_heads}, vocab {s.vocab} ({params / 1e9:.2f} B decoder linear parameters), "
          f"{case.nsamples} samples, {case.device}, CPU threads {rows[0]['threads']}\n")
    applied = " apply time | apply peak RSS |" if args.apply else ""
    print("| method | wall time | vs wanda | peak RSS | peak GPU memory |" + applied)
    print("|---|---|---|---|---|" + "---|---|" * bool(applied))
    base = next((r["seconds"] for r in rows if r["method"] == "wanda"), None)
    for r in rows:
        ratio = f"{r['seconds'] / base:.2f}x" if base else "-"
        gpu = f"{r['peak_gpu_gib']:.1f} GiB" if r["peak_gpu_gib"] is not None else "-"
        apply = f" {r['apply_seconds']:.0f} s | {r['apply_peak_rss_gib']:.2f} GiB |" if applied else ""
        print(f"| {r['method']} | {r['seconds']:.0f} s | {ratio} | {r['peak_rss_gib']:.2f} GiB | {gpu} |" + apply)


if __name__ == "__main__":
    main()
