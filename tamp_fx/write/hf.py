"""Hugging Face directories written from a pruned model: the companions of the weights copied."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Collection
from pathlib import Path

from tamp_fx.load.source import PICKLE_SUFFIXES

log = logging.getLogger(__name__)

# weights in other formats and their indexes: beside the pruned safetensors they would be the
# original, unpruned model (and a loader that prefers them would load it)
_OTHER_WEIGHTS = PICKLE_SUFFIXES | {".h5", ".msgpack", ".gguf", ".pt2"}
_OTHER_INDEXES = ("pytorch_model.bin.index.json", "tf_model.h5.index.json", "flax_model.msgpack.index.json")


def copy_companions(source: Path, out: Path, *, skip: Collection[str] = ()) -> list[str]:
    """Copy what a checkpoint directory holds besides its weights (configs, tokenizer,
    processor, chat template, README, subfolders) from ``source`` to ``out``; safetensors
    (rewritten by the caller), weights in other formats and the names in ``skip`` are not
    copied. Only the bytes are copied, not the source's modes: a copy of a read-only card can be
    appended to. Returns the names of the other-format weights left behind, for a warning."""
    left = []
    for item in sorted(source.iterdir()):
        if item.suffix == ".safetensors" or item.name in skip:
            continue
        if item.is_file() and (item.suffix in _OTHER_WEIGHTS or item.name in _OTHER_INDEXES):
            left.append(item.name)
            continue
        _copy(item, out / item.name)
    return left


def _copy(source: Path, target: Path) -> None:
    """Copy a file's bytes or a directory's tree (symbolic links followed)."""
    if source.is_dir():
        target.mkdir()
        for item in sorted(source.iterdir()):
            _copy(item, target / item.name)
    else:
        shutil.copyfile(source, target)


