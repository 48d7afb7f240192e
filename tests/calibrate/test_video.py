"""Video calibration: LLaVA-Video style samples ("video": a file or its frames, <video> in the
text) go through the model's own video processor, and their tokens are labelled video all the
way to the plan's statistics. transformers' video processors need torchvision: the end-to-end
tests skip without it (they run in the GPU check script), the refusal runs without it."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.utils import is_torchvision_available
from typer.testing import CliRunner

import tamp_fx
from tamp_fx.calibrate.samples import load_calibration
from tamp_fx.calibrate.video import MAX_FRAMES, installed_decoder, load_video
from tamp_fx.cli.main import app
from tamp_fx.errors import TampError
from tamp_fx.testbeds.tiny import write_mixed_calib

runner = CliRunner()


def needs_torchvision(test):
    """Marked ``torchvision`` (bench/gpu_check.sh selects them) and skipped without it."""
    skip = pytest.mark.skipif(not is_torchvision_available(), reason="transformers' video processors need torchvision")
    return pytest.mark.torchvision(skip(test))


def _frames(directory, n, hw=(8, 12)):
    paths = []
    for t in range(n):
        pixels = np.full((*hw, 3), t * 10, dtype=np.uint8)                 # (H, W, 3): frame t is t*10
        paths.append(directory / f"{t}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


def _load_rgb(path):
    with Image.open(path) as image:
        return image.convert("RGB")


def test_frames_become_one_array_sampled_evenly(tmp_path):
    video = load_video(_frames(tmp_path, 3), _load_rgb)
    assert video.shape == (3, 8, 12, 3) and video.dtype == np.uint8
    assert video[:, 0, 0, 0].tolist() == [0, 10, 20]
    long = load_video(_frames(tmp_path, 2 * MAX_FRAMES + 1), _load_rgb)
    first_pixels = long[:, 0, 0, 0].tolist()
    assert len(first_pixels) == MAX_FRAMES and first_pixels[0] == 0 and first_pixels[-1] == 10 * 2 * MAX_FRAMES
    assert first_pixels == sorted(first_pixels)


def test_frames_of_different_sizes_are_refused(tmp_path):
    (tmp_path / "big").mkdir()
    paths = _frames(tmp_path, 2) + _frames(tmp_path / "big", 1, hw=(9, 9))
    with pytest.raises(TampError, match="differ in size"):
        load_video(paths, _load_rgb)


@pytest.mark.skipif(installed_decoder() is not None, reason="a video decoder is installed")
def test_video_file_without_a_decoder_says_what_to_install(tmp_path):
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\x00" * 64)
    with pytest.raises(TampError, match="pip install av"):
        load_video([clip], _load_rgb)


def test_video_file_is_decoded_to_evenly_spaced_frames(tmp_path):
    av = pytest.importorskip("av")
    clip = tmp_path / "clip.mp4"
    with av.open(str(clip), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for t in range(20):                                                  # frame t has brightness 12 t
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 12 * t, dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    video = load_video([clip], _load_rgb)
    assert video.shape == (MAX_FRAMES, 32, 32, 3) and video.dtype == np.uint8
    expected = np.linspace(0, 19, MAX_FRAMES).round() * 12                   # the frames sampled
    assert np.abs(video[:, 16, 16, :].mean(-1) - expected).max() < 8          # lossy codec: close, not equal


class _VideoProcessor:
    """Stands in for a multimodal processor with a video processor: records what it is given."""

    chat_template = None
    video_token = "<video>"

    def __init__(self, video_processor=None):
        self.video_processor = video_processor
        self.calls = []

    def __call__(self, text, return_tensors, **kwargs):
        self.calls.append((text, kwargs))
        return {"input_ids": torch.zeros(1, 3, dtype=torch.long)}


def test_calibration_hands_the_frames_to_the_video_processor(tmp_path):
    (tmp_path / "f").mkdir()
    frames = _frames(tmp_path / "f", 3)
    calib = tmp_path / "calib.jsonl"
    calib.write_text(json.dumps({"video": [f"f/{p.name}" for p in frames],
                                 "conversations": [{"from": "human", "value": "<video>\nWhat moves?"}]}) + "\n")
    processor = _VideoProcessor(video_processor=object())
    load_calibration(calib, processor, nsamples=1)
    (text, kwargs), = processor.calls
    assert "<video>" in text[0]
    video, = kwargs["videos"]
    assert video.shape == (3, 8, 12, 3) and video[:, 0, 0, 0].tolist() == [0, 10, 20]


@pytest.mark.skipif(is_torchvision_available(), reason="torchvision is installed: video works")
@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_vl"])
def test_video_without_torchvision_is_refused_in_one_line(family, tiny_models, tmp_path):
    model = tiny_models(family)
    calib = write_mixed_calib(tmp_path / "calib", family)
    r = runner.invoke(app, ["plan", str(model), "--calib", str(calib), "--out", str(tmp_path / "p"), "--quiet"])
    assert r.exit_code == 1
    assert "has a video" in r.output and "pip install torchvision" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "p").exists()


def test_video_on_a_model_without_video_is_refused(tiny_models, tmp_path):
    model = tiny_models("llava")
    calib = write_mixed_calib(tmp_path / "calib", "llava_onevision")  # the same file, for a model without video
    with pytest.raises(TampError, match="takes no video"):
        tamp_fx.plan(model, calib, tamp_fx.PlanConfig(method="tamp", nsamples=3))


class _StandInVideoProcessor:
    """What a real video processor returns for one (T, H, W, 3) video, in shape (values random):
    Qwen2-VL: flattened (t, h, w) patches of 2 frames x 7 x 7 px and their grid; LLaVA-OneVision:
    the frames resized to the tower's 32 px. The real processor's token expansion, the model and
    the labels then run as they would with torchvision."""

    merge_size = 2

    def __init__(self, family):
        self.family = family

    def __call__(self, videos, **kwargs):
        from transformers.feature_extraction_utils import BatchFeature
        t, h, w, _ = videos[0].shape
        if self.family == "qwen2_vl":
            grid = ((t + 1) // 2, h // 7, w // 7)
            return BatchFeature({"pixel_values_videos": torch.randn(grid[0] * grid[1] * grid[2], 3 * 2 * 7 * 7),
                                 "video_grid_thw": torch.tensor([grid])})
        return BatchFeature({"pixel_values_videos": torch.randn(1, t, 3, 32, 32)})


def _expect_video_everywhere(plan: dict) -> None:
    assert "video" in plan["model"]["modality_token_ids"]
    for lp in plan["linears"].values():
        diversity = lp["stats"]["diversity"]
        # one modality per sample besides text: the pairs are those that share a sample
        assert {"video", "image", "text", "text-video", "image-text"} <= diversity.keys(), diversity.keys()
        assert "video" in lp["stats"]["selected_fraction"]
    assert all(layer["last_token_attention_per_modality"]["video"] > 0 for layer in plan["layers"])


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_vl"])
def test_video_tokens_reach_the_plan_with_a_stand_in_video_processor(family, tiny_models, tmp_path, monkeypatch):
    import tamp_fx.pipeline.plan
    load = tamp_fx.pipeline.plan.load_processor

    def with_video(*args, **kwargs):
        processor = load(*args, **kwargs)
        processor.video_processor = _StandInVideoProcessor(family)
        return processor
    monkeypatch.setattr(tamp_fx.pipeline.plan, "load_processor", with_video)
    model = tiny_models(family)
    plan = tamp_fx.plan(model, write_mixed_calib(tmp_path / "calib", family), tamp_fx.PlanConfig(method="tamp", nsamples=3))
    _expect_video_everywhere(plan.to_json())


@needs_torchvision
@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_vl"])
def test_video_calibration_end_to_end(family, tiny_models, tmp_path):
    model = tiny_models(family)
    calib = write_mixed_calib(tmp_path / "calib", family)
    r = runner.invoke(app, ["plan", str(model), "--calib", str(calib), "--method", "tamp", "--sparsity", "0.5",
                            "--out", str(tmp_path / "p"), "--quiet"])
    assert r.exit_code == 0, r.output
    plan = json.loads((tmp_path / "p" / "plan.json").read_text())
    assert plan["model"]["calibration"]["samples"] == 3
    _expect_video_everywhere(plan)
    r = runner.invoke(app, ["apply", str(model), str(tmp_path / "p"), "--out", str(tmp_path / "m"), "--quiet"])
    assert r.exit_code == 0, r.output
