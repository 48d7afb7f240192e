"""Modality labels: one integer per token, derived from input ids and the config's token ids."""
from __future__ import annotations

import enum
from collections.abc import Mapping

import torch


class Modality(enum.IntEnum):
    TEXT = 0
    IMAGE = 1
    VIDEO = 2
    AUDIO = 3


def modality_labels(input_ids: torch.Tensor, token_ids: Mapping[Modality, int]) -> torch.Tensor:
    """Label every token of ``input_ids`` (..., N) with its modality; text unless its id is a
    modality placeholder id.

    >>> ids = torch.tensor([[5, 9, 9, 6]])
    >>> modality_labels(ids, {Modality.IMAGE: 9}).tolist()
    [[0, 1, 1, 0]]
    """
    labels = torch.full_like(input_ids, int(Modality.TEXT), dtype=torch.int8)  # (..., N)
    for modality, token_id in token_ids.items():
        labels[input_ids == token_id] = int(modality)
    return labels
