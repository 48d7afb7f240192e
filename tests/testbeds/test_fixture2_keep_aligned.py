"""--keep-aligned: fixture 2's answer stage adds the alignment loss of the step's images, so
that the tower's tokens stay on their words while the answers are learned; 0 is the answer loss
alone. --keep-language adds the rehearsal loss on text SmolLM2 wrote, so that the LoRA keeps
modelling language."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.slow


def test_the_answer_step_adds_the_weighted_alignment_loss_of_its_images(tmp_path, smollm2_present):
    from tamp_fx.runtime.placement import cpu_autocast
    from tamp_fx.testbeds.fixture import train as train1
    from tamp_fx.testbeds.fixture2 import train

    args = train.parse(["--keep-aligned", "0.5", "--keep-language", "0", "--ideal-steps", "0", "--character-weight", "3",
                        "--batch", "2", "--turns", "2", "--init", "none", "--out", str(tmp_path / "w.safetensors"),
                        "--log", str(tmp_path / "log"), "--checkpoint", str(tmp_path / "ckpt")])
    run = train.Run(args, lambda **record: None)
    run.stage = train.STAGES.index("answer")
    run._start_stage(run.stage)

    def parts(step):
        items = train.batch_conversations(run.stage, step, 2, 2, run.held)
        images = [item[0] for item in items]
        with torch.no_grad():
            run.model.train()
            with cpu_autocast():
                logits, target, _ = train1.answer_logits(run.model, run.batcher, items)
            answer = F.cross_entropy(logits.float(), target)
            align = run.aligner.loss(run.aligner.outputs(run.model, run.batcher, images), run.aligner.labels(images), 3.0)
        return items, float(answer), float(align)

    items, answer, align = parts(1)
    assert align > 0.1
    assert run._answer_step(items) == pytest.approx(answer + 0.5 * align, rel=1e-4)
    run.args.keep_aligned = 0.0
    items, answer, _ = parts(2)
    assert run._answer_step(items) == pytest.approx(answer, rel=1e-4)


def test_keep_aligned_is_refused_when_negative_or_with_ideal_tokens(tmp_path):
    from tamp_fx.testbeds.fixture2 import train
    for argv in (["--keep-aligned", "-1"], ["--keep-aligned", "1", "--ideal-tokens", "--out", str(tmp_path / "w")]):
        with pytest.raises(SystemExit):
            train.parse(argv)


def test_keep_language_adds_the_weighted_rehearsal_loss_of_sequences_not_held_out(tmp_path, smollm2_present):
    from tamp_fx.runtime.placement import cpu_autocast
    from tamp_fx.testbeds.fixture import train as train1
    from tamp_fx.testbeds.fixture2 import train

    args = train.parse(["--keep-language", "0.7", "--keep-aligned", "0", "--ideal-steps", "0", "--batch", "2",
                        "--turns", "2", "--rehearsal-samples", "24", "--rehearsal-length", "8", "--rehearsal-batch", "3",
                        "--init", "none", "--out", str(tmp_path / "w.safetensors"), "--log", str(tmp_path / "log"),
                        "--checkpoint", str(tmp_path / "ckpt")])
    run = train.Run(args, lambda **record: None)
    text = run.rehearsal
    assert len(text.ids) == 24 and text.held == 16 and 1 < text.base_perplexity < 1e4
    run.stage = train.STAGES.index("answer")
    run._start_stage(run.stage)
    items = train.batch_conversations(run.stage, 1, 2, 2, run.held)
    index = text.training_indices(np.random.default_rng([train.TRAIN_SEED, run.stage, 1, 2]), 3)
    assert min(index) >= text.held and len(set(index)) == 3
    with torch.no_grad():
        run.model.train()
        with cpu_autocast():
            logits, target, _ = train1.answer_logits(run.model, run.batcher, items)
            rehearse = float(text.loss(run.model, index))
        answer = float(F.cross_entropy(logits.float(), target))
    run.step = 1
    assert run._answer_step(items) == pytest.approx(answer + 0.7 * rehearse, rel=1e-4)
