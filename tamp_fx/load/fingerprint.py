"""Model fingerprints: names, shapes and an evenly strided sample of values of the pruned
tensors, so that a plan is applied only to the model it was made for."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping

import torch

log = logging.getLogger(__name__)

#: what a fingerprint keeps of one tensor: its shape and an evenly strided sample of values (float32 bytes)
FingerprintSample = tuple[tuple[int, ...], bytes]


def fingerprint_sample(tensor: torch.Tensor, samples: int = 4096) -> FingerprintSample:
    t = tensor.detach().reshape(-1)
    idx = torch.linspace(0, t.numel() - 1, min(samples, t.numel())).long()
    return tuple(tensor.shape), t[idx.to(t.device)].float().cpu().numpy().tobytes()


def fingerprint_of(samples: Mapping[str, FingerprintSample]) -> str:
    """The digest of named :func:`fingerprint_sample` results (see :func:`fingerprint`)."""
    digest = hashlib.sha256()
    for name in sorted(samples):
        shape, values = samples[name]
        digest.update(name.encode())
        digest.update(str(shape).encode())
        digest.update(values)
    return "sha256:" + digest.hexdigest()[:32]


def fingerprint(tensors: Mapping[str, torch.Tensor], samples: int = 4096) -> str:
    """A digest of the named tensors: names, shapes and an evenly strided sample of values
    (as float32), so two models with the same architecture but other weights differ."""
    return fingerprint_of({name: fingerprint_sample(t, samples) for name, t in tensors.items()})


