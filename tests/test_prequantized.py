"""Pre-quantized checkpoints (issue 5): exact round trip, damaged files rejected by name, atomic conversion, hub path."""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import shutil
import zlib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import offload_engine
from offload_engine import quantize_checkpoint
from offload_engine.checkpoint import DOWNLOAD_PATTERNS, MANIFEST
from offload_engine.config import ConfigError
from offload_engine.experts import ExpertLayout
from offload_engine.prequantized import PrequantizedError

from conftest import exact_config, make_checkpoint

# 4-bit attention / 2-bit experts (the defaults), computed in float32 so CPU matmuls are quick.
QUANT = {"dtype": "float32", "offload": {"experts_on_device": 8, "prefetch": 1}}
IDS = torch.randint(0, 160, (2, 19), generator=torch.Generator().manual_seed(3))


def with_offload(config: dict, k: int) -> dict:
    return {**config, "offload": {**config["offload"], "experts_on_device": k}}


@pytest.fixture(scope="module")
def quantized_dir(tiny_dir, tmp_path_factory) -> Path:
    return quantize_checkpoint(tiny_dir, tmp_path_factory.mktemp("pq") / "tiny-4-2", QUANT, progress=False)


@pytest.fixture
def damaged(quantized_dir, tmp_path) -> Path:
    """A private copy of the converted checkpoint that a test may break."""
    return Path(shutil.copytree(quantized_dir, tmp_path / "copy"))


@pytest.mark.parametrize("k", [2, 8])
def test_round_trip_logits_are_exactly_equal(tiny_dir, quantized_dir, k):
    expected = offload_engine.load(tiny_dir, config=with_offload(QUANT, k), progress=False)
    engine = offload_engine.load(quantized_dir, config={"offload": {"experts_on_device": k}}, progress=False)
    assert engine.config.quant == expected.config.quant and engine.cache.k == k
    assert torch.equal(engine.logits(IDS), expected.logits(IDS))
    assert engine.generate_ids(IDS[0, :4].tolist(), max_new_tokens=12) == \
        expected.generate_ids(IDS[0, :4].tolist(), max_new_tokens=12)
    if k < 8:
        assert engine.stats()["overall"]["misses"] > 0  # the host slots were really used


def test_round_trip_unquantized_with_tied_embeddings(tmp_path):
    src = make_checkpoint(tmp_path / "tied", seed=4, tie_word_embeddings=True)
    config = exact_config(experts_on_device=2)
    dst = quantize_checkpoint(src, tmp_path / "out", config, progress=False)
    manifest = json.loads((dst / MANIFEST).read_text())
    assert "lm_head.weight" not in manifest["tensors"]
    expected = offload_engine.load(src, config=config, progress=False).logits(IDS)
    assert torch.equal(offload_engine.load(dst, progress=False).logits(IDS), expected)


def test_files_are_plain_safetensors_and_json_without_pickle(quantized_dir, tiny_dir):
    manifest = json.loads((quantized_dir / MANIFEST).read_text())
    names = {p.name for p in quantized_dir.iterdir()}
    assert names == set(manifest["files"]) | set(manifest["aux_files"]) | {MANIFEST}
    assert "config.json" in names and "generation_config.json" in names
    for path in quantized_dir.iterdir():
        head = path.read_bytes()[:2]
        assert head[:1] != b"\x80" and head != b"PK", f"{path.name} looks like a pickle / torch.save archive"
        if path.suffix == ".json":
            json.loads(path.read_text())
    # Any safetensors reader can open the files; their bytes match the manifest's checksums and layouts.
    expert_bytes = ExpertLayout.build(64, 128, offload_engine.QuantSpec(2, 16), torch.float32).nbytes
    assert manifest["layouts"]["expert"]["nbytes"] == expert_bytes
    for file in manifest["files"]:
        with safe_open(str(quantized_dir / file), framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                assert manifest["tensors"][name]["shape"] == list(tensor.shape)
                assert zlib.crc32(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()) == \
                    manifest["tensors"][name]["crc32"]
                if ".experts." in name:
                    assert tensor.dtype == torch.uint8 and tensor.numel() == expert_bytes


def _truncate(d: Path) -> None:
    path = d / "layer-001.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def _resize_tensor(d: Path) -> None:
    path = d / "layer-001.safetensors"
    with safe_open(str(path), framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    tensors["model.layers.1.experts.3"] = tensors["model.layers.1.experts.3"][:-16].clone()
    save_file(tensors, str(path))


def _flip_byte(d: Path) -> None:
    path = d / "layer-002.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # inside the last expert's bytes: same size, same header
    path.write_bytes(bytes(data))


def _remove(d: Path) -> None:
    (d / "layer-002.safetensors").unlink()


def _bump_version(d: Path) -> None:
    manifest = json.loads((d / MANIFEST).read_text())
    manifest["format_version"] = 99
    (d / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage,file,words", [
    (_truncate, "layer-001.safetensors", "truncated"),
    (_resize_tensor, "layer-001.safetensors", "model.layers.1.experts.3"),
    (_flip_byte, "layer-002.safetensors", "checksum"),
    (_remove, "layer-002.safetensors", "missing"),
    (_bump_version, MANIFEST, "format version 99"),
])
def test_damaged_checkpoint_is_rejected_naming_the_file(damaged, damage, file, words):
    damage(damaged)
    with pytest.raises(PrequantizedError) as info:
        offload_engine.load(damaged, progress=False)
    assert file in str(info.value) and words in str(info.value), str(info.value)


def test_interrupted_conversion_leaves_no_destination_and_resumes(tiny_dir, quantized_dir, tmp_path, monkeypatch):
    from offload_engine.convert import units

    calls = {"n": 0, "fail_at": 31}
    original = units.quantize_into

    def failing_quantize(weight, layout, buffer):  # one call per expert matrix (3 per expert, 72 in all)
        calls["n"] += 1
        if calls["n"] == calls["fail_at"]:  # in the middle of layer 1
            raise KeyboardInterrupt
        original(weight, layout, buffer)

    monkeypatch.setattr(units, "quantize_into", failing_quantize)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt, match="run the same command again to resume"):
        quantize_checkpoint(tiny_dir, out / "model", QUANT, progress=False)
    assert calls["n"] == 31
    (partial,) = out.iterdir()  # no destination; only the hidden work directory, kept for the next run
    assert partial.name.startswith(".model.partial-")
    calls.update(n=0, fail_at=-1)
    quantize_checkpoint(tiny_dir, out / "model", QUANT, progress=False)
    assert calls["n"] == 72 - 30  # only the matrices not finished before the interrupt are quantized again
    assert sorted(p.name for p in out.iterdir()) == ["model"]
    for path in quantized_dir.iterdir():  # byte for byte what an uninterrupted conversion writes
        assert (out / "model" / path.name).read_bytes() == path.read_bytes(), path.name


def test_existing_destination_is_not_replaced_silently(tiny_dir, quantized_dir):
    with pytest.raises(FileExistsError, match="overwrite"):
        quantize_checkpoint(tiny_dir, quantized_dir, QUANT, progress=False)
    with pytest.raises(offload_engine.CheckpointError, match="already a pre-quantized"):
        quantize_checkpoint(quantized_dir, quantized_dir.parent / "again", QUANT, progress=False)


def test_config_may_change_offload_but_not_quantization(quantized_dir):
    engine = offload_engine.load(quantized_dir, config={"max_context": 256, "offload": {"experts_on_device": 3}},
                                 progress=False)
    assert engine.config.max_context == 256 and engine.cache.k == 3 and engine.config.dtype == "float32"
    engine.close()
    engine = offload_engine.load(quantized_dir, config={"max_batch": 2, "kernels": "reference"}, progress=False)
    assert (engine.config.max_batch, engine.config.kernels) == (2, "reference")
    engine.close()
    with pytest.raises(ConfigError, match="only offload.*, max_context, max_batch and kernels apply"):
        offload_engine.load(quantized_dir, config={"quant": {"experts": {"bits": 3}}}, progress=False)
    with pytest.raises(ConfigError, match="quantized with dtype float32, attention 4-bit group 64, experts 2-bit"):
        offload_engine.load(quantized_dir, config={"quant": {"experts": {"bits": 3}}}, progress=False)
    with pytest.raises(ConfigError, match="asks for dtype bfloat16"):
        offload_engine.load(quantized_dir, config="cpu", progress=False)  # the packaged CPU config is bfloat16


def test_hub_repo_downloads_every_file_and_loads(quantized_dir, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_download(repo_id, allow_patterns=None, **kwargs):
        calls.append((repo_id, allow_patterns))
        return str(quantized_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    engine = offload_engine.load("someone/mixtral-tiny-prequantized", progress=False)
    assert calls and calls[0][0] == "someone/mixtral-tiny-prequantized"
    for path in quantized_dir.iterdir():  # the patterns used for the download fetch everything we wrote
        assert any(fnmatch.fnmatch(path.name, p) for p in calls[0][1]), path.name
    assert calls[0][1] == DOWNLOAD_PATTERNS
    local = offload_engine.load(quantized_dir, progress=False)
    assert torch.equal(engine.logits(IDS), local.logits(IDS))


def test_quantize_script(tiny_dir, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("quantize_script", Path(__file__).parents[1] / "scripts/quantize.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    config = tmp_path / "q.yaml"
    config.write_text("dtype: float32\nquant:\n  experts: {bits: 4, group_size: 32}\n")
    assert script.main([str(tiny_dir), str(tmp_path / "out"), "--config", str(config), "--quiet"]) == 0
    assert "wrote" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    experts = manifest["config"]["quant"]["experts"]
    assert (experts["bits"], experts["group_size"]) == (4, 32)
    assert script.main([str(tiny_dir), str(tmp_path / "out"), "--quiet"]) == 2  # exists: a clear error, no traceback
    assert "already exists" in capsys.readouterr().err


def test_round_trip_bfloat16(tiny_dir, tmp_path):
    config = {"dtype": "bfloat16", "offload": {"experts_on_device": 2, "prefetch": 0}}
    dst = quantize_checkpoint(tiny_dir, tmp_path / "bf16", config, progress=False)
    engine = offload_engine.load(dst, progress=False)
    assert {p.dtype for p in engine.model.parameters()} == {torch.bfloat16}  # the trunk is in the model dtype
    expected = offload_engine.load(tiny_dir, config=config, progress=False).logits(IDS)
    assert torch.equal(engine.logits(IDS), expected)
