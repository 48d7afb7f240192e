"""The tiny offline models of ``tamp_fx.testbeds.tiny`` load from disk and run a calibration sample."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from PIL import Image

from tamp_fx.testbeds.tiny import (
    FAMILIES,
    SAMPLING_RATE,
    build_tiny,
    expand_placeholders,
    load_processor,
    main,
    read_wav,
)

MEDIA_TOKEN_ID_ATTR = {"image": "image_token_id", "audio": "audio_token_id"}


def _processor_inputs(family, processor, out_dir, sample):
    """Turn one calib.jsonl record into model inputs with the saved processor."""
    human, gpt = sample["conversations"][0]["value"], sample["conversations"][1]["value"]
    text = expand_placeholders(family, human) + "\n" + gpt
    if "image" in sample:
        image = Image.open(out_dir / sample["image"]).convert("RGB")
        return processor(text=[text], images=[image], return_tensors="pt")
    if "audio" in sample:
        audio = read_wav(out_dir / sample["audio"])
        return processor(text=[text], audio=[audio], sampling_rate=SAMPLING_RATE, return_tensors="pt")
    return processor([text], return_tensors="pt")


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_family_roundtrip(family, tmp_path):
    out_dir = build_tiny(family, tmp_path / family, seed=0, n_samples=2)

    config = transformers.AutoConfig.from_pretrained(out_dir)
    model_cls = getattr(transformers, config.architectures[0])
    model = model_cls.from_pretrained(out_dir, attn_implementation="sdpa").eval()
    processor = load_processor(out_dir)
    if family == "llama":
        assert isinstance(processor, transformers.PreTrainedTokenizerBase)
    samples = [json.loads(line) for line in (out_dir / "calib.jsonl").read_text().splitlines()]
    assert len(samples) == 2

    sample = samples[0]
    inputs = _processor_inputs(family, processor, out_dir, sample)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[:2] == inputs["input_ids"].shape
    assert logits.shape[-1] == model.get_input_embeddings().num_embeddings
    assert torch.isfinite(logits).all()

    media = next((key for key in MEDIA_TOKEN_ID_ATTR if key in sample), None)
    assert (media is None) == (family == "llama")
    if media is not None:
        token_id = getattr(config, MEDIA_TOKEN_ID_ATTR[media])
        assert token_id == processor.tokenizer.convert_tokens_to_ids(getattr(processor, f"{media}_token"))
        assert (inputs["input_ids"] == token_id).sum() > 0


def test_tiny_is_deterministic(tmp_path):
    a = build_tiny("llava", tmp_path / "a", seed=3, n_samples=2)
    b = build_tiny("llava", tmp_path / "b", seed=3, n_samples=2)
    for name in ("model.safetensors", "calib.jsonl", "images/1.png", "tokenizer.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_tiny_cli_errors(tmp_path, capsys):
    assert main(["no_such_family", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "llava" in err and "qwen2_audio" in err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    assert main(["llama", str(tmp_path / "full")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
