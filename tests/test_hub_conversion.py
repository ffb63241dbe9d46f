"""Streaming conversion from the hub, resume, pre-quantized hub repos (issue 13), against a stand-in hub.

The real huggingface_hub client talks to tests/hub_standin.py on loopback. huggingface_hub reads HF_ENDPOINT,
HF_HOME and HF_HUB_OFFLINE when it is imported, so everything that talks to the stand-in runs in a subprocess with
those set (and HF_HUB_OFFLINE unset there only).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import MixtralForCausalLM

from offload_engine.prequantized import quantize_checkpoint

from conftest import tiny_config
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


def test_streamed_conversion_equals_local_and_keeps_at_most_two_shards(sharded, config_file, reference, tmp_path):
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
    two_largest = sum(sorted((p.stat().st_size for p in shards), reverse=True)[:2])
    output = disk_bytes(out / "m")
    assert 0 < peak[0] <= output + two_largest, (peak[0], output, two_largest)
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
    import offload_engine

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
