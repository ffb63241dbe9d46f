"""scripts/quantize.py user errors and interrupts (issue 11), stale partial directories, upload with a model card
(issue 13, offline: huggingface_hub's HfApi calls are replaced at their boundary)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from offload_engine.convert import ConversionPlan, model_card, push_to_hub, quantize_checkpoint
from offload_engine.convert.cache import ask_before_download, converted_dir
from offload_engine.config import ConfigError, load_config
from offload_engine.checkpoint import MANIFEST

ROOT = Path(__file__).resolve().parents[1]
QUANT = {"dtype": "float32", "offload": {"experts_on_device": 8, "prefetch": 1}}


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("quantize_script", ROOT / "scripts/quantize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def converted(tiny_dir, tmp_path_factory) -> Path:
    return quantize_checkpoint(tiny_dir, tmp_path_factory.mktemp("pq") / "tiny-4-2", QUANT, progress=False)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    return err[0]


def test_destination_equal_to_or_inside_the_source_is_refused(script, tiny_dir, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in tiny_dir.iterdir()}
    assert script.main([str(tiny_dir), str(tiny_dir), "--overwrite", "--quiet"]) == 2
    assert "is the source" in one_error_line(capsys)
    assert script.main([str(tiny_dir), str(tiny_dir / "q"), "--quiet"]) == 2
    assert "inside the source" in one_error_line(capsys)
    assert script.main([str(tiny_dir), str(tiny_dir.parent), "--overwrite", "--quiet"]) == 2
    assert "contains the source" in one_error_line(capsys)
    assert {p.name: p.stat().st_mtime_ns for p in tiny_dir.iterdir()} == before  # untouched
    assert not list(tiny_dir.parent.glob(".*partial*"))


@pytest.mark.parametrize("args,words", [
    (["--device", "tpu"], "--device tpu"),
    (["--device", "cuda"], "no CUDA GPU"),
    (["--config", "CONFIG"], "group_size 48 does not divide"),
])
def test_bad_arguments_are_one_line_errors(script, tiny_dir, tmp_path, capsys, args, words):
    if args == ["--device", "cuda"]:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
    config = tmp_path / "bad.yaml"
    config.write_text("quant:\n  experts: {bits: 2, group_size: 48}\n")
    args = [str(config) if a == "CONFIG" else a for a in args]
    assert script.main([str(tiny_dir), str(tmp_path / "out"), "--quiet", *args]) == 2
    assert words in one_error_line(capsys)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_unwritable_destination_is_a_one_line_error(script, tiny_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert script.main([str(tiny_dir), str(blocker / "out"), "--quiet"]) == 2
    assert str(blocker) in one_error_line(capsys)
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert script.main([str(tiny_dir), str(locked / "out"), "--quiet"]) == 2
        assert "permission" in one_error_line(capsys).lower()


def test_ctrl_c_prints_one_line_and_the_next_run_resumes(script, tiny_dir, converted, tmp_path, capsys, monkeypatch):
    from offload_engine.convert import units

    original, calls = units.quantize_into, {"n": 0}

    def interrupt_once(*args):
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt
        original(*args)

    monkeypatch.setattr(units, "quantize_into", interrupt_once)
    config = tmp_path / "q.yaml"
    config.write_text(json.dumps(QUANT))
    argv = [str(tiny_dir), str(tmp_path / "out"), "--config", str(config), "--quiet"]
    assert script.main(argv) == 130
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("interrupted:") and "resume" in err[0], err
    assert script.main(argv) == 0
    for path in converted.iterdir():
        assert (tmp_path / "out" / path.name).read_bytes() == path.read_bytes()


def test_sigterm_is_handled_like_ctrl_c_and_stale_partials_are_removed(tmp_path):
    from conftest import make_checkpoint

    # Big enough that the conversion is still running when the signal arrives (the tiny model converts in ~0.2 s).
    source = make_checkpoint(tmp_path / "src", hidden_size=128, intermediate_size=1024, num_hidden_layers=4)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "scripts/quantize.py"), str(source), str(out / "m"), "--device", "cpu"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until some work is journalled, then terminate
        journals = list(out.glob(".m.partial-*/journal.jsonl"))
        if journals and len(journals[0].read_text().splitlines()) > 12:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted: conversion stopped (SIGTERM)" in err
    (stale,) = out.glob(".m.partial-*")
    # Another config into the same destination: the stale directory (nobody holds its lock) is removed, and said so.
    result = subprocess.run(cmd + ["--config", "cpu", "--quiet"], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(out)) == ["m"]
    assert f"removed {stale}" in result.stderr


def test_partial_held_by_a_running_conversion_is_left_alone(tiny_dir, tmp_path):
    import fcntl

    held = tmp_path / ".m.partial-0123456789ab"
    held.mkdir()
    with open(held / "lock", "w") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        messages = []
        quantize_checkpoint(tiny_dir, tmp_path / "m", QUANT, progress=False, log=messages.append)
        assert held.exists() and any("still running" in m and str(held) in m for m in messages)


def test_push_to_hub_uploads_the_checkpoint_and_a_model_card(converted, tmp_path, monkeypatch):
    import shutil

    from huggingface_hub import HfApi

    converted = Path(shutil.copytree(converted, tmp_path / "copy"))  # push writes README.md into the folder

    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, kw))
                        or f"https://huggingface.co/{repo_id}")

    def upload_folder(self, repo_id, folder_path, allow_patterns, **kw):
        calls.append(("upload", repo_id, folder_path, list(allow_patterns), kw))
        return "commit"

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    url = push_to_hub(converted, "me/tiny-4-2", source="org/tiny-mixtral", private=True)
    assert url == "https://huggingface.co/me/tiny-4-2"
    (create, upload) = calls
    assert create[1] == "me/tiny-4-2" and create[2]["private"] is True and create[2]["exist_ok"] is True
    assert upload[1] == "me/tiny-4-2" and Path(upload[2]) == converted
    manifest = json.loads((converted / MANIFEST).read_text())
    assert set(upload[3]) == {*manifest["files"], *manifest["aux_files"], MANIFEST, "README.md"}
    assert all((converted / name).exists() for name in upload[3])  # every file it sends is there
    card = (converted / "README.md").read_text()
    total = sum(f["nbytes"] for f in manifest["files"].values())
    for words in ("base_model: org/tiny-mixtral", "attention 4-bit group 64, experts 2-bit group 16",
                  f"| total | {total} |", 'offload_engine.load("me/tiny-4-2"', "offload-chat me/tiny-4-2"):
        assert words in card, words
    assert card == model_card(converted, "me/tiny-4-2", source="org/tiny-mixtral")


def test_quantize_script_pushes_when_asked(script, tiny_dir, tmp_path, capsys, monkeypatch):
    from huggingface_hub import HfApi

    sent = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: f"https://huggingface.co/{repo_id}")
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: sent.append(kw))
    config = tmp_path / "q.yaml"
    config.write_text(json.dumps(QUANT))
    assert script.main([str(tiny_dir), str(tmp_path / "out"), "--config", str(config), "--quiet",
                        "--push-to-hub", "me/tiny"]) == 0
    assert "uploaded to https://huggingface.co/me/tiny" in capsys.readouterr().out
    (call,) = sent
    assert call["repo_id"] == "me/tiny" and Path(call["folder_path"]) == tmp_path / "out"
    assert "README.md" in call["allow_patterns"] and (tmp_path / "out" / "README.md").exists()


def test_push_refuses_a_damaged_checkpoint(converted, tmp_path, monkeypatch):
    import shutil

    from huggingface_hub import HfApi

    from offload_engine.prequantized_io import PrequantizedError

    copy = Path(shutil.copytree(converted, tmp_path / "copy"))
    path = copy / "layer-001.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    monkeypatch.setattr(HfApi, "create_repo", lambda *a, **k: pytest.fail("must not reach the hub"))
    with pytest.raises(PrequantizedError, match="layer-001.safetensors"):
        push_to_hub(copy, "me/broken")


def test_large_downloads_need_a_yes():
    plan = ConversionPlan("org/big", Path("d"), Path("p"), 10, 0, 10**9, 5 * 10**9, 3, 3, 10**9, 10**12, 1.0, True)
    with pytest.raises(ConfigError, match="pass --yes"):
        ask_before_download(False, interactive=lambda: False)(plan)
    assert ask_before_download(True, interactive=lambda: False)(plan)
    assert ask_before_download(False, ask=lambda q: "y", interactive=lambda: True)(plan)
    assert not ask_before_download(False, ask=lambda q: "", interactive=lambda: True)(plan)
    small = ConversionPlan("org/small", Path("d"), Path("p"), 10, 0, 10, 10**6, 1, 1, 10**6, 10**12, 1.0, True)
    assert ask_before_download(False, interactive=lambda: False)(small)


def test_cache_dir_depends_on_quantization_not_offload(tmp_path):
    a = converted_dir("org/m", load_config("t4-16gb"), tmp_path)
    b = converted_dir("org/m", load_config({**load_config("t4-16gb").to_dict(), "offload": {"prefetch": 0}}), tmp_path)
    c = converted_dir("org/m", load_config({"quant": {"experts": {"bits": 3, "group_size": 64}}}), tmp_path)
    assert a == b and a != c and a.parent == tmp_path / "org--m"


def test_a_damaged_or_half_written_part_is_never_trusted(tiny_dir, converted, tmp_path, monkeypatch):
    from offload_engine.convert import units

    original, calls = units.quantize_into, {"n": 0, "stop": 40}

    def counting(*args):
        calls["n"] += 1
        if calls["n"] == calls["stop"]:
            raise KeyboardInterrupt
        original(*args)

    monkeypatch.setattr(units, "quantize_into", counting)
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(tiny_dir, tmp_path / "m", QUANT, progress=False)
    (partial,) = tmp_path.glob(".m.partial-*")
    journal = partial / "journal.jsonl"
    entries = [json.loads(line.split(" ", 1)[1]) for line in journal.read_text().splitlines()[1:]]
    expert = next(e for e in entries if e["tensor"] == "model.layers.0.experts.5/w3")
    with open(partial / expert["file"], "r+b") as f:  # bytes that changed after they were journalled
        f.seek(expert["offset"] + 7)
        byte = f.read(1)
        f.seek(expert["offset"] + 7)
        f.write(bytes([byte[0] ^ 0xFF]))
    with open(journal, "a") as f:  # a line cut short by a kill: never trusted either
        f.write('0badc0de {"tensor": "model.layers.1.experts.6/w1", "file": "layer-001.saf')
    calls.update(n=0, stop=-1)
    quantize_checkpoint(tiny_dir, tmp_path / "m", QUANT, progress=False)
    assert calls["n"] == 72 - 39 + 1  # what was left, plus the damaged matrix
    for path in converted.iterdir():
        assert (tmp_path / "m" / path.name).read_bytes() == path.read_bytes(), path.name
