"""Every family of the adapter table (issue 10) against transformers' own class on the same tiny random weights:
exact logits and greedy tokens unquantized, exact on dequantized weights quantized, bit-identical pre-quantized
round trip; plus MoE-layer placement, speculation through each layer's own router, and GPT-OSS's MXFP4 experts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml
from safetensors.torch import load_file, save_file

import offload_engine
from offload_engine.anatomy import Anatomy
from offload_engine.config import QuantSpec
from offload_engine.convert import model_card
from offload_engine.checkpoint import MANIFEST
from offload_engine.families import FAMILIES
from offload_engine.kernels import QuantLinear
from offload_engine.quantize import dequantize, quantize_matrix

from families_cases import CONFIGS, family_config, make_family_checkpoint, mxfp4_experts, num_experts, reference

TYPES = sorted(CONFIGS)
EXACT = {"dtype": "float32", "quant": {p: {"bits": None} for p in ("attention", "experts", "trunk")}}
# Reference kernels: the fused ones compile per matrix shape (many here) and are tested on Mixtral's shapes elsewhere.
QUANT = {"dtype": "float32", "kernels": "reference",
         "quant": {"attention": {"bits": 4, "group_size": 64}, "experts": {"bits": 2, "group_size": 16},
                   "trunk": {"bits": 4, "group_size": 32}}}
IDS = torch.randint(0, 160, (2, 13), generator=torch.Generator().manual_seed(1))  # longer than GPT-OSS's window


@pytest.fixture(scope="module", autouse=True)
def one_thread_here():
    """Tiny ops on a busy 2-core machine: OpenMP barriers can wait tens of ms for a descheduled thread (the
    references' index_add_ alone took most of this file's time with two threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {t: make_family_checkpoint(root / t, t) for t in TYPES}


@pytest.fixture(scope="module")
def expected(family_dirs) -> dict[str, tuple[torch.Tensor, list[int]]]:
    """transformers' logits on IDS and greedy continuation of IDS[0, :5], per family."""
    out = {}
    for t, path in family_dirs.items():
        ref = reference(path, t)
        with torch.no_grad():
            logits = ref(IDS).logits
        tokens = ref.generate(IDS[:1, :5], max_new_tokens=12, do_sample=False)[0, 5:].tolist()
        out[t] = (logits, tokens)
    return out


def _offload(config: dict, k: int, prefetch: int) -> dict:
    return {**config, "offload": {"experts_on_device": k, "prefetch": prefetch}}


@pytest.mark.parametrize("prefetch", [0, 1])
@pytest.mark.parametrize("resident", ["one", "top_k", "all"])
@pytest.mark.parametrize("model_type", TYPES)
def test_unquantized_engine_equals_transformers(family_dirs, expected, model_type, resident, prefetch):
    E, K = num_experts(model_type), family_config(model_type).num_experts_per_tok
    k = {"one": 1, "top_k": K, "all": E}[resident]
    engine = offload_engine.load(family_dirs[model_type], config=_offload(EXACT, k, prefetch), progress=False)
    logits, tokens = expected[model_type]
    assert logits.std() > 0.1  # far from uniform: a wrong expert or mask would show
    assert (engine.logits(IDS) - logits).abs().max().item() < 1e-4
    assert engine.generate_ids(IDS[0, :5].tolist(), max_new_tokens=12) == tokens
    stats = engine.stats()["overall"]
    assert stats["hits"] + stats["misses"] == stats["lookups"] > 0
    assert (stats["misses"] == 0) == (k == E)


@pytest.mark.parametrize("model_type", TYPES)
def test_bfloat16_engine_matches_transformers_in_bfloat16(family_dirs, model_type):
    """Half precision: the tensors transformers keeps in float32 (DeepSeek's router) stay float32 here too."""
    import transformers

    engine = offload_engine.load(family_dirs[model_type], config={**_offload(EXACT, 2, 1), "dtype": "bfloat16"},
                                 progress=False)
    cls = getattr(transformers, FAMILIES[model_type].hf_class)
    ref = cls.from_pretrained(family_dirs[model_type], dtype=torch.bfloat16, experts_implementation="eager").eval()
    with torch.no_grad():
        expected = ref(IDS).logits.float()
    assert ((engine.logits(IDS) - expected).norm() / expected.norm()).item() < 0.02
    dtypes = {n: p.dtype for n, p in ref.named_parameters()}
    assert {n: p.dtype for n, p in engine.model.named_parameters() if n in dtypes} == \
        {n: d for n, d in dtypes.items() if n in dict(engine.model.named_parameters())}


def test_moe_layers_and_trunk_follow_each_family(family_dirs):
    moe = {t: Anatomy.of(family_config(t)).moe_layers for t in TYPES}
    assert moe["qwen3_moe"] == (0, 2)  # mlp_only_layers=[1]
    assert moe["deepseek_v2"] == (1, 2)  # first_k_dense_replace=1
    assert moe["mixtral"] == moe["gpt_oss"] == moe["olmoe"] == moe["qwen2_moe"] == (0, 1, 2)
    qwen2 = {t.name: t for t in Anatomy.of(family_config("qwen2_moe")).trunk}
    assert qwen2["model.layers.0.mlp.shared_expert.up_proj"].part == "trunk"
    assert qwen2["model.layers.0.self_attn.q_proj"].part == "attention"
    assert qwen2["model.layers.0.self_attn.q_proj.bias"].part is None
    assert qwen2["model.layers.0.mlp.shared_expert_gate.weight"].part is None  # a gate: full precision
    assert qwen2["model.layers.0.mlp.gate.weight"].part is None  # the router: full precision
    deepseek = {t.name: t for t in Anatomy.of(family_config("deepseek_v2"), torch.bfloat16).trunk}
    assert deepseek["model.layers.0.mlp.gate_proj"].part == "trunk"  # the dense first layer
    assert deepseek["model.layers.1.mlp.gate.weight"].float32  # transformers keeps DeepSeek's router in float32
    engine = offload_engine.load(family_dirs["deepseek_v2"], config=_offload(EXACT, 2, 1), progress=False)
    assert len(engine.cache.stats) == 2 and engine.model.moe_layers == [1, 2]


@pytest.mark.parametrize("model_type", TYPES)
def test_speculation_runs_each_moe_layers_own_router(family_dirs, model_type):
    engine = offload_engine.load(family_dirs[model_type], config=_offload(EXACT, 1, 1), progress=False)
    calls = {}
    for m, router in enumerate(engine.model.routers):
        router.register_forward_hook(lambda module, args, out, m=m: calls.__setitem__(m, calls.get(m, 0) + 1))
    seen = []
    engine.model(IDS[:1, :6], on_routing=lambda layer, experts, guess: seen.append((layer, len(guess))))
    # each router runs twice: once speculatively (on an earlier residual), once in its own block
    assert calls == {m: 2 for m in range(len(engine.model.moe_layers))}
    assert seen == [(m, 1) for m in range(len(engine.model.moe_layers))]
    assert engine.model.host_syncs == 1 + len(engine.model.moe_layers)  # one read per MoE layer + the first guess


@pytest.mark.parametrize("model_type", TYPES)
def test_memory_plan_counts_what_the_engine_holds(family_dirs, model_type):
    """`auto`'s arithmetic: the trunk bytes it plans for are the bytes the loaded engine holds besides the cache."""
    from offload_engine.memory import plan_memory

    config = _offload(QUANT, "auto", 1)
    engine = offload_engine.load(family_dirs[model_type], config=config, progress=False)
    tensors = {t.data_ptr(): t for t in engine.model.state_dict().values()}  # `layers` is also `model.layers`
    held = sum(t.numel() * t.element_size() for t in tensors.values())
    plan = plan_memory(engine.model.config, offload_engine.load_config(config), 64 * 2**30)
    assert plan.trunk_bytes == held
    assert plan.experts_on_device == engine.cache.k == num_experts(model_type)  # all fit (and CPU's auto: all)
    assert plan.expert_bytes == engine.cache.nbytes


def _roundtrip(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    layout, buffer = quantize_matrix(weight, spec, torch.float32)
    return dequantize(layout, layout.views(buffer))


def _dequantized_reference(path: Path, model_type: str):
    """transformers' model with every quantized weight replaced by its dequantized self: each linear layer of the
    decoder layers with more than one output, routers aside (attention per quant.attention, shared experts /
    dense MLPs per quant.trunk) and each routed expert's gate, up and down, found through transformers' own
    layout flags."""
    specs = {p: QuantSpec(**s) for p, s in QUANT["quant"].items()}
    model = reference(path, model_type)
    router = f"mlp.{FAMILIES[model_type].router}"  # routers stay in full precision (HunYuan's is an nn.Linear)
    with torch.no_grad():
        for name, module in model.model.layers.named_modules():
            if isinstance(module, nn.Linear) and module.out_features > 1 and f"{router}." not in f"{name}.":
                module.weight.copy_(_roundtrip(module.weight, specs["attention" if "self_attn" in name else "trunk"]))
            if hasattr(module, "gate_up_proj"):
                for e in range(module.gate_up_proj.shape[0]):
                    t = (lambda w: w.T) if module.is_transposed else (lambda w: w)  # noqa: E731
                    gate_up = t(module.gate_up_proj[e]).clone()  # [2I, H]
                    halves = [slice(0, None, 2), slice(1, None, 2)] if not module.is_concatenated else \
                        [slice(0, gate_up.shape[0] // 2), slice(gate_up.shape[0] // 2, None)]
                    for rows in halves:
                        gate_up[rows] = _roundtrip(gate_up[rows].contiguous(), specs["experts"])
                    t(module.gate_up_proj[e]).copy_(gate_up)
                    t(module.down_proj[e]).copy_(_roundtrip(t(module.down_proj[e]).contiguous(), specs["experts"]))
    return model


@pytest.mark.parametrize("model_type", TYPES)
def test_quantized_engine_equals_transformers_on_dequantized_weights(tmp_path, model_type):
    path = make_family_checkpoint(tmp_path / model_type, model_type, std=0.04)
    engine = offload_engine.load(path, config=_offload(QUANT, 2, 1), progress=False)
    linears = [m for m in engine.model.model.layers.modules() if isinstance(m, QuantLinear)]
    assert linears and all(m.layout.spec.bits == 4 for m in linears)
    with torch.no_grad():
        expected = _dequantized_reference(path, model_type)(IDS).logits
    assert (engine.logits(IDS) - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("model_type", TYPES)
def test_prequantized_round_trip_is_bit_identical(family_dirs, tmp_path, model_type):
    config = _offload(QUANT, 2, 1)
    dst = offload_engine.quantize_checkpoint(family_dirs[model_type], tmp_path / "pq", config, progress=False)
    assert json.loads((dst / MANIFEST).read_text())["family"] == model_type
    assert f"{num_experts(model_type)} experts per MoE layer" in model_card(dst, "me/tiny")  # the hub's model card
    expected = offload_engine.load(family_dirs[model_type], config=config, progress=False)
    engine = offload_engine.load(dst, config={"offload": {"experts_on_device": 2}}, progress=False)
    assert torch.equal(engine.logits(IDS), expected.logits(IDS))
    assert engine.generate_ids(IDS[0, :4].tolist(), max_new_tokens=8) == \
        expected.generate_ids(IDS[0, :4].tolist(), max_new_tokens=8)


def test_loaded_engine_does_not_alias_the_source_files(family_dirs, tmp_path):
    """Quantize-at-load on CPU: the trunk tensors are the engine's own memory, not views of safetensors' mmap of the
    source (those are 8-byte aligned, which changed Qwen2-MoE's shared-expert gate sums by 1e-6, and they would see
    the file rewritten under a running engine)."""
    src = tmp_path / "src"
    shutil.copytree(family_dirs["qwen2_moe"], src)
    engine = offload_engine.load(src, config=_offload(QUANT, 2, 1), progress=False)
    before = engine.logits(IDS)
    assert all(p.data_ptr() % 64 == 0 for p in engine.model.parameters())  # torch's allocator, not the mmap
    for shard in src.glob("*.safetensors"):  # rewritten in place, e.g. by a re-download into the same directory
        size = shard.stat().st_size
        with open(shard, "r+b") as f:
            f.seek(size // 2)
            f.write(bytes(size - size // 2))
    assert torch.equal(engine.logits(IDS), before)


def test_gpt_oss_mxfp4_experts_are_dequantized_then_quantized(family_dirs, tmp_path):
    """A GPT-OSS checkpoint whose experts are stored as the releases store them (MXFP4 `_blocks` / `_scales`):
    the engine equals transformers run on transformers' own dequantization of those blocks."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    src, dst = family_dirs["gpt_oss"], tmp_path / "mxfp4"
    dst.mkdir()
    tensors = mxfp4_experts(load_file(src / "model.safetensors"))
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    (dst / "config.json").write_text((src / "config.json").read_text())

    ref = reference(src, "gpt_oss")
    with torch.no_grad():
        for l, layer in enumerate(ref.model.layers):
            for proj in ("gate_up_proj", "down_proj"):
                name = f"model.layers.{l}.mlp.experts.{proj}"
                dequantized = convert_moe_packed_tensors(tensors[f"{name}_blocks"], tensors[f"{name}_scales"],
                                                         dtype=torch.float32)
                assert not torch.equal(dequantized, getattr(layer.mlp.experts, proj))  # FP4 really rounds
                getattr(layer.mlp.experts, proj).copy_(dequantized)
        expected = ref(IDS).logits
    engine = offload_engine.load(dst, config=_offload(EXACT, 2, 1), progress=False)
    assert (engine.logits(IDS) - expected).abs().max().item() < 1e-4
    converted = offload_engine.quantize_checkpoint(dst, tmp_path / "pq", _offload(QUANT, 2, 1), progress=False)
    quantized = offload_engine.load(dst, config=_offload(QUANT, 2, 1), progress=False)
    assert torch.equal(offload_engine.load(converted, progress=False).logits(IDS), quantized.logits(IDS))


def test_unsupported_model_type_lists_the_families(family_dirs, tmp_path):
    path = tmp_path / "llama"
    path.mkdir()
    config = json.loads((family_dirs["olmoe"] / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(offload_engine.CheckpointError, match="'llama' is not supported.*Qwen3-MoE \\(qwen3_moe\\)"
                       ".*GPT-OSS \\(gpt_oss\\)"):
        offload_engine.load(path, progress=False)


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_chat_renders_with_the_tokenizers_own_template(tmp_path, capsys):
    """Families other than Mixtral: the conversation is the tokenizer's chat template, tokenized as one text."""
    from conftest import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(tmp_path)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(tmp_path)
    make_family_checkpoint(tmp_path, "qwen3_moe", vocab_size=len(tokenizer))
    engine = offload_engine.load(tmp_path, config=_offload(EXACT, 2, 1), progress=False)
    prompts, step = [], engine.model.step
    engine.model.step = lambda segments, *a, **k: (prompts.append(segments[0].ids), step(segments, *a, **k))[1]
    engine.chat(system="Be brief.").send("Hello there, who are you?", max_new_tokens=2)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there, who are you?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert prompts[0] == tokenizer(text, add_special_tokens=False)["input_ids"]

    from offload_engine import cli  # offload-chat answers with the same model and template

    config = tmp_path / "exact.yaml"
    config.write_text(yaml.safe_dump(_offload(EXACT, 2, 1)))
    assert cli.main([str(tmp_path), "--config", str(config), "--prompt", "hi", "--max-new-tokens", "4"]) == 0
    assert "tok/s" in capsys.readouterr().err


def test_profiler_reports_moe_layers_of_a_family_with_a_dense_layer(family_dirs, tmp_path):
    config, out = tmp_path / "exact.yaml", tmp_path / "report.json"
    config.write_text(yaml.safe_dump({**EXACT, "kernels": "reference"}))
    cmd = [sys.executable, str(Path(__file__).resolve().parents[1] / "scripts/profile_cache.py"),
           str(family_dirs["deepseek_v2"]), "--config", str(config), "--experts-on-device", "2", "--prefetch", "1",
           "--max-new-tokens", "4", "--num-random-prompts", "1", "--prompt-tokens", "5", "--threads", "1",
           "--out", str(out), "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert (report["family"], report["num_layers"], report["num_experts"], report["top_k"]) == ("deepseek_v2", 2, 8, 2)
    assert all(len(step) == 2 and all(len(layer) == 2 for layer in step) for step in report["routing"])
