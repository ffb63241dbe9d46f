"""Generation, sampling, streaming and multi-turn chat (issue 4)."""

from __future__ import annotations


import pytest
import torch

import offload_engine
from offload_engine.generate import SamplingParams, StreamDecoder, sample, stream_text
from offload_engine.memory import NotEnoughMemory, plan_memory

from conftest import exact_config, make_checkpoint


@pytest.fixture(scope="module")
def engine(chat_dir):
    return offload_engine.load(chat_dir, config=exact_config(experts_on_device=2, prefetch=1), progress=False)


def test_seeded_sampling_is_reproducible(engine):
    a = engine.generate_ids("The fox", max_new_tokens=20, temperature=1.0, top_p=0.95, seed=7)
    b = engine.generate_ids("The fox", max_new_tokens=20, temperature=1.0, top_p=0.95, seed=7)
    c = engine.generate_ids("The fox", max_new_tokens=20, temperature=1.0, top_p=0.95, seed=8)
    assert a == b and a != c


def test_top_k_1_and_tiny_top_p_equal_greedy(engine):
    greedy = engine.generate_ids("The fox", max_new_tokens=20)
    assert engine.generate_ids("The fox", max_new_tokens=20, temperature=1.5, top_k=1, seed=1) == greedy
    assert engine.generate_ids("The fox", max_new_tokens=20, temperature=1.5, top_p=1e-6, seed=2) == greedy


def test_sampling_filters():
    logits = torch.tensor([5.0, 4.0, 1.0, 0.0])
    gen = torch.Generator().manual_seed(0)
    # A strong repetition penalty pushes the best token below the runner-up.
    assert sample(logits, SamplingParams(repetition_penalty=10.0), [0], gen) == 1
    # top_k=2 never picks tokens outside the best two, however hot.
    picks = {sample(logits, SamplingParams(temperature=50.0, top_k=2), [], gen) for _ in range(200)}
    assert picks == {0, 1}
    # top_p keeps the smallest set whose mass reaches p: here tokens 0 and 1.
    picks = {sample(logits, SamplingParams(temperature=1.0, top_p=0.9), [], gen) for _ in range(300)}
    assert picks == {0, 1}
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(TypeError, match="unknown sampling option"):
        SamplingParams.from_kwargs(temprature=1.0)


def test_sampling_draws_each_token_at_its_softmax_probability():
    """The sampler's frequencies over 40000 draws match softmax(logits / T) within 4 standard errors, also for
    the rarest tokens and with masked tokens between and after the kept ones (never drawn)."""
    logits = torch.tensor([2.0, -1.0, 0.5, -4.0, 1.0, 3.0, -2.5, 0.0])
    gen, draws = torch.Generator().manual_seed(1), 40000
    for params, masked in ((SamplingParams(temperature=0.7), set()), (SamplingParams(temperature=1.0, top_k=5),
                                                                       {1, 3, 6})):
        counts = torch.zeros(8)
        for _ in range(draws):
            counts[sample(logits, params, [], gen)] += 1
        kept = torch.tensor([i not in masked for i in range(8)])
        expected = torch.softmax(torch.where(kept, logits / params.temperature, float("-inf")), dim=-1)
        assert all(counts[i] == 0 for i in masked)
        error = (expected * (1 - expected) / draws).sqrt()
        assert ((counts / draws - expected).abs() <= 4 * error + 1e-9).all(), (counts / draws, expected)


def test_stop_strings_end_generation_without_the_stop_text(engine):
    full = engine.generate("The fox", max_new_tokens=30)
    assert len(full) > 12
    stop = full[6:9]
    expected = full[: full.index(stop)]
    assert engine.generate("The fox", max_new_tokens=30, stop=[stop]) == expected
    assert engine.generate("The fox", max_new_tokens=30, stop=[stop, "zzzz-not-there"]) == expected


def test_stream_joins_to_the_decoded_tokens(engine):
    ids = engine.generate_ids("A café", max_new_tokens=40, temperature=1.2, seed=3)
    pieces = list(engine.stream("A café", max_new_tokens=40, temperature=1.2, seed=3))
    assert len(pieces) > 1
    assert "".join(pieces) == engine.tokenizer.decode(ids, skip_special_tokens=True)


TEXTS = ["Grüße aus Zürich — naïve café, 東京 and Москва 😀!", "  two  spaces, then\nnew lines\n\n and a tab\t.",
         "emoji at the end 🎉"]


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_detokenization_with_the_real_mixtral_tokenizer(mixtral_tokenizer, text):
    ids = mixtral_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(mixtral_tokenizer) == 32000
    decoder = StreamDecoder(mixtral_tokenizer)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == mixtral_tokenizer.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in p for p in pieces), "a multi-byte character was split"


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_detokenization_with_a_local_bpe(engine, text):
    ids = engine.tokenizer(text)["input_ids"]
    assert "".join(stream_text(ids, engine.tokenizer)) == engine.tokenizer.decode(ids) == text


def test_engine_stream_with_mixtral_vocabulary(tmp_path, mixtral_tokenizer):
    """Random tokens from a 32000-token model exercise byte-fallback pieces and leading spaces."""
    model_dir = make_checkpoint(tmp_path / "mixtral_vocab", vocab_size=32000, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, eos_token_id=2)
    mixtral_tokenizer.save_pretrained(model_dir)
    engine = offload_engine.load(model_dir, config=exact_config(experts_on_device=2), progress=False)
    for seed in range(3):
        ids = engine.generate_ids("Grüße", max_new_tokens=40, temperature=2.0, seed=seed)
        streamed = "".join(engine.stream("Grüße", max_new_tokens=40, temperature=2.0, seed=seed))
        assert streamed == mixtral_tokenizer.decode(ids, skip_special_tokens=True)


def test_chat_reuses_the_kv_cache_and_matches_a_full_recompute(chat_dir):
    engine = offload_engine.load(chat_dir, config=exact_config(experts_on_device=3, prefetch=1), progress=False)
    chat = engine.chat(system="Be brief.")
    first = chat.send("Hello there, who are you?", max_new_tokens=12)
    assert chat.messages[-1] == {"role": "assistant", "content": first}

    prefills = []
    original_step = engine.model.step

    def recording_step(segments, **kw):
        logits = original_step(segments, **kw)
        prefills.append((len(segments[0].ids), segments[0].kv_cache.get_seq_length(), logits[0]))
        return logits

    engine.model.step = recording_step
    chat.send("And what do you like?", max_new_tokens=1)
    del engine.model.step
    new_tokens, cached_after, logits = prefills[0]
    full_ids = chat.history_ids[:cached_after]  # the whole conversation as the model saw it at turn 2's prefill
    assert cached_after == len(full_ids) and new_tokens < len(full_ids) / 2, "turn 2 must reuse turn 1's cache"
    expected = engine.logits([full_ids])[0, -1]  # the next-token logits, all that a prefill computes
    assert (logits - expected).abs().max().item() < 1e-4
    assert len(chat.messages) == 4
    chat.reset()
    assert chat.messages == [] and chat.kv_cache.get_seq_length() == 0


def test_chat_drops_the_oldest_turns_instead_of_overflowing(chat_dir):
    config = {**exact_config(experts_on_device=2), "max_context": 80}
    engine = offload_engine.load(chat_dir, config=config, progress=False)
    chat = engine.chat()
    with pytest.warns(UserWarning, match="dropped the oldest turn"):
        for i in range(6):
            chat.send(f"Message number {i} about the quick brown fox and the lazy dog.", max_new_tokens=8)
    assert chat.notices and len(chat.messages) < 12
    assert chat.messages[-2]["content"].startswith("Message number 5")
    with pytest.raises(ValueError, match="context window"), pytest.warns(UserWarning, match="dropped"):
        chat.send("word " * 200, max_new_tokens=8)
    with pytest.raises(ValueError, match="empty"):
        chat.send("   ")


def test_interrupted_stream_keeps_the_chat_consistent(chat_dir):
    engine = offload_engine.load(chat_dir, config=exact_config(experts_on_device=8), progress=False)
    chat = engine.chat()
    stream = chat.stream("Tell me a long story", max_new_tokens=50, temperature=1.0, seed=0)
    next(stream)
    stream.close()  # what Ctrl-C in the CLI does
    assert chat.messages[-1]["role"] == "assistant"
    assert chat.kv_cache.get_seq_length() == len(chat.cached_ids)
    reply = chat.send("Go on", max_new_tokens=5)
    assert isinstance(reply, str) and len(chat.messages) == 4


MIXTRAL = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
               max_position_embeddings=32768, tie_word_embeddings=False)


def test_auto_sizing_for_mixtral_on_a_t4():
    from transformers import MixtralConfig

    mixtral = MixtralConfig(**MIXTRAL)
    t4_free = int(14.5 * 1024**3)  # what torch.cuda.mem_get_info reports free on a Colab T4 before loading
    plan = plan_memory(mixtral, offload_engine.load_config("t4-16gb"), t4_free)
    assert plan.experts_on_device >= 5, "a T4 holds more than the reference system's 4 experts per layer"
    assert plan.total_bytes <= t4_free
    assert plan.total_bytes + 32 * plan.expert_bytes > t4_free, "auto must take the largest count that fits"
    with pytest.raises(NotEnoughMemory, match="experts_on_device=8 needs .* at most 5"):
        plan_memory(mixtral, offload_engine.load_config({"offload": {"experts_on_device": 8}}), t4_free)
    smaller = plan_memory(mixtral, offload_engine.load_config("12gb"), int(11.3 * 1024**3))
    assert 1 <= smaller.experts_on_device < plan.experts_on_device
    # Where not even 1 expert per layer fits, auto keeps the first layers' experts on the CPU (cpu_layers) ...
    small_gpu = plan_memory(mixtral, offload_engine.load_config("t4-16gb"), int(4.5 * 1024**3))
    assert small_gpu.cpu_layers > 0 and small_gpu.experts_on_device >= 1 and small_gpu.total_bytes <= 4.5 * 1024**3
    # ... and where even all of them on the CPU leaves too little for the trunk and the KV cache, it says so.
    with pytest.raises(NotEnoughMemory, match="even with every layer's experts on the CPU"):
        plan_memory(mixtral, offload_engine.load_config("t4-16gb"), 2 * 1024**3)
