"""Every entry point, given the model in every way a user names one (issue 19), run as the user runs it: a real
subprocess with PYTHONPATH set to this checkout, offline (HF_HUB_OFFLINE=1) with its own Hugging Face cache.

    entry points: offload-chat, offload-serve, scripts/quantize.py, scripts/profile_cache.py
    models:       demo, --demo, the packaged demo directory, a converted directory, a Hugging Face directory,
                  a hub id whose converted copy is in the conversion cache, a hub id that is not, a missing path,
                  a file

Each case either works (a 2-token answer; the server answers /health; a converted directory is written; a profile
report is written) or ends with exactly one line, `error: ...`, on stderr and exit status 2. The cases run side by
side (each is mostly interpreter start-up), with one thread each: on a busy machine OpenMP threads waiting on
each other make HQQ's quantization of the demo ten times slower.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import offload_engine
from offload_engine.checkpoint import DEMO_DIR, MANIFEST
from offload_engine.config import load_config
from offload_engine.convert.cache import converted_dir
from offload_engine.loader import DEMO_OFFLOAD, demo_config

from conftest import make_checkpoint

REPO = Path(__file__).resolve().parents[1]
ENTRY_POINTS = ("offload-chat", "offload-serve", "quantize.py", "profile_cache.py")
MODELS = ("demo", "--demo", "demo-dir", "converted-dir", "hf-dir", "hub-id-converted", "hub-id-offline",
          "missing-path", "file")
DEMO_NAMES = ("demo", "--demo", "demo-dir")
# The cases that must fail, with words their one error line must hold; every other case must work.
FAILS = {
    **{(entry, "hub-id-offline"): ("org/absent", "offline", "HF_HUB_OFFLINE") for entry in ENTRY_POINTS},
    **{(entry, "missing-path"): ("no-such-model", "does not exist") for entry in ENTRY_POINTS},
    **{(entry, "file"): ("config.json", "is a file", "directory") for entry in ENTRY_POINTS},
    ("quantize.py", "converted-dir"): ("already a pre-quantized checkpoint",),
    ("quantize.py", "hub-id-converted"): ("offline", "already in", "org--chat"),
}
WRONG_TYPES = ("qwen3_moe", "olmoe", "phimoe")  # Mixtral's config.json relabelled as another supported family


class World:
    """The models of the matrix, made once: a Hugging Face directory with a tokenizer and a chat template, its
    converted copies in the conversion cache of an offline Hugging Face home, a file, a missing path."""

    def __init__(self, root: Path, chat_dir: Path, tiny_dir: Path):
        self.root, self.hf_dir = root, chat_dir
        self.home = root / "hf"
        cache = self.home / "hub" / "offload_engine"  # where `offload-chat org/chat` converts it (convert/cache.py)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            # offload-chat and offload-serve convert with their CPU default ("cpu"); profile_cache.py with the
            # defaults (None): both copies are in the cache, as the commands would have left them.
            copies = {config: converted_dir("org/chat", load_config(config), cache) for config in ("cpu", None)}
            for config, path in copies.items():
                offload_engine.quantize_checkpoint(chat_dir, path, config, progress=False, device="cpu")
        finally:
            torch.set_num_threads(threads)
        self.converted = copies["cpu"]
        self.prompts = root / "prompts.txt"
        self.prompts.write_text("Hello there\n")
        self.wrong_types = {}
        for model_type in WRONG_TYPES:
            path = root / f"mixtral-as-{model_type}"
            shutil.copytree(tiny_dir, path)
            config = json.loads((path / "config.json").read_text())
            (path / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
            self.wrong_types[model_type] = path

    def env(self) -> dict:
        return {**{k: v for k, v in os.environ.items() if not k.startswith(("HF_", "OFFLOAD_ENGINE_DEBUG"))},
                "HF_HUB_OFFLINE": "1", "HF_HOME": str(self.home), "HF_HUB_CACHE": str(self.home / "hub"),
                "PYTHONPATH": str(REPO), "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"}

    def model_args(self, model: str) -> list[str]:
        return {"demo": ["demo"], "--demo": ["--demo"], "demo-dir": [str(DEMO_DIR)],
                "converted-dir": [str(self.converted)], "hf-dir": [str(self.hf_dir)],
                "hub-id-converted": ["org/chat"], "hub-id-offline": ["org/absent"],
                "missing-path": [str(self.root / "no-such-model")], "file": [str(self.hf_dir / "config.json")]}[model]

    def command(self, entry: str, model_args: list[str], case: str) -> list[str]:
        python = [sys.executable]
        if entry == "offload-chat":
            return [*python, "-m", "offload_engine.cli", *model_args, "--device", "cpu", "--prompt", "Hello",
                    "--max-new-tokens", "2", "--temperature", "0"]
        if entry == "offload-serve":
            return [*python, "-m", "offload_engine.server.cli", *model_args, "--device", "cpu", "--port", "0"]
        if entry == "quantize.py":
            return [*python, str(REPO / "scripts/quantize.py"), *model_args, str(self.output(case)), "--device",
                    "cpu", "--quiet"]
        return [*python, str(REPO / "scripts/profile_cache.py"), *model_args, "--device", "cpu", "--prompts",
                str(self.prompts), "--max-new-tokens", "2", "--threads", "1", "--quiet", "--out",
                str(self.output(case))]

    def output(self, case: str) -> Path:
        return self.root / "out" / case


def run(command: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)


def serve(command: list[str], env: dict) -> subprocess.CompletedProcess:
    """Start offload-serve on a free port, GET /health once it listens, then stop it with SIGTERM; -> the run, with
    the /health answer appended to stdout."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines, health = [], ""
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = process.stderr.readline()
            if not line:  # exited (an error, or it never started)
                break
            lines.append(line)
            listening = re.search(r"Uvicorn running on http://([\d.]+):(\d+)", line)
            if listening:
                with urllib.request.urlopen(f"http://{listening[1]}:{listening[2]}/health", timeout=60) as reply:
                    health = f"/health {reply.status} {reply.read().decode()}"
                break
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    return subprocess.CompletedProcess(command, process.returncode, f"{out}\n{health}", "".join(lines) + err)


@pytest.fixture(scope="module")
def world(tmp_path_factory, chat_dir, tiny_dir) -> World:
    return World(tmp_path_factory.mktemp("entry_points"), chat_dir, tiny_dir)


@pytest.fixture(scope="module")
def runs(request, world) -> dict[tuple[str, str], subprocess.CompletedProcess]:
    """Every selected case of this file, run side by side (3 at a time); keyed by (entry point, model)."""
    wanted = set()
    for item in request.session.items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if item.module is not request.module:
            continue
        if "entry" in params and "model" in params:
            wanted.add((params["entry"], params["model"]))
        elif "via" in params:
            wanted.add((params["via"], f"mixtral-as-{params['wrong_type']}"))
        elif item.originalname == "test_demo_is_one_set_up_everywhere":
            wanted.update((entry, name) for entry in ENTRY_POINTS for name in DEMO_NAMES)

    if importlib.util.find_spec("fastapi") is None:  # offload-serve needs the `serve` extra
        wanted = {case for case in wanted if case[0] != "offload-serve"}

    def job(entry: str, model: str) -> subprocess.CompletedProcess:
        args = ([str(world.wrong_types[model.removeprefix("mixtral-as-")])] if model.startswith("mixtral-as-")
                else world.model_args(model))
        command = world.command(entry, args, f"{entry}-{model}")
        return (serve if entry == "offload-serve" else run)(command, world.env())

    with ThreadPoolExecutor(3) as pool:
        futures = {case: pool.submit(job, *case) for case in sorted(wanted)}
        return {case: future.result() for case, future in futures.items()}


def one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (result.returncode,
                                                                                         result.stderr[-3000:])
    assert "Traceback" not in result.stderr
    return lines[0]


def assert_works(entry: str, result: subprocess.CompletedProcess, world: World, case: str) -> None:
    if entry == "offload-serve":  # stopped by SIGTERM after answering; uvicorn re-raises the signal
        assert "\n/health 200 " in result.stdout, result.stderr[-3000:]
        assert "loaded " in result.stderr and "error" not in result.stderr.lower()
        return
    assert result.returncode == 0, result.stderr[-3000:]
    if entry == "offload-chat":
        assert re.search(r"^\[\d+ tokens? in [\d.]+ s", result.stderr, re.M), result.stderr[-3000:]
    elif entry == "quantize.py":
        assert (world.output(case) / MANIFEST).exists() and f"wrote {world.output(case)}" in result.stdout
    else:
        report = json.loads(world.output(case).read_text())
        assert report["tokens"] >= 1 and report["per_layer"]
        assert f"report: {world.output(case)}\n" in result.stdout  # the path as given, absolute here


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_entry_point_works_or_says_why_in_one_line(runs, world, entry, model):
    if (entry, model) not in runs:
        pytest.skip("offload-serve needs the `serve` extra")
    result = runs[entry, model]
    if (entry, model) in FAILS:
        line = one_error_line(result)
        for words in FAILS[entry, model]:
            assert words in line, line
    else:
        assert_works(entry, result, world, f"{entry}-{model}")


def demo_set_up(entry: str, result: subprocess.CompletedProcess, world: World, case: str) -> dict:
    """(experts on device, prefetch, dtype, expert bits) as each entry point reports the set-up it ran."""
    if entry == "quantize.py":
        config = json.loads((world.output(case) / MANIFEST).read_text())["config"]
        return {"experts_on_device": config["offload"]["experts_on_device"], "prefetch": config["offload"]["prefetch"],
                "dtype": config["dtype"], "expert_bits": config["quant"]["experts"]["bits"]}
    if entry == "profile_cache.py":
        line = re.search(r"^config: (\d+) experts/layer on device, prefetch (\d+), policy \w+, experts (\d+)-bit "
                         r"g\d+, (\w+)$", result.stdout, re.M)
        k, prefetch, bits, dtype = line.groups()
    else:  # offload-chat's and offload-serve's summary line
        line = re.search(r"^loaded .*: cpu, (\w+); attention [\w-]+, experts (\d+)-bit; (\d+)/\d+ experts/layer on "
                         r"device .*, prefetch (\d+)/layer", result.stderr, re.M)
        dtype, bits, k, prefetch = line.groups()
    return {"experts_on_device": int(k), "prefetch": int(prefetch), "dtype": dtype, "expert_bits": int(bits)}


def test_demo_is_one_set_up_everywhere(runs, world, one_thread):
    """`demo`, --demo and the demo directory: the same set-up in all four entry points (issue 19, item 2)."""
    expected = demo_config(torch.device("cpu"))
    assert expected["offload"] == DEMO_OFFLOAD
    expected = {"experts_on_device": expected["offload"]["experts_on_device"],
                "prefetch": expected["offload"]["prefetch"], "dtype": expected["dtype"],
                "expert_bits": expected["quant"]["experts"]["bits"]}
    assert expected == {"experts_on_device": 4, "prefetch": 1, "dtype": "bfloat16", "expert_bits": 2}
    for entry in ENTRY_POINTS:
        for name in DEMO_NAMES:
            if (entry, name) not in runs:  # offload-serve without the `serve` extra
                continue
            result = runs[entry, name]
            assert_works(entry, result, world, f"{entry}-{name}")
            assert demo_set_up(entry, result, world, f"{entry}-{name}") == expected, (entry, name)
    loaded = offload_engine.load("demo", device="cpu", progress=False).config.to_dict()
    planned = load_config(demo_config(torch.device("cpu"))).to_dict()
    assert {key: loaded["offload"][key] for key in DEMO_OFFLOAD} == DEMO_OFFLOAD  # the rest: resolved at load
    assert {k: v for k, v in loaded.items() if k != "offload"} == {k: v for k, v in planned.items() if k != "offload"}


@pytest.mark.parametrize("via,wrong_type", [("quantize.py", "qwen3_moe"), ("offload-chat", "olmoe"),
                                            ("offload-chat", "phimoe")])
def test_wrong_model_type_is_one_line_naming_the_keys(runs, world, via, wrong_type):
    """Mixtral's config.json relabelled as another supported family: one line that names what does not fit
    (issue 19, item 5), not a TypeError from deep inside transformers."""
    line = one_error_line(runs[via, f"mixtral-as-{wrong_type}"])
    assert f"model_type '{wrong_type}'" in line and "head_dim must be a positive integer, got null" in line, line
    assert "MixtralForCausalLM" in line and "'mixtral'" in line
    if wrong_type == "qwen3_moe":
        assert "moe_intermediate_size is missing" in line


@pytest.mark.parametrize("wrong_type", WRONG_TYPES)
def test_load_refuses_a_wrong_model_type_naming_the_keys(world, wrong_type):
    with pytest.raises(offload_engine.CheckpointError, match="head_dim must be a positive integer, got null"):
        offload_engine.load(world.wrong_types[wrong_type], progress=False)


def test_a_family_row_needs_its_own_keys(tmp_path):
    """A config without the family's expert-size keys is refused by name, even when its architectures agree."""
    path = make_checkpoint(tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    del config["num_local_experts"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(offload_engine.CheckpointError, match=r"'mixtral' \(Mixtral\), but num_local_experts is "
                                                             r"missing"):
        offload_engine.load(path, progress=False)
