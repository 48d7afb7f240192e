"""AMIA token selection speed: `tamp_fx.statistics.amia.select_tokens` against its floor, one float32
(N x C) @ (C x N) matmul (the Gram matrix it has to compute anyway).

For every N and C: outputs = low-rank Gaussian (rank --rank) plus Gaussian noise, attention =
softmax of random logits (scale 2), diversity --diversity; everything seeded. Each timing is
the median of --repeats wall-clock runs (time.perf_counter) after --warmup untimed runs, in this
process, with torch's default intra-op threads unless --threads is given. Prints a Markdown
table; the ratio is select_tokens / matmul (the target is <= 3 at N = 2048, C = 4096).

    python bench/amia_speed.py                      # N in {256, 1024, 2048}, C in {576, 4096}
    python bench/amia_speed.py --sizes 256 1024 --channels 576 --naive
"""
from __future__ import annotations

import argparse
import math
import os

import torch
from timing import median_seconds

from tamp_fx.statistics.amia import AmiaParams, select_tokens


def make_case(n: int, c: int, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    low = torch.randn(n, rank, generator=gen) @ torch.randn(rank, c, generator=gen)  # (N, C)
    outputs = low / math.sqrt(rank) + 0.5 * torch.randn(n, c, generator=gen)       # (N, C)
    attention = torch.softmax(2.0 * torch.randn(n, generator=gen), 0)               # (N,)
    return outputs, attention


def naive_select(outputs: torch.Tensor, attention: torch.Tensor, diversity: float,
                 params: AmiaParams = AmiaParams()) -> torch.Tensor:
    """Reference-style variant: same precompute (plain topk kNN), then every greedy step
    recomputes MMD^2 from the whole kernel, O(N^2) per step."""
    n = outputs.shape[0]
    z = torch.nn.functional.normalize(outputs.float(), dim=1, eps=1e-12)  # (N, C)
    dist = 1.0 - z @ z.T                                                   # (N, N)
    kern = torch.exp(-dist).double()                                       # (N, N)
    dist.diagonal().fill_(math.inf)
    k = min(params.k, n - 1)
    nd, nbr = dist.topk(k, dim=1, largest=False)                           # (N, k)
    a = attention.double()
    g = a + (torch.exp(-params.knn_temperature * nd.double()) * a[nbr]).sum(1)  # (N,)
    supw = torch.exp(-params.suppress_temperature * nd.double())           # (N, k)
    selected = torch.zeros(n, dtype=torch.float64)                         # (N,)
    thr = params.threshold * math.sqrt(diversity)
    chosen = []
    for m in range(1, n + 1):
        i = int(torch.where(selected > 0, -math.inf, g).argmax())
        chosen.append(i)
        selected[i] = 1.0
        g[nbr[i]] -= supw[i] * max(float(g[i]), 0.0)
        mmd2 = kern.mean() + selected @ kern @ selected / m**2 - 2 * (kern @ selected).sum() / (n * m)
        if float(mmd2) < thr:
            break
    return torch.tensor(chosen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 2048], help="N values")
    parser.add_argument("--channels", type=int, nargs="+", default=[576, 4096], help="C values")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--diversity", type=float, default=0.5)
    parser.add_argument("--rank", type=int, default=16, help="rank of the low-rank part of outputs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--naive", action="store_true",
                        help="also time the O(N^2)-per-step variant at N=1024, C=576")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    print(f"torch {torch.__version__}, torch.get_num_threads() = {torch.get_num_threads()}, "
          f"os.cpu_count() = {os.cpu_count()}, load average at start = {os.getloadavg()}")
    print(f"median of {args.repeats} runs after {args.warmup} warm-up run(s); diversity = "
          f"{args.diversity}, outputs rank {args.rank} + noise, attention = softmax(2 * randn)\n")
    print("| N | C | tokens selected | select_tokens (ms) | matmul N×C @ C×N fp32 (ms) | ratio |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in args.sizes:
        for c in args.channels:
            outputs, attention = make_case(n, c, args.rank, args.seed)
            picked = select_tokens(outputs, attention, args.diversity)
            t_sel = median_seconds(lambda: select_tokens(outputs, attention, args.diversity),
                                   args.repeats, args.warmup)
            t_mm = median_seconds(lambda: outputs @ outputs.T, args.repeats, args.warmup)
            print(f"| {n} | {c} | {picked.numel()} | {t_sel * 1e3:.2f} | {t_mm * 1e3:.2f} | "
                  f"{t_sel / t_mm:.2f} |", flush=True)
    if args.naive:
        outputs, attention = make_case(1024, 576, args.rank, args.seed)
        picked = naive_select(outputs, attention, args.diversity)
        t_naive = median_seconds(lambda: naive_select(outputs, attention, args.diversity),
                                 args.repeats, args.warmup)
        t_sel = median_seconds(lambda: select_tokens(outputs, attention, args.diversity),
                               args.repeats, args.warmup)
        print(f"\nnaive O(N^2)-per-step variant at N=1024, C=576: {t_naive * 1e3:.2f} ms "
              f"({picked.numel()} tokens) vs select_tokens {t_sel * 1e3:.2f} ms")
    print(f"\nload average at end = {os.getloadavg()}")


if __name__ == "__main__":
    main()
