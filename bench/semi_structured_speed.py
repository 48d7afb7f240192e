"""2:4 semi-structured weights against dense bf16 on one Llama-style decoder layer (CUDA, sm80+).

    python bench/semi_structured_speed.py                      # hidden 4096, intermediate 11008, 32 heads
    python bench/semi_structured_speed.py --backend cutlass    # torch's CUTLASS kernels instead of cuSPARSELt

One LlamaDecoderLayer (random weights, seed 0, bfloat16, sdpa attention, 32 key/value heads) has
its seven linears pruned 2:4 by magnitude; the dense baseline is the same pruned layer with
ordinary dense weights, the sparse one the same weights as ``SparseSemiStructuredTensor``
(:func:`tamp_fx.prune.semi_structured.sparsify`). Timed, eager, under ``torch.inference_mode``:

- prefill: the whole layer (norms, q/k/v/o, causal attention, MLP) on batch 1 x 2048 and 8 x 512 tokens;
- decode: the whole layer on one new token per sequence (batch 1 and 16) attending to a KV cache
  of 2048 tokens held in a preallocated buffer (the new token's keys and values are written in place);
- linears only: the seven projections (q, k, v, o, gate, up, down) called one after another on
  2048, 4096, 1 and 16 tokens, the part the 2:4 kernels change.

Each time is the median of ``--repeats`` CUDA-event timings after ``--warmup`` calls. Exit status 2,
with one line, without a CUDA GPU of compute capability 8.0+.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys

import torch

from tamp_fx.prune import semi_structured
from tamp_fx.prune.masks import apply_mask, nm_keep_mask

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def cuda_median_ms(fn, repeats: int, warmup: int) -> float:
    """Median wall time of ``fn()`` on the GPU in milliseconds, from CUDA events, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def build_layer(hidden: int, intermediate: int, heads: int, device: str, dtype: torch.dtype):
    """A random LlamaDecoderLayer with its seven linears pruned 2:4 by magnitude, and its rotary embedding."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads,
                         num_key_value_heads=heads, max_position_embeddings=8192, attn_implementation="sdpa")
    torch.manual_seed(0)
    layer = LlamaDecoderLayer(config, layer_idx=0).to(device, dtype).eval()
    with torch.no_grad():
        for name in LINEARS:
            weight = layer.get_submodule(name).weight                           # (C_out, C_in)
            weight.copy_(apply_mask(weight, nm_keep_mask(weight.abs().float(), 2, 4)))
    return layer, LlamaRotaryEmbedding(config).to(device), config


class PreallocatedKV:
    """A KV cache of ``past`` tokens in a buffer with one free slot: ``update`` writes the new
    token's keys and values into that slot and returns the whole buffer, so every decode step
    attends to past + 1 tokens and the cache never grows."""

    def __init__(self, batch: int, heads: int, head_dim: int, past: int, device: str, dtype: torch.dtype,
                 generator: torch.Generator) -> None:
        shape = (batch, heads, past + 1, head_dim)
        self.keys = torch.randn(shape, device=device, dtype=dtype, generator=generator)     # (B, H, past + 1, D)
        self.values = torch.randn(shape, device=device, dtype=dtype, generator=generator)   # (B, H, past + 1, D)

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.keys[:, :, -1:].copy_(keys)                                        # keys: (B, H, 1, D)
        self.values[:, :, -1:].copy_(values)
        return self.keys, self.values


def cases(layer, rotary, config, past: int, device: str, dtype: torch.dtype) -> dict[str, tuple[str, callable]]:
    """Name -> (what is timed, a call of ``layer``). The same calls run on the dense and the sparse layer."""
    g = torch.Generator(device=device).manual_seed(1)
    out: dict[str, tuple[str, callable]] = {}
    head_dim = config.hidden_size // config.num_attention_heads
    for batch, tokens in ((1, 2048), (8, 512)):
        x = torch.randn(batch, tokens, config.hidden_size, device=device, dtype=dtype, generator=g)   # (B, T, C)
        pos = torch.arange(tokens, device=device).expand(batch, tokens)                            # (B, T)
        emb = rotary(x, pos)
        out[f"prefill {batch} x {tokens}"] = ("whole layer, causal", lambda x=x, emb=emb: layer(x, position_embeddings=emb))
    for batch in (1, 16):
        x = torch.randn(batch, 1, config.hidden_size, device=device, dtype=dtype, generator=g)       # (B, 1, C)
        emb = rotary(x, torch.full((batch, 1), past, device=device))
        kv = PreallocatedKV(batch, config.num_key_value_heads, head_dim, past, device, dtype, g)
        out[f"decode {batch} x 1"] = (f"whole layer, KV cache {past}",
                                      lambda x=x, emb=emb, kv=kv: layer(x, position_embeddings=emb, past_key_values=kv))
    for tokens in (2048, 4096, 1, 16):
        inputs = {name: torch.randn(tokens, layer.get_submodule(name).in_features, device=device, dtype=dtype, generator=g)
                  for name in LINEARS}                                                             # (T, C_in) each
        out[f"linears {tokens} tokens"] = ("7 projections",
                                           lambda inputs=inputs: [layer.get_submodule(n)(x) for n, x in inputs.items()])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--past", type=int, default=2048, help="KV cache length of the decode cases")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--backend", choices=("cusparselt", "cutlass"), default="cusparselt")
    args = parser.parse_args()
    problem = semi_structured.cuda_problem()
    if problem:
        print(f"bench/semi_structured_speed.py needs a CUDA GPU with compute capability 8.0+ ({problem})", file=sys.stderr)
        return 2
    torch.sparse.SparseSemiStructuredTensor._FORCE_CUTLASS = args.backend == "cutlass"
    device, dtype = "cuda", torch.bfloat16
    dense, rotary, config = build_layer(args.hidden, args.intermediate, args.heads, device, dtype)
    sparse = semi_structured.sparsify(copy.deepcopy(dense), LINEARS, dtype)
    rows = []
    with torch.inference_mode():
        dense_cases = cases(dense, rotary, config, args.past, device, dtype)
        sparse_cases = cases(sparse, rotary, config, args.past, device, dtype)
        for name, (what, dense_call) in dense_cases.items():
            sparse_call = sparse_cases[name][1]
            d, s = dense_call(), sparse_call()
            d, s = (d[-1], s[-1]) if isinstance(d, list) else (d, s)
            error = float((d.float() - s.float()).norm() / d.float().norm())
            t_dense = cuda_median_ms(dense_call, args.repeats, args.warmup)
            t_sparse = cuda_median_ms(sparse_call, args.repeats, args.warmup)
            rows.append((name, what, t_dense, t_sparse, error))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.backend}; one Llama decoder layer "
          f"(hidden {args.hidden}, intermediate {args.intermediate}, {args.heads} heads, bfloat16, sdpa, eager), "
          f"7 linears 2:4 by magnitude; median of {args.repeats} CUDA-event timings after {args.warmup} warm-up calls")
    print("| case | timed | dense bf16 (ms) | 2:4 (ms) | speedup | relative difference |")
    print("|---|---|---:|---:|---:|---:|")
    for name, what, t_dense, t_sparse, error in rows:
        print(f"| {name} | {what} | {t_dense:.3f} | {t_sparse:.3f} | {t_dense / t_sparse:.2f}x | {error:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
