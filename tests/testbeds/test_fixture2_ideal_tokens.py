"""The --ideal-tokens diagnostic of fixture 2's training: the language model is fed exactly the
sums of the describing words' embeddings (and the newline vector after each tile row), never the
tower's output, and training starts at stage "answer"."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


def test_ideal_tokens_reach_the_language_model_in_place_of_the_tower(tmp_path, smollm2_present):
    from tamp_fx.testbeds.fixture2 import scenes, train

    args = train.parse(["--ideal-tokens", "--steps", "1", "--batch", "2", "--out", str(tmp_path / "w.safetensors"),
                        "--log", str(tmp_path / "log.jsonl"), "--checkpoint", str(tmp_path / "ckpt")])
    run = train.Run(args, lambda **record: None)
    assert train.STAGES[run.stage] == "answer"
    samples = scenes.split(5, 2)
    seen = {}
    lm = run.model.model.language_model
    handle = lm.register_forward_pre_hook(lambda module, a, kw: seen.update(embeds=kw["inputs_embeds"]), with_kwargs=True)
    run.model.model.vision_tower.forward = lambda *a, **k: pytest.fail("the tower ran")
    with torch.no_grad():
        ids = run.batcher(samples)[0]
        run.model.model(input_ids=ids, attention_mask=torch.ones_like(ids), **run.batcher.pixel_inputs(samples))
    handle.remove()
    image = ids == run.model.config.image_token_id                          # (2, T)
    got = seen["embeds"][image].view(2, 88, -1)                                    # (2, 88, D)
    want = run.aligner.labels(samples) @ run.aligner.embeddings                    # (2, 80, D)
    assert torch.allclose(got[:, train.CONTENT], want.to(got.dtype))
    newlines = sorted(set(range(88)) - set(train.CONTENT.tolist()))
    assert len(newlines) == 8 and torch.allclose(got[:, newlines], run.model.model.image_newline.expand(2, 8, -1))


def test_ideal_tokens_refuse_to_write_the_fixtures_weights():
    from tamp_fx.testbeds.fixture2 import train
    with pytest.raises(SystemExit):
        train.parse(["--ideal-tokens"])


def test_the_hand_over_gives_each_image_its_own_kind_of_tokens(tmp_path, smollm2_present):
    """--ideal-steps: in a mixed step, the images drawn for perfect tokens get exactly those,
    the others exactly the tower's."""
    from tamp_fx.testbeds.fixture2 import scenes, train

    args = train.parse(["--ideal-steps", "10", "--keep-language", "0", "--batch", "2", "--init", "none",
                        "--out", str(tmp_path / "w"), "--log", str(tmp_path / "log"),
                        "--checkpoint", str(tmp_path / "ckpt")])
    run = train.Run(args, lambda **record: None)
    samples = scenes.split(5, 2)
    m = run.model.model
    with torch.no_grad():
        pixels = run.batcher.pixel_inputs(samples)
        tower = m.get_image_features(**pixels).pooler_output                          # 2 x (88, D)
        run.ideal = True
        ideal = m.get_image_features(**pixels).pooler_output
        run.ideal = [True, False]
        mixed = m.get_image_features(**pixels).pooler_output
    want = run.aligner.labels(samples[:1]) @ run.aligner.embeddings                     # (1, 80, D)
    assert torch.equal(ideal[0], mixed[0]) and torch.allclose(mixed[0][train.CONTENT], want[0])
    assert torch.equal(tower[1], mixed[1]) and not torch.allclose(tower[0], ideal[0], atol=1e-2)


def test_the_share_of_perfect_tokens_falls_from_all_to_none_after_ideal_steps():
    from types import SimpleNamespace

    from tamp_fx.testbeds.fixture2 import train
    run = SimpleNamespace(args=SimpleNamespace(ideal_steps=100, ideal_tokens=False))
    share = [train.Run.ideal_share(run, step) for step in (1, 100, 150, 199, 200, 300)]
    assert share == pytest.approx([1.0, 1.0, 0.5, 0.01, 0.0, 0.0])
    run.args.ideal_steps = 0
    assert train.Run.ideal_share(run, 1) == 0.0
    with pytest.raises(SystemExit):
        train.parse(["--ideal-steps", "5", "--ideal-tokens", "--out", "/tmp/elsewhere"])
