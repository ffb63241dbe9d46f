"""Load-time checks of pre-quantized checkpoints: config.json fields that change outputs, a missing or malformed
manifest, manifest entries that disagree with the layout (issue 19, item 7), named as such."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
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


# ---- manifest entries against the layout the config implies (issue 19, item 7) ----
EXPERT = "model.layers.0.experts.0"
REPO = Path(__file__).resolve().parents[1]


def plain_tensor(manifest: dict) -> str:
    """The first tensor stored in the model dtype (not a packed uint8 buffer)."""
    return next(name for name, entry in manifest["tensors"].items() if entry["dtype"] != "uint8")


def set_entry(key: str, value, name=lambda m: EXPERT):
    return lambda m: m["tensors"][name(m)].update({key: value})


MANIFEST_EDITS = {
    # edit, what the error must say
    "expert shape": (set_entry("shape", [123]), rf"tensor {EXPERT} in layer-000.safetensors is recorded with shape "
                                                rf"\[123\] \(expected \[\d+\]\)"),
    "plain shape": (set_entry("shape", [2, 3], plain_tensor), r"tensor \S+ in \S+.safetensors is recorded with shape "
                                                              r"\[2, 3\]"),
    "plain dtype": (set_entry("dtype", "float16", plain_tensor), r"tensor \S+ in \S+.safetensors is recorded with "
                                                                 r"dtype \"float16\" \(expected \"float32\"\)"),
    "expert dtype": (set_entry("dtype", "int8"), rf"tensor {EXPERT} in layer-000.safetensors is recorded with dtype"),
    "tensor's file": (set_entry("file", "layer-001.safetensors"), rf"tensor {EXPERT} in layer-000.safetensors is "
                                                                  rf"recorded with file \"layer-001.safetensors\""),
    "tensor's layout": (set_entry("layout", "attention.q_proj"), rf"tensor {EXPERT} .* layout \"attention.q_proj\""),
    "unknown tensor": (lambda m: m["tensors"].update({"model.layers.0.experts.99": m["tensors"][EXPERT]}),
                       r"'tensors' lists model.layers.0.experts.99, which this model does not have"),
    "unknown file": (lambda m: m["files"].update({"extra.safetensors": {"nbytes": 8}}),
                     r"'files' lists 'extra.safetensors', which is not a file of this checkpoint"),
    "file up a level": (lambda m: m["files"].update({"../trunk.safetensors": m["files"]["trunk.safetensors"]}),
                        r"'files' lists '../trunk.safetensors', a path outside"),
    "file absolute": (lambda m: m["files"].update({"/etc/passwd": {"nbytes": 8}}),
                      r"'files' lists '/etc/passwd', a path outside"),
    "aux up a level": (lambda m: m["aux_files"].append("../secret.json"), r"'aux_files' lists '../secret.json', a path "
                                                                          r"outside"),
    "aux absolute": (lambda m: m["aux_files"].append("/etc/passwd"), r"'aux_files' lists '/etc/passwd', a path outside"),
    "aux in a subfolder": (lambda m: m["aux_files"].append("sub/config.json"), r"'aux_files' lists 'sub/config.json', "
                                                                               r"a path outside"),
    "aux unknown": (lambda m: m["aux_files"].append("notes.txt"), r"'aux_files' lists 'notes.txt', which is not a file"),
    "file's tensor list": (lambda m: m["files"]["layer-000.safetensors"]["tensors"].reverse(),
                           r"the tensors listed for file layer-000.safetensors differ"),
}


@pytest.mark.parametrize("case", MANIFEST_EDITS)
def test_manifest_entries_that_disagree_with_the_layout_are_refused(copy, case):
    edit, message = MANIFEST_EDITS[case]
    edit_json(copy / MANIFEST, edit)
    with pytest.raises(PrequantizedError, match=rf"{MANIFEST}: {message}"):
        offload_engine.load(copy, progress=False)


@pytest.mark.parametrize("case", ["expert shape", "aux up a level"])
def test_offload_chat_refuses_an_edited_manifest_in_one_line(copy, case):
    edit, message = MANIFEST_EDITS[case]
    edit_json(copy / MANIFEST, edit)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "offload_engine.cli", str(copy), "--prompt", "Hi",
                           "--max-new-tokens", "1"], capture_output=True, text=True, timeout=240, env=env, cwd=REPO)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert re.search(message, errors[0]), errors[0]
