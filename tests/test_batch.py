"""Batched generation (issue 22): a ragged batch of sequences, each with its own KV cache, shares every forward step
and generates exactly what each sequence generates alone; chunked prefill; only sampled logits (issue 21.3)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

import offload_engine
import offload_engine.model as model_module
from offload_engine.batch import Batch
from offload_engine.generate import SamplingParams, new_sequence
from offload_engine.ragged import Segment

from conftest import exact_config
from families_cases import make_family_checkpoint

# Mixtral; DeepSeek-V2 (MLA: the module expands its cached latents, a dense first layer, grouped top-k); GPT-OSS
# (sliding-window layers, attention sinks, eager attention).
FAMILIES = ["mixtral", "deepseek_v2", "gpt_oss"]
LENGTHS = [1, 3, 5, 8, 13, 2, 7, 11]  # prompts longer than GPT-OSS's window of 5 too
PLACEMENTS = [(1, 0), (1, 1), (2, 1), (8, 0)]  # experts on device (1, top-k, all), prefetch

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: see conftest


def prompts(n: int = len(LENGTHS), vocab: int = 160) -> list[list[int]]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(0, vocab, (LENGTHS[i],), generator=gen).tolist() for i in range(n)]


@pytest.fixture(scope="module")
def family_paths(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("batch_families")
    return {family: make_family_checkpoint(root / family, family) for family in FAMILIES}


def load(path, k: int, prefetch: int):
    return offload_engine.load(path, config=exact_config(experts_on_device=k, prefetch=prefetch), device="cpu",
                               progress=False)


@pytest.mark.parametrize("k,prefetch", PLACEMENTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_each_sequence_of_a_batch_generates_its_greedy_tokens_alone(family_paths, family, k, prefetch):
    engine = load(family_paths[family], k, prefetch)
    batch = prompts()
    alone = [engine.generate_ids(p, max_new_tokens=6) for p in batch]
    assert len({tuple(a) for a in alone}) > 4, "the prompts should not all generate the same tokens"
    for n in (1, 2, 5, 8):
        assert engine.generate_ids(batch[:n], max_new_tokens=6) == alone[:n], f"batch of {n}"
    # Sequences leaving early (different max_new_tokens) and joining as they leave (max_batch below the count).
    lengths = [1, 6, 3, 6, 2, 5, 6, 4]
    assert engine.generate_ids(batch, max_new_tokens=lengths, max_batch=3) == \
        [a[:n] for a, n in zip(alone, lengths)]


@pytest.mark.parametrize("family", FAMILIES)
def test_seeded_sampling_in_a_batch_equals_sampling_alone(family_paths, family):
    engine = load(family_paths[family], 2, 1)
    batch = prompts(5)
    options = dict(temperature=1.3, top_p=0.9, max_new_tokens=8)
    alone = [engine.generate_ids(p, seed=10 + i, **options) for i, p in enumerate(batch)]
    assert engine.generate_ids(batch, seed=[10 + i for i in range(5)], **options) == alone
    # One seed for all: each sequence has its own generator seeded with it, as it would alone.
    same_seed = [engine.generate_ids(p, seed=3, **options) for p in batch]
    assert engine.generate_ids(batch, seed=3, max_batch=2, **options) == same_seed


def test_joining_and_leaving_mid_generation_do_not_change_the_others(family_paths):
    engine = load(family_paths["mixtral"], 1, 1)
    model, eos = engine.model, engine.eos_ids
    batch = prompts(4)
    greedy = SamplingParams(max_new_tokens=10)
    alone = [engine.generate_ids(p, max_new_tokens=10) for p in batch]

    def sequence(i: int, params: SamplingParams = greedy):
        return new_sequence(batch[i], params, DynamicCache(config=model.config), eos)

    running = Batch(model, max_batch=4, prefill_chunk=4)
    a, b = sequence(0), sequence(1)
    running.add(a)
    running.add(b)
    for _ in range(3):
        running.step()
    c = sequence(2)
    running.add(c)  # joins mid-generation, with a prompt (13 tokens... here 5) prefilled in chunks of 4
    running.step()
    b.cancel()  # leaves mid-generation
    d = sequence(3, SamplingParams(max_new_tokens=10))
    running.add(d)
    while running:
        running.step()
    assert a.tokens == alone[0] and c.tokens == alone[2] and d.tokens == alone[3]
    assert b.tokens == alone[1][: len(b.tokens)] and len(b.tokens) == 4 and b.finish_reason == "cancelled"


def test_a_long_prompt_is_prefilled_in_chunks_beside_the_running_decodes(family_paths):
    engine = load(family_paths["mixtral"], 8, 0)
    model = engine.model
    short, long = [3, 4], list(range(20, 50))  # 30 tokens: chunks of 8, 8, 8, 6
    alone_long = engine.generate_ids(long, max_new_tokens=5)  # the whole prompt in one chunk (512)
    steps: list[list[int]] = []
    original = model.step

    def recording(segments, **kw):
        steps.append([len(s.ids) for s in segments])
        return original(segments, **kw)

    model.step = recording
    try:
        running = Batch(model, max_batch=2, prefill_chunk=8)
        first = new_sequence(short, SamplingParams(max_new_tokens=12), DynamicCache(config=model.config))
        second = new_sequence(long, SamplingParams(max_new_tokens=5), DynamicCache(config=model.config))
        running.add(first)
        running.step()
        running.add(second)
        while running:
            running.step()
    finally:
        del model.step
    # The running sequence decodes one token in every step while the long prompt goes in, 8 tokens at a time.
    assert steps[:5] == [[2], [1, 8], [1, 8], [1, 8], [1, 6]]
    assert second.tokens == alone_long  # chunked prefill: the same greedy tokens as one 30-token prefill
    assert first.tokens == engine.generate_ids(short, max_new_tokens=12)


def test_chunked_prefill_logits_match_the_full_forward(family_paths):
    for family in FAMILIES:
        engine = load(family_paths[family], 8, 0)
        ids = list(range(30, 60))
        full = engine.logits([ids])[0]  # [S, V], one forward
        cache, rows = DynamicCache(config=engine.model.config), []
        for start in range(0, len(ids), 7):
            rows.append(engine.model.step([Segment(ids[start : start + 7], cache, "all")])[0])
        assert (torch.cat(rows) - full).abs().max().item() < 1e-4, family


def test_no_padding_reaches_the_experts_and_lookups_count_distinct_experts(family_paths):
    engine = load(family_paths["mixtral"], 2, 0)
    model = engine.model
    batch = prompts(3)
    caches = [DynamicCache(config=model.config) for _ in batch]
    routed: dict[int, list[list[int]]] = {}
    engine.reset_stats()
    logits = model.step([Segment(p, c) for p, c in zip(batch, caches)],
                        on_routing=lambda layer, experts, guess: routed.setdefault(layer, experts))
    tokens = sum(len(p) for p in batch)
    assert all(len(experts) == tokens for experts in routed.values())  # every token once, nothing else
    per_layer = engine.stats()["per_layer"]
    for layer, experts in routed.items():  # one lookup per distinct expert of the step
        assert per_layer[layer]["lookups"] == len({e for token in experts for e in token})
    assert [row.shape for row in logits] == [(160,)] * 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_lm_head_gives_a_row_the_same_logits_whatever_else_shares_its_step(dtype):
    """Each row's logits equal the product's (to the dtype's rounding), and on CPU the float32 and bfloat16 rows
    are the same bits alone (padded) as among 2-16 others: the lm_head adds nothing that depends on the batch."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(3000, 256, generator=gen).to(dtype)  # [V, H]
    rows = torch.randn(16, 256, generator=gen).to(dtype)  # [R, H]
    expected = rows.double() @ weight.double().t()  # [R, V]
    tolerance = {torch.float32: 1e-4, torch.bfloat16: 0.3, torch.float16: 0.05}[dtype]
    alone = [model_module.head_rows(weight, rows[i:i + 1]) for i in range(16)]  # each [1, V]
    for r in (1, 2, 3, 8, 16):
        together = model_module.head_rows(weight, rows[:r])  # [r, V]
        assert together.shape == (r, 3000) and together.dtype == dtype
        torch.testing.assert_close(together.double(), expected[:r], atol=tolerance, rtol=0)
        if dtype != torch.float16 and torch.backends.mkldnn.is_available():  # float16 takes BLAS: no such promise
            assert all(torch.equal(together[i], alone[i][0]) for i in range(r))


def test_a_prefill_computes_only_the_logits_it_samples(family_paths):
    engine = load(family_paths["mixtral"], 8, 0)
    shapes = []
    # What reaches the final norm is what the lm_head multiplies (model.py's _logits).
    handle = engine.model.model.norm.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    try:
        engine.generate_ids(list(range(40)), max_new_tokens=3)
        engine.generate_ids(prompts(3), max_new_tokens=2)
    finally:
        handle.remove()
    hidden = engine.model.config.hidden_size
    assert shapes == [(1, hidden)] * 3 + [(3, hidden)] * 2  # one row per sampling sequence, never [S, V]


def test_prefill_attention_is_eligible_for_the_memory_efficient_sdpa_backend(family_paths, monkeypatch):
    """Without a mask transformers asks SDPA for enable_gqa=True, which below sm_80 only the math backend (a
    [heads, S, S] score matrix) serves: a prefill chunk must reach SDPA with a mask and keys expanded per head."""
    engine = load(family_paths["mixtral"], 8, 0)
    calls = []
    sdpa = F.scaled_dot_product_attention

    def recording(query, key, value, attn_mask=None, **kwargs):
        calls.append((tuple(query.shape), tuple(key.shape), attn_mask is not None, kwargs.get("enable_gqa", False)))
        return sdpa(query, key, value, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    model = engine.model
    cache = DynamicCache(config=model.config)
    ids = list(range(20))
    for start in range(0, 20, 8):
        model.step([Segment(ids[start : start + 8], cache)])
    heads = model.config.num_attention_heads
    assert len(calls) == 3 * model.config.num_hidden_layers and all(
        q[1] == k[1] == heads and q[2] <= 8 and masked and not gqa for q, k, masked, gqa in calls)


@pytest.fixture(scope="module")
def chat_engine(chat_dir):
    return offload_engine.load(chat_dir, config=exact_config(experts_on_device=2, prefetch=1), device="cpu",
                               progress=False)


def test_the_list_forms_of_generate_stream_and_generate_ids(chat_engine):
    engine = chat_engine
    texts = ["The fox", "A café in Zürich serves", "Mixture", "Offloading keeps most experts"]
    options = dict(max_new_tokens=[12, 20, 8, 16], temperature=[0.0, 1.0, 0.0, 1.2], seed=[None, 4, None, 9])
    alone = [engine.generate(t, max_new_tokens=n, temperature=temp, seed=s)
             for t, n, temp, s in zip(texts, *options.values())]
    assert engine.generate(texts, **options) == alone
    pieces: dict[int, list[str]] = {}
    for i, piece in engine.stream(texts, max_batch=2, **options):
        pieces.setdefault(i, []).append(piece)
    assert ["".join(pieces[i]) for i in range(4)] == alone
    assert engine.generate_ids([engine.encode(t) for t in texts], max_new_tokens=5) == \
        [engine.generate_ids(t, max_new_tokens=5) for t in texts]
    assert engine.generate([texts[0]], max_new_tokens=4) == [engine.generate(texts[0], max_new_tokens=4)]


def test_stop_strings_per_prompt_end_only_their_sequence(chat_engine):
    engine = chat_engine
    texts = ["The fox", "A café"]
    full = [engine.generate(t, max_new_tokens=30) for t in texts]
    stop = full[0][6:9]
    expected = [engine.generate(texts[0], max_new_tokens=30, stop=[stop]), full[1]]
    assert expected[0] == full[0][: full[0].index(stop)]
    assert engine.generate(texts, max_new_tokens=30, stop=[[stop], []]) == expected
    shared = engine.generate(texts, max_new_tokens=30, stop=[stop, "zzzz"])  # a list of strings: every prompt's
    assert shared == [engine.generate(t, max_new_tokens=30, stop=[stop, "zzzz"]) for t in texts]


def test_bad_batched_calls_are_refused_naming_the_prompt(chat_engine):
    engine = chat_engine
    with pytest.raises(ValueError, match="max_new_tokens has 3 values for 2 prompts"):
        engine.generate(["a", "b"], max_new_tokens=[1, 2, 3])
    with pytest.raises(ValueError, match=r"prompts\[1\]: the prompt is empty"):
        engine.generate(["a", " "])
    with pytest.raises(ValueError, match=r"prompts\[0\]: .*context window"):
        engine.generate_ids([[1] * 10, [2]], max_new_tokens=[10**6, 1])
    with pytest.raises(ValueError, match="max_batch"):
        engine.generate(["a", "b"], max_batch=0)


def test_a_failing_step_ends_only_the_sequences_in_it(family_paths, monkeypatch):
    engine = load(family_paths["mixtral"], 2, 1)
    model = engine.model
    alone = engine.generate_ids(list(range(40, 52)), max_new_tokens=5)
    running = Batch(model, max_batch=3, prefill_chunk=4)

    def new(ids: list[int]):
        return new_sequence(ids, SamplingParams(max_new_tokens=5), DynamicCache(config=model.config))

    a = new([1, 2, 3])
    running.add(a)
    running.step()  # a is decoding from here on
    b, c = new(list(range(20, 32))), new(list(range(40, 52)))
    running.add(b)
    running.add(c)  # its first chunk waits: b's fills this step's prefill budget
    def failing(*args, **kwargs):
        raise KeyboardInterrupt  # mid-forward: in an expert of the first MoE layer

    monkeypatch.setattr(model_module, "expert_forward", failing)
    with pytest.raises(KeyboardInterrupt):
        running.step()
    monkeypatch.undo()
    engine.cache.check_invariant()
    assert (a.finish_reason, b.finish_reason, c.finish_reason) == ("error", "error", None) and len(running) == 1
    while running:
        running.step()
    assert c.tokens == alone


def test_batched_api_benchmark_script_runs():
    """`scripts/bench_batch.py --demo` (short): a row per batch size, the demo model as offload-serve runs it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "scripts/bench_batch.py", "--demo", "--batches", "1", "2", "--new-tokens",
                           "4", "--repeats", "1", "--threads", "1"], cwd=repo, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "4 of 8 experts per layer on device, prefetch 1" in done.stdout
    assert [line.split("|")[1].strip() for line in done.stdout.splitlines() if line.startswith("| ")][1:] == ["1", "2"]
