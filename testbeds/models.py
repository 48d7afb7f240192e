"""Tiny in-memory models for tests: built from configs with random weights, offline, in milliseconds."""
from __future__ import annotations

import torch

from tamp_fx.capture.activations import Activations, capture_layer_inputs
from tamp_fx.load.adapters import decoder_layout


def tiny_llama(seed: int = 0, *, hidden: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2,
               intermediate: int = 64, vocab: int = 97) -> torch.nn.Module:
    """A random LlamaForCausalLM small enough for property tests (GQA when kv_heads < heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


def random_activations(model: torch.nn.Module, seq_lens: list[int], seed: int = 0) -> Activations:
    """Decoder-layer inputs of ``model`` for random token sequences of the given lengths."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    samples = [{"input_ids": torch.randint(0, vocab, (1, n), generator=g),
                "attention_mask": torch.ones(1, n, dtype=torch.long)} for n in seq_lens]
    return capture_layer_inputs(model, decoder_layout(model), samples, {})


def checkpoint_tensors(directory) -> dict[str, torch.Tensor]:
    """Every tensor of the ``*.safetensors`` shards in ``directory``, by name."""
    from pathlib import Path

    from safetensors import safe_open
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out
