"""What tests/runtime/test_distributed.py runs under ``torchrun`` (or plain python: one process).

    distributed_worker.py plans OUT METHODS MODEL...  plan every (model, method) with 3 samples (a method
                                                      "wanda+atv" is wanda with --tokens atv)
                                                      (2 on rank 0, 1 on rank 1);
                                                      rank 0 saves OUT/<model dir name>-<method>
    distributed_worker.py cli STATE FAULT ARGS...     the ``tamp-fx`` command line with ARGS; each
                                                      rank writes its exit status to STATE/exit-<rank>.
                                                      FAULT: "none", "corrupt:<rank>" (that rank's last
                                                      sample reaches layer 0 one feature too wide), or
                                                      "wait" (every rank writes STATE/ready-<rank> with
                                                      its pid and sleeps, to be interrupted)
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def plans(out: Path, methods: list[str], models: list[Path]) -> None:
    import tamp_fx
    from tamp_fx.runtime import distributed
    for model in models:
        for method in methods:
            shortcut, _, tokens = method.partition("+")
            config = tamp_fx.PlanConfig(method=shortcut, tokens=tokens or None, sparsity=0.5, nsamples=3)
            plan = tamp_fx.plan(model, model / "calib.jsonl", config)
            if distributed.world().rank == 0:
                plan.save(out / f"{model.name}-{method}")
    distributed.end_process(0)


def cli(state: Path, fault: str, args: list[str]) -> None:
    import torch

    import tamp_fx.pipeline.plan
    rank = int(os.environ.get("RANK", "0"))
    capture = tamp_fx.pipeline.plan.capture_layer_inputs

    def faulty_capture(*a, **kw):
        acts = capture(*a, **kw)
        if fault == f"corrupt:{rank}":
            h = acts.hidden[-1]                                         # (1, N, C)
            acts.hidden[-1] = torch.cat([h, h[..., :1]], -1)           # (1, N, C + 1): layer 0 fails on it
        if fault == f"die:{rank}":                                     # killed mid-work (the OOM killer)
            os._exit(1)
        if fault == "wait":
            (state / f"ready-{rank}").write_text(str(os.getpid()))
            time.sleep(120)
        return acts
    tamp_fx.pipeline.plan.capture_layer_inputs = faulty_capture
    from tamp_fx.cli.main import main
    sys.argv = ["tamp-fx", *args]
    code: object = 0
    try:
        code = main()                                               # 130 after Ctrl-C (tamp_fx.cli.run)
    except SystemExit as exit_:
        code = exit_.code
        raise
    except BaseException as error:
        code = type(error).__name__
        raise
    finally:
        (state / f"exit-{rank}").write_text(str(code))


if __name__ == "__main__":
    if sys.argv[1] == "plans":
        plans(Path(sys.argv[2]), sys.argv[3].split(","), [Path(m) for m in sys.argv[4:]])
    else:
        cli(Path(sys.argv[2]), sys.argv[3], sys.argv[4:])
