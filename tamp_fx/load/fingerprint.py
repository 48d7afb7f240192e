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


def sample_positions(numel: int, samples: int = 4096) -> torch.Tensor:
    """The positions (int64, ascending) a fingerprint samples in a tensor of ``numel`` values:
    ``samples`` evenly strided, computed in float32 as every plan has recorded them. Past 2**24
    values float32 can round the last position past the end (4096 x 14336: 58720256); those are
    dropped, as the chunked checkpoint reader always dropped them.

    >>> sample_positions(5, 3).tolist(), len(sample_positions(2**24 + 4))
    ([0, 2, 4], 4095)
    """
    idx = torch.linspace(0, numel - 1, min(samples, numel)).long()     # (samples,)
    return idx[idx < numel]


def fingerprint_sample(tensor: torch.Tensor, samples: int = 4096) -> FingerprintSample:
    t = tensor.detach().reshape(-1)
    idx = sample_positions(t.numel(), samples)
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


