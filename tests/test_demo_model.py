"""The shipped demo checkpoint (offload_engine/demo/) is a working Mixtral-architecture model, loadable offline with
transformers alone, and clearly better than a unigram model on held-out text."""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, MixtralForCausalLM

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "offload_engine" / "demo"
CORPUS = Path(__file__).resolve().parents[1].parent / "shared/data/corpus/c4_texts.txt"
EVAL_TOKENS = 2000
WINDOW = 512  # the context the demo model was trained on


def split_corpus(text: str, val_fraction: float = 0.05) -> tuple[str, str]:
    """Same rule as scripts/train_demo_model.py: last 5 % of the characters, cut at the next line break."""
    cut = int(len(text) * (1.0 - val_fraction))
    newline = text.find("\n", cut)
    cut = len(text) if newline < 0 else newline + 1
    return text[:cut], text[cut:]


@pytest.fixture(scope="module")
def model() -> MixtralForCausalLM:
    return MixtralForCausalLM.from_pretrained(DEMO, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(DEMO)


def test_config_is_mixtral(model: MixtralForCausalLM) -> None:
    config = model.config
    assert config.model_type == "mixtral"
    assert config.num_local_experts == 8
    assert config.num_experts_per_tok == 2
    assert config.bos_token_id == 1 and config.eos_token_id == 2


def test_checkpoint_is_small() -> None:
    size = sum(f.stat().st_size for f in DEMO.rglob("*") if f.is_file())
    assert size <= 20 * 1024 * 1024, f"demo checkpoint is {size / 2**20:.1f} MiB"
    assert (DEMO / "model.safetensors").exists()


def test_tokenizer_round_trip(tokenizer) -> None:
    text = "Un café – naïve 日本 ☕ résumé,  two  spaces\nand a new line."
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == 1
    assert tokenizer.eos_token_id == 2 and tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    assert tokenizer.unk_token_id not in ids  # byte-level: everything is encodable
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_chat_template(tokenizer) -> None:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert prompt == "<s>[INST] hi [/INST]"
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}]
    prompt = tokenizer.apply_chat_template(chat, tokenize=False)
    assert prompt == "<s>[INST] Be brief.\n\nhi [/INST] hello</s>[INST] bye [/INST]"
    with pytest.raises(Exception):
        tokenizer.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
                                      tokenize=False)


def test_greedy_generation_runs(model: MixtralForCausalLM, tokenizer) -> None:
    inputs = tokenizer("The best way to", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert len(text.strip()) > 0


@torch.no_grad()
def test_perplexity_beats_unigram(model: MixtralForCausalLM, tokenizer) -> None:
    if not CORPUS.exists():
        pytest.skip(f"corpus not found: {CORPUS}")
    train_text, val_text = split_corpus(CORPUS.read_text(encoding="utf-8"))
    encode = tokenizer.backend_tokenizer.encode  # the fast tokenizer itself: no warning about > 512 tokens
    train_ids = torch.tensor(encode(train_text, add_special_tokens=False).ids)
    val_ids = torch.tensor(encode(val_text, add_special_tokens=False).ids)
    # Windows of <s> + 511 held-out tokens, as in the training script's evaluation.
    n = WINDOW - 1
    windows = torch.stack([val_ids[i:i + n] for i in range(0, EVAL_TOKENS, n)])
    windows = torch.cat([torch.full((len(windows), 1), tokenizer.bos_token_id), windows], dim=1)
    targets = windows[:, 1:]
    logits = model(input_ids=windows).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    ppl = math.exp(nll.item())

    counts = torch.bincount(train_ids, minlength=model.config.vocab_size).double() + 1.0  # add-one smoothing
    unigram = math.exp(-(counts / counts.sum()).log()[targets.reshape(-1)].mean().item())
    print(f"demo model ppl {ppl:.1f} vs unigram {unigram:.1f} on {targets.numel()} held-out tokens")
    assert ppl < unigram / 4, (ppl, unigram)
