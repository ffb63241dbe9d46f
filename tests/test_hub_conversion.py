"""Streaming conversion from the hub, resume, pre-quantized hub repos (issue 13), against a stand-in hub; the
streamed conversion of every on-disk expert layout (per-expert, fused 3-D, MXFP4 split across shards).

The real huggingface_hub client talks to tests/hub_standin.py on loopback. huggingface_hub reads HF_ENDPOINT,
HF_HOME and HF_HUB_OFFLINE when it is imported, so everything that talks to the stand-in runs in a subprocess with
those set (and HF_HUB_OFFLINE unset there only).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import MixtralForCausalLM

import offload_engine
from offload_engine.checkpoint import MANIFEST
from offload_engine import quantize_checkpoint

from conftest import tiny_config
from families_cases import make_family_checkpoint, mxfp4_experts
from hub_standin import StandInHub

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ("dtype: float32\noffload: {experts_on_device: 4, prefetch: 1}\n"  # HQQ without its optimiser: quick
          "quant:\n  attention: {bits: 4, group_size: 64, optimize: false}\n"
          "  experts: {bits: 2, group_size: 16, optimize: false}\n")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """The tiny Mixtral in 11 shards of ~0.3 MB, some tensor groups straddling two shards."""
    path = tmp_path_factory.mktemp("sharded") / "src"
    torch.manual_seed(0)
    model = MixtralForCausalLM(tiny_config())
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
    model.save_pretrained(path, max_shard_size="300KB")
    return path


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "q.yaml"
    path.write_text(CONFIG)
    return path


@pytest.fixture(scope="module")
def reference(sharded, config_file, tmp_path_factory) -> Path:
    """quantize_checkpoint of the same files as a local directory: what the streamed conversion must equal."""
    return quantize_checkpoint(sharded, tmp_path_factory.mktemp("ref") / "m", str(config_file), progress=False,
                               device="cpu")


def hub_env(hub: StandInHub, home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_TOKEN", "HF_HUB_ENABLE_HF_TRANSFER")}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(home), PYTHONPATH=str(ROOT), HF_HUB_DISABLE_TELEMETRY="1")
    return env


def quantize_cmd(repo: str, dst: Path, config: Path) -> list[str]:
    return [sys.executable, str(ROOT / "scripts/quantize.py"), repo, str(dst), "--config", str(config),
            "--device", "cpu"]


def assert_same_files(out: Path, reference: Path) -> None:
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
    for path in reference.iterdir():
        assert (out / path.name).read_bytes() == path.read_bytes(), path.name


def disk_bytes(*roots: Path) -> int:
    """Bytes in the regular files under `roots` (files may vanish while we look: they count as gone)."""
    total = 0
    for root in roots:
        for folder, _, names in os.walk(root):
            for name in names:
                try:
                    st = os.lstat(os.path.join(folder, name))
                except FileNotFoundError:
                    continue
                total += st.st_size if not os.path.islink(os.path.join(folder, name)) else 0
    return total


def test_streamed_conversion_equals_local_and_keeps_at_most_one_shard(sharded, config_file, reference, tmp_path):
    """Peak disk is the output plus one shard (the README and `quantize.py --help` say so; these shards hold no
    MXFP4 matrix, whose `_blocks` and `_scales` could straddle two), plus the small files (config, index)."""
    out, home = tmp_path / "out", tmp_path / "hf"
    peak, running = [0], [True]

    def sample(*_):
        peak[0] = max(peak[0], disk_bytes(out, home))

    def poll():
        while running[0]:
            sample()
            time.sleep(0.002)

    with StandInHub({"org/tiny": sharded}) as hub:
        hub.on_get = lambda name: sample()  # also at the start of every download, whatever the poller saw
        poller = threading.Thread(target=poll)
        poller.start()
        try:
            result = subprocess.run(quantize_cmd("org/tiny", out / "m", config_file), env=hub_env(hub, home),
                                    capture_output=True, text=True, timeout=300)
        finally:
            running[0] = False
            poller.join()
    assert result.returncode == 0, result.stderr
    assert "download" in result.stderr and "disk needed" in result.stderr and "free" in result.stderr  # the plan
    assert_same_files(out / "m", reference)
    shards = sorted(p for p in sharded.glob("*.safetensors"))
    assert hub.gets() == {p.name: 1 for p in shards}  # every shard fetched exactly once
    assert not list(home.rglob("*.safetensors")) and sorted(os.listdir(out)) == ["m"]  # sources deleted
    largest = max(p.stat().st_size for p in shards)
    small = sum(p.stat().st_size for p in sharded.iterdir() if p.suffix != ".safetensors")
    output = disk_bytes(out / "m")
    assert 0 < peak[0] <= output + largest + small + 2**16, (peak[0], output, largest, small)  # + the journal
    assert peak[0] < output + sum(p.stat().st_size for p in shards) / 2  # far from holding the source


def test_killed_conversion_resumes_with_identical_bytes_and_no_repeated_downloads(sharded, config_file, reference,
                                                                                  tmp_path):
    out, home = tmp_path / "out", tmp_path / "hf"
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    victim = shards[6]
    with StandInHub({"org/tiny": sharded}) as hub:
        proc = subprocess.Popen(quantize_cmd("org/tiny", out / "m", config_file), env=hub_env(hub, home),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        hub.on_get = lambda name: (sharded / name).stat().st_size // 2 if name == victim else None
        hub.on_cut = lambda name: os.kill(proc.pid, signal.SIGKILL)  # mid-download, after 6 shards were converted
        proc.communicate(timeout=300)
        assert proc.returncode == -signal.SIGKILL
        assert not (out / "m").exists()
        (partial,) = [p for p in out.iterdir() if p.name.startswith(".m.partial-")]
        first = hub.gets()
        assert first == {name: 1 for name in shards[:7]}

        hub.on_get = hub.on_cut = None
        result = subprocess.run(quantize_cmd("org/tiny", out / "m", config_file), env=hub_env(hub, home),
                                capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "resuming:" in result.stderr
    assert_same_files(out / "m", reference)
    assert sorted(os.listdir(out)) == ["m"]  # the partial directory became the checkpoint
    # Finished shards are never asked for again; only the one cut short, and those never started, are fetched.
    assert hub.gets() == {name: 2 if name == victim else 1 for name in shards}


def test_prequantized_repo_from_hub_loads_and_is_verified(reference, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for path in reference.iterdir():
        data = bytearray(path.read_bytes())
        if path.name == "layer-002.safetensors":
            data[-5] ^= 0xFF  # inside the last expert: same size, same header
        (bad / path.name).write_bytes(bytes(data))
    ids = [[3, 17, 42, 99, 5, 1]]
    code = (
        "import sys, torch, offload_engine\n"
        "from offload_engine.prequantized_io import PrequantizedError\n"
        "engine = offload_engine.load('org/tiny-pq', device='cpu', progress=True)\n"
        f"torch.save(engine.logits({ids}), sys.argv[1])\n"
        "try:\n"
        "    offload_engine.load('org/tiny-pq-bad', device='cpu', progress=False)\n"
        "except PrequantizedError as e:\n"
        "    print('REJECTED', e)\n"
    )
    with StandInHub({"org/tiny-pq": reference, "org/tiny-pq-bad": bad}) as hub:
        result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "logits.pt")],
                                env=hub_env(hub, tmp_path / "hf"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    expected = offload_engine.load(reference, device="cpu", progress=False).logits(ids)
    # The bytes are checked by CRC; logits from two processes may differ in the last bit (kernels compiled there).
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, rtol=0, atol=1e-5)
    assert {f for (m, f) in hub.requests if m == "GET"} >= {p.name for p in reference.iterdir()}
    line = next(l for l in result.stdout.splitlines() if l.startswith("REJECTED"))
    assert "layer-002.safetensors" in line and "checksum" in line


def test_offload_chat_converts_a_hub_source_once_then_loads_the_converted_copy(tmp_path):
    from conftest import make_chat_checkpoint

    src = make_chat_checkpoint(tmp_path / "chat")
    config = tmp_path / "q.yaml"
    config.write_text(CONFIG)
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "offload_engine.cli", "org/chat", "--config", str(config), "--device", "cpu",
           "--cache-dir", str(cache), "--prompt", "The quick brown", "--max-new-tokens", "4", "--temperature", "0"]
    with StandInHub({"org/chat": src}) as hub:
        env = hub_env(hub, tmp_path / "hf")
        first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert first.returncode == 0, first.stderr
        assert "convert org/chat" in first.stderr and "(1 of 1 shards)" in first.stderr  # the plan, before downloading
        (converted,) = cache.glob("org--chat/*")
        assert (converted / "offload_manifest.json").exists() and str(converted) in first.stderr
        fetched = hub.gets()
        assert fetched == {"model.safetensors": 1}
        second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert "convert org/chat" not in second.stderr and f"loading {converted}" in second.stderr
    assert hub.gets() == fetched  # nothing downloaded again
    assert second.stdout == first.stdout and first.stdout.strip()  # greedy: the same reply from the same weights


def test_keep_source_keeps_the_shards_in_the_hub_cache_for_the_next_conversion(sharded, config_file, reference,
                                                                               tmp_path):
    home = tmp_path / "hf"
    other = tmp_path / "other.yaml"
    other.write_text(CONFIG.replace("bits: 2, group_size: 16", "bits: 4, group_size: 32"))
    with StandInHub({"org/tiny": sharded}) as hub:
        env = hub_env(hub, home)
        for config, dst in ((config_file, tmp_path / "a"), (other, tmp_path / "b")):
            result = subprocess.run(quantize_cmd("org/tiny", dst, config) + ["--keep-source"], env=env,
                                    capture_output=True, text=True, timeout=300)
            assert result.returncode == 0, result.stderr
    assert_same_files(tmp_path / "a", reference)
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert hub.gets() == {name: 1 for name in shards}  # the second conversion found them all in the cache
    assert sorted(p.name for p in home.rglob("*.safetensors")) == shards
    assert "nothing to download" in result.stderr


# Shared experts and dense layers are trunk linears; reference kernels: the fused ones build per matrix shape.
FAMILY_CONFIG = CONFIG + "  trunk: {bits: 4, group_size: 32, optimize: false}\nkernels: reference\n"
IDS = torch.randint(0, 160, (2, 13), generator=torch.Generator().manual_seed(1))  # longer than GPT-OSS's window


def write_shards(tensors: dict[str, torch.Tensor], config_from: Path, dst: Path, max_bytes: int = 100_000) -> Path:
    """`tensors` as a sharded checkpoint with an index (and `config_from`'s config files), in name order: a new
    shard when one would pass `max_bytes`, so a layer's tensors straddle shards, and before every MXFP4 `_scales`,
    so every `_blocks` / `_scales` pair sits in two shards (the case a converter could trip on)."""
    groups: list[list[str]] = [[]]
    for name in sorted(tensors):
        full = sum(tensors[n].nbytes for n in groups[-1]) + tensors[name].nbytes > max_bytes
        if groups[-1] and (full or name.endswith("_scales")):
            groups.append([])
        groups[-1].append(name)
    dst.mkdir(parents=True)
    weight_map = {}
    for i, names in enumerate(groups):
        shard = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: tensors[n] for n in names}, dst / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, shard))
    total = sum(t.nbytes for t in tensors.values())
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    for name in ("config.json", "generation_config.json"):
        if (config_from / name).exists():
            shutil.copyfile(config_from / name, dst / name)
    return dst


@pytest.mark.parametrize("model_type, mxfp4", [("qwen3_moe", False), ("deepseek_v2", False), ("gpt_oss", False),
                                               ("gpt_oss", True), ("phimoe", False), ("ernie4_5_moe", False)],
                         ids=["qwen3_moe", "deepseek_v2", "gpt_oss", "gpt_oss-mxfp4", "phimoe", "ernie4_5_moe"])
def test_streamed_conversion_reads_each_familys_layout(model_type, mxfp4, tmp_path, one_thread):
    """Qwen3-MoE (per-expert tensors, a dense layer), DeepSeek-V2 (MLA, shared experts, dense first layer), GPT-OSS
    (fused 3-D experts with biases; MXFP4 `_blocks` / `_scales` in different shards), Phi-3.5-MoE and ERNIE-4.5
    (trunk tensors renamed on disk) from a sharded hub repo: the
    same bytes as the local conversion of the same weights in one file, and the logits of quantizing at load."""
    whole = make_family_checkpoint(tmp_path / "whole", model_type)
    if mxfp4:  # the local conversion reads the same MXFP4 tensors, from one file
        tensors = mxfp4_experts(load_file(whole / "model.safetensors"))
        save_file(tensors, whole / "model.safetensors", metadata={"format": "pt"})
    sharded = write_shards(load_file(whole / "model.safetensors"), whole, tmp_path / "sharded")
    weight_map = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted(set(weight_map.values()))
    assert any(len({s for n, s in weight_map.items() if n.startswith(f"model.layers.{l}.")}) > 1 for l in range(3))
    pairs = [n for n in weight_map if n.endswith("_blocks")]
    assert len(pairs) == (6 if mxfp4 else 0)  # gate_up and down in each of 3 layers
    assert all(weight_map[n] != weight_map[n.replace("_blocks", "_scales")] for n in pairs)
    config = tmp_path / "q.yaml"
    config.write_text(FAMILY_CONFIG)
    local = quantize_checkpoint(whole, tmp_path / "local", str(config), progress=False, device="cpu")

    out, home = tmp_path / "out", tmp_path / "hf"
    held = []  # (shards, their bytes and the incoming one's) whenever a shard's download starts

    def on_get(name: str) -> None:  # None: the whole file is sent
        if name.endswith(".safetensors"):
            kept = list(out.glob(".m.partial-*/source/*.safetensors"))  # not yet released by the conversion
            held.append((len(kept), sum(p.stat().st_size for p in kept) + (sharded / name).stat().st_size))

    with StandInHub({"org/fam": sharded}) as hub:
        hub.on_get = on_get
        result = subprocess.run(quantize_cmd("org/fam", out / "m", config), env=hub_env(hub, home),
                                capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert hub.gets() == {s: 1 for s in shards}
    assert not list(home.rglob("*.safetensors")) and sorted(os.listdir(out)) == ["m"]
    # Each shard is deleted before the next is fetched, but a `_blocks` shard waits for its `_scales` shard; the
    # printed plan counted that peak (to its 0.01 MB).
    assert max(n for n, _ in held) == (1 if mxfp4 else 0), held
    needed = float(re.search(r"disk needed ([\d.]+) MB", result.stderr).group(1)) * 1e6
    output = sum(p.stat().st_size for p in (out / "m").glob("*.safetensors"))
    assert abs(needed - output - max(b for _, b in held)) < 5e3, (needed, output, held)
    assert_same_files(out / "m", local)
    assert json.loads((out / "m" / MANIFEST).read_text())["family"] == model_type
    expected = offload_engine.load(sharded, config=str(config), device="cpu", progress=False)
    engine = offload_engine.load(out / "m", device="cpu", progress=False)
    assert torch.equal(engine.logits(IDS), expected.logits(IDS))
