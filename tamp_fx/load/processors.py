"""Processors that load without torchvision.

In transformers 5 the processors of LLaVA-OneVision, Qwen2-VL and Qwen2.5-VL declare a video
processor, which needs torchvision; without it ``AutoProcessor.from_pretrained`` fails even
for image-only use. Such a processor is rebuilt here from its saved parts, images only.
"""
from __future__ import annotations

import functools
import inspect
import json
from pathlib import Path


def takes_images(processor) -> bool:
    """Whether ``processor`` (a tokenizer or a multimodal processor) accepts images."""
    return hasattr(processor, "image_processor")


@functools.cache
def without_video_processor(processor_cls: type) -> type:
    """``processor_cls`` accepting ``video_processor=None``.

    The video processors of this transformers release need torchvision; without it a
    processor that declares a video processor cannot even be constructed. The subclass keeps
    the class name, so what it saves names the real processor class.
    """

    class Videoless(processor_cls):
        @classmethod
        def get_attributes(cls):
            return [name for name in super().get_attributes() if name != "video_processor"]

    Videoless.__name__ = Videoless.__qualname__ = processor_cls.__name__
    return Videoless


def load_processor(path: str | Path):
    """Load the processor saved in ``path`` (a tokenizer for text-only models).

    ``AutoProcessor.from_pretrained`` where it can; processors that declare a video processor
    (LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL) need torchvision for it, so without torchvision
    the processor is rebuilt from its saved parts with no video processor (images only).
    """
    import transformers
    from transformers.utils import is_torchvision_available

    path = Path(path)
    config_file = path / "processor_config.json"
    if not config_file.exists():
        return transformers.AutoTokenizer.from_pretrained(path)
    saved = json.loads(config_file.read_text(encoding="utf-8"))
    processor_cls = getattr(transformers, saved["processor_class"])
    if is_torchvision_available() or "video_processor" not in processor_cls.get_attributes():
        return transformers.AutoProcessor.from_pretrained(path)
    params = inspect.signature(processor_cls.__init__).parameters
    extra = {k: v for k, v in saved.items() if k in params and k not in processor_cls.get_attributes()}
    template = path / "chat_template.jinja"
    return without_video_processor(processor_cls)(
        image_processor=transformers.AutoImageProcessor.from_pretrained(path),
        tokenizer=transformers.AutoTokenizer.from_pretrained(path),
        video_processor=None,
        chat_template=template.read_text(encoding="utf-8") if template.exists() else None,
        **extra,
    )
