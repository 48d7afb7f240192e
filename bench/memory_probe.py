"""Where a plan's peak memory falls: resident memory sampled every 20 ms with the decoder layer and
stage the plan was in (and, with ``--heap``, glibc's heap size / in use / free from ``mallinfo2``).

    python bench/memory_probe.py --method sparsegpt                  # SmolLM2 as bench/speed.py converts it
    python bench/memory_probe.py --method wanda --heap --json probe.json

Prints the peak with its layer and stage, then per layer the resident memory at the start and the
highest, per stage. ``--heap`` takes the heap's locks every sample and slows the plan (~15%): leave it
off when the time matters. Run it alone (README, "Speed").
"""
from __future__ import annotations

import argparse
import ctypes
import json
import sys
import threading
import time
from pathlib import Path


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def _rss_mib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) // 1024 for line in status if line.startswith("VmRSS"))


def _where(main: int) -> tuple[int | None, int | None]:
    """The decoder layer and stage the main thread is in (the staged or the layer-at-once driver)."""
    frame = sys._current_frames().get(main)
    while frame is not None:
        if frame.f_code.co_name in ("prune_in_stages", "_run_samples"):
            layer = frame.f_locals.get("layer")
            return (layer if isinstance(layer, int) else None), frame.f_locals.get("k")
        frame = frame.f_back
    return None, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("bench-out/smollm2-135m"))
    parser.add_argument("--calib", type=Path, default=Path("bench-out/calib-first-half.txt"))
    parser.add_argument("--method", default="wanda")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--heap", action="store_true", help="also glibc's heap figures (slower)")
    parser.add_argument("--json", type=Path, help="write every sample here")
    args = parser.parse_args()

    import tamp_fx
    from tamp_fx.runtime import timing
    from tamp_fx.runtime.memory import process_peak_mib
    mallinfo2 = None
    if args.heap:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
        mallinfo2.restype = _MallInfo2
    main_thread, samples, done = threading.get_ident(), [], threading.Event()

    def sample() -> None:
        start = time.perf_counter()
        while not done.is_set():
            layer, stage_index = _where(main_thread)
            running = timing._RUNNING[-1]._open if timing._RUNNING else []
            row = {"s": round(time.perf_counter() - start, 2), "rss_mib": _rss_mib(), "layer": layer,
                   "stage": stage_index, "timer": running[-1][0] if running else None}
            if mallinfo2 is not None:
                info = mallinfo2()
                row.update(heap_mib=info.arena >> 20, in_use_mib=info.uordblks >> 20, free_mib=info.fordblks >> 20,
                           mapped_mib=info.hblkhd >> 20)
            samples.append(row)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    tamp_fx.plan(args.model, args.calib, tamp_fx.PlanConfig(method=args.method, sparsity=0.5, nsamples=args.nsamples,
                                                            seqlen=args.seqlen), dtype=args.dtype)
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    peak = max(samples, key=lambda row: row["rss_mib"])
    print(f"{args.method}: {seconds:.1f} s, process peak {process_peak_mib():.0f} MiB; highest sample {peak}")
    layers = sorted({row["layer"] for row in samples if row["layer"] is not None})
    for layer in layers:
        rows = [row for row in samples if row["layer"] == layer]
        stages = sorted({row["stage"] for row in rows if row["stage"] is not None})
        highest = {k: max(row["rss_mib"] for row in rows if row["stage"] == k) for k in stages}
        print(f"layer {layer}: starts at {rows[0]['rss_mib']} MiB, highest per stage {highest}")
    if args.json:
        args.json.write_text(json.dumps(samples) + "\n")


if __name__ == "__main__":
    main()
