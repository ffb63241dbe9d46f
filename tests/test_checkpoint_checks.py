"""Load-time checks of pre-quantized checkpoints: config.json fields that change outputs, a missing or malformed
manifest, named as such."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import exact_config

import offload_engine
from offload_engine import quantize_checkpoint
from offload_engine.checkpoint import MANIFEST
from offload_engine.prequantized import OUTPUT_KEYS, PrequantizedError

# Unquantized float32: conversion is quick, and what is checked here does not depend on the quantization.
QUANT = {**exact_config(), "kernels": "reference"}


@pytest.fixture(scope="module")
def quantized_dir(tiny_dir, tmp_path_factory) -> Path:
    return quantize_checkpoint(tiny_dir, tmp_path_factory.mktemp("pqc") / "tiny", QUANT, progress=False)


@pytest.fixture
def copy(quantized_dir, tmp_path) -> Path:
    return Path(shutil.copytree(quantized_dir, tmp_path / "copy"))


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_manifest_records_the_output_fields(quantized_dir):
    recorded = json.loads((quantized_dir / MANIFEST).read_text())["model"]
    assert {"num_experts_per_tok", "rms_norm_eps", "rope_parameters", "sliding_window", "eos_token_id",
            "max_position_embeddings", "head_dim", "hidden_act"} <= set(recorded) == set(recorded) | set(OUTPUT_KEYS)
    assert recorded["num_experts_per_tok"] == 2 and recorded["rope_parameters"]["rope_theta"] > 0


@pytest.mark.parametrize("field, value", [
    ("num_experts_per_tok", 3), ("rms_norm_eps", 1e-3), ("rope_theta", 500.0), ("sliding_window", 64),
    ("max_position_embeddings", 256), ("eos_token_id", 7), ("top_level_rope_theta", 500.0),
])
def test_an_edited_output_field_is_refused_by_name(copy, field, value):
    def edit(config: dict) -> None:
        if field == "rope_theta" and "rope_parameters" in config:  # transformers 5 nests it
            config["rope_parameters"] = {**config["rope_parameters"], "rope_theta": value}
        else:  # a top-level rope_theta (transformers 4 style) is what a user would edit
            config[field.removeprefix("top_level_")] = value

    edit_json(copy / "config.json", edit)
    name = field.removeprefix("top_level_")
    with pytest.raises(PrequantizedError, match=rf"config.json: {name} is .* quantized with {name} = "):
        offload_engine.load(copy, progress=False)


def test_an_unrecorded_field_still_loads(copy):
    """Fields that do not change outputs (e.g. training-only router_jitter_noise) may differ."""
    edit_json(copy / "config.json", lambda c: c.update(router_jitter_noise=0.5, attention_dropout=0.1))
    assert len(offload_engine.load(copy, progress=False).generate_ids([3, 4], max_new_tokens=2)) == 2


def test_a_deleted_manifest_is_named(copy):
    (copy / MANIFEST).unlink()
    with pytest.raises(offload_engine.CheckpointError, match=rf"pre-quantized .* but its {MANIFEST} is missing"):
        offload_engine.load(copy, progress=False)


@pytest.mark.parametrize("key, value, message", [
    ("tensors", None, "'tensors' must be a mapping"),
    ("files", [], "'files' must be a mapping"),
    ("model", None, "'model' must be a mapping"),
    ("config", 5, "'config' must be a mapping"),
    ("aux_files", "config.json", "'aux_files' must be a list"),
])
def test_a_malformed_manifest_is_named(copy, key, value, message):
    edit_json(copy / MANIFEST, lambda m: m.update({key: value}))
    with pytest.raises(PrequantizedError, match=rf"{MANIFEST} is malformed: {message}"):
        offload_engine.load(copy, progress=False)


def drop_a_crc(manifest: dict) -> None:
    manifest["tensors"][next(iter(manifest["tensors"]))] = {"file": "trunk.safetensors"}


@pytest.mark.parametrize("edit, message", [
    (drop_a_crc, "the entry of tensor .* 'crc32'"),
    (lambda m: m.update(config={"offload": {"prefetch": -1}}), "its 'config' is not a valid engine config"),
    (lambda m: m["model"].pop("hidden_size"), "'model' lacks hidden_size"),
])
def test_malformed_manifest_entries_are_named(copy, edit, message):
    edit_json(copy / MANIFEST, edit)
    with pytest.raises(PrequantizedError, match=f"is malformed: {message}"):
        offload_engine.load(copy, progress=False)


@pytest.mark.parametrize("field, value, message", [
    ("num_experts_per_tok", 9, "num_experts_per_tok \\(9\\) exceeds num_local_experts \\(8\\)"),
    ("num_key_value_heads", 3, "must be a multiple of num_key_value_heads"),
    ("vocab_size", 0, "vocab_size must be a positive integer"),
    ("rms_norm_eps", -1, "rms_norm_eps"),
])
def test_config_json_cross_field_rules(tiny_dir, tmp_path, field, value, message):
    bad = Path(shutil.copytree(tiny_dir, tmp_path / "bad"))
    edit_json(bad / "config.json", lambda c: c.update({field: value}))
    with pytest.raises(offload_engine.CheckpointError, match=rf"config.json.*{message}"):
        offload_engine.load(bad, progress=False)
