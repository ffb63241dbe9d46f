"""The shipped demo model through the engine (issue 7): agreement with transformers, quantization quality."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import MixtralForCausalLM

import offload_engine

from conftest import SHARED, exact_config

DEMO = Path(offload_engine.__file__).parent / "demo"
pytestmark = pytest.mark.skipif(not (DEMO / "model.safetensors").exists(), reason="demo model not built")


def test_engine_agrees_with_transformers_on_the_demo_model():
    reference = MixtralForCausalLM.from_pretrained(DEMO, dtype=torch.float32, experts_implementation="eager").eval()
    engine = offload_engine.load("demo", config=exact_config(experts_on_device=3, prefetch=1), progress=False)
    assert engine.model_dir == DEMO
    ids = engine.encode("The history of the city begins with a small village on the river.")
    assert (engine.logits([ids]) - reference(torch.tensor([ids])).logits).abs().max().item() < 1e-4
    expected = reference.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)[0, len(ids):].tolist()
    expected = expected[: expected.index(2)] if 2 in expected else expected  # the engine does not return EOS
    assert engine.generate_ids(ids, max_new_tokens=20) == expected


def _perplexity(engine, ids: list[int]) -> float:
    logits = engine.logits([ids])[0, :-1]
    return math.exp(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:])).item())


def test_4bit_perplexity_is_within_5_percent_of_unquantized():
    corpus = SHARED / "data/corpus/c4_texts.txt"
    if not corpus.exists():
        pytest.skip("shared corpus not available")
    text = corpus.read_text(encoding="utf-8")
    text = text[int(len(text) * 0.95) :]  # the demo model's held-out split
    full = offload_engine.load("demo", config=exact_config(), progress=False)
    ids = full.tokenizer(text)["input_ids"]
    windows = [ids[i : i + 512] for i in range(0, 4 * 512, 512)]  # 2048 held-out tokens
    ppl_full = sum(_perplexity(full, w) for w in windows) / len(windows)
    four_bit = {"dtype": "float32", "quant": {"attention": {"bits": 4, "group_size": 64},
                                              "experts": {"bits": 4, "group_size": 64}}}
    quantized = offload_engine.load("demo", config=four_bit, progress=False)
    ppl_4bit = sum(_perplexity(quantized, w) for w in windows) / len(windows)
    assert ppl_full < 200
    assert ppl_full < ppl_4bit < 1.05 * ppl_full, (ppl_full, ppl_4bit)
