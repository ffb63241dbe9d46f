"""Shared fixtures: small Mixtral-architecture checkpoints written with transformers' own save_pretrained."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub call would otherwise retry for ~25 s before failing

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM

SHARED = Path(__file__).resolve().parents[1].parent / "shared"

# No quantization, float32: the engine must then match transformers to float rounding.
EXACT = {"dtype": "float32", "quant": {"attention": {"bits": None}, "experts": {"bits": None}}}


def tiny_config(**overrides) -> MixtralConfig:
    params = dict(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=512,
                  eos_token_id=None, bos_token_id=1, tie_word_embeddings=False)
    params.update(overrides)
    return MixtralConfig(**params)


def make_checkpoint(path: Path, seed: int = 0, edit=None, std: float = 0.15, **overrides) -> Path:
    """Save a randomly initialised tiny Mixtral to `path`; `edit(model)` may change its weights first."""
    torch.manual_seed(seed)
    model = MixtralForCausalLM(tiny_config(**overrides))
    # Larger-than-default weights so that routing and logits are far from uniform (ties would make tests flaky).
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, std)
    if edit is not None:
        edit(model)
    model.save_pretrained(path)
    return path


def reference_model(path: Path) -> MixtralForCausalLM:
    return MixtralForCausalLM.from_pretrained(path, dtype=torch.float32, experts_implementation="eager").eval()


def exact_config(**offload) -> dict:
    return {**EXACT, "offload": {"experts_on_device": 8, "prefetch": 0, **offload}}


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_ref(tiny_dir) -> MixtralForCausalLM:
    return reference_model(tiny_dir)
