"""The `offload-chat` CLI driven as a subprocess, as a person or a script would run it, on a tiny local chat model
(a random Mixtral-architecture checkpoint plus a small byte-level BPE tokenizer with an `[INST]` chat template)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from offload_engine import checkpoint, cli

import paced_chat
from conftest import make_checkpoint

REPO = Path(__file__).resolve().parents[1]
PROMPT = ">>> "
# The per-reply line the CLI prints on stderr (format documented in offload_engine/cli.py).
STATS = re.compile(r"^\[(\d+) tokens in ([\d.]+) s, ([\d.]+) tok/s, expert cache hit rate ([\d.]+)% \(this reply\), "
                   r"prefetch precision ([\d.]+)% \((\d+) of (\d+) guesses used\)\]$", re.MULTILINE)
# /stats's prefetch line: the precision and recall with their parts.
STATS_PREFETCH = re.compile(r"^  prefetch precision ([\d.]+)% \((\d+) of (\d+) guesses used\), recall ([\d.]+)% "
                            r"\((\d+) of (\d+) experts used were guessed\)$", re.MULTILINE)
NUM_LAYERS = 3  # tiny_config's

# Mixtral-Instruct's format: "<s>[INST] user [/INST] reply</s>[INST] ..."; a system message joins the first turn.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='') %}{{ bos_token }}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'system' %}{%- set ns.system = m['content'] + '\\n\\n' %}"
    "{%- elif m['role'] == 'user' %}{{ '[INST] ' + ns.system + m['content'] + ' [/INST]' }}{%- set ns.system = '' %}"
    "{%- else %}{{ ' ' + m['content'] + eos_token }}{%- endif %}"
    "{%- endfor %}")
CORPUS = ["hello there, how are you today?", "the quick brown fox jumps over the lazy dog.",
          "experts are offloaded to host memory and cached on the device.", "what is a mixture of experts?"]
# 2 of 8 experts resident per layer and prefetch on: the cache really swaps and speculates. No quantization:
# HQQ's optimizer would cost seconds per CLI start, and quantization is not what these tests are about.
CONFIG_YAML = """dtype: float32
max_context: 512
quant:
  attention: {bits: null}
  experts: {bits: null}
offload:
  experts_on_device: 2
  prefetch: 1
"""


def chat_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"],
                                                        show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   chat_template=CHAT_TEMPLATE)


def silence_special_tokens(model) -> None:
    """Zero logits for <unk>, <s>, </s>: a random model then never ends early nor emits only invisible tokens,
    so the replies are visible text of a predictable length."""
    with torch.no_grad():
        model.lm_head.weight[:3] = 0


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> tuple[Path, Path]:
    """(model directory, config YAML)."""
    root = tmp_path_factory.mktemp("cli")
    tokenizer = chat_tokenizer()
    model_dir = make_checkpoint(root / "model", vocab_size=len(tokenizer), eos_token_id=2,
                                edit=silence_special_tokens)
    tokenizer.save_pretrained(model_dir)
    config = root / "tiny.yaml"
    config.write_text(CONFIG_YAML)
    return model_dir, config


def cli_env() -> dict:
    # One thread each: several CLIs run side by side, and a tiny model gains nothing from more.
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "PYTHONIOENCODING": "utf-8",
            "OMP_NUM_THREADS": "1"}


def cli_command(*args) -> list[str]:
    return [sys.executable, "-m", "offload_engine.cli", *map(str, args)]


def model_args(chat_model, *extra: str) -> list[str]:
    model_dir, config = chat_model
    return [str(model_dir), "--config", str(config), "--max-new-tokens", "8", "--temperature", "0", *extra]


@pytest.fixture(scope="module")
def runs(chat_model, tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Every non-interactive CLI run of this file, started side by side: each is mostly interpreter start-up
    (importing torch and transformers takes seconds), so on 2 cores this about halves the file's wall time."""
    model_dir, _ = chat_model
    plan = {
        # "hello" again after /reset must get exactly the first reply (greedy): the conversation was really cleared.
        "chat": (model_args(chat_model), "hello\nhow are you\n/stats\n/reset\nhello\n/exit\n"),
        "prompt": (model_args(chat_model, "--prompt", "hello"), ""),
        "missing_model": ([tmp_path_factory.mktemp("empty") / "no-such-model", "--prompt", "hi"], ""),
        "unknown_config": ([model_dir, "--config", "no-such-gpu", "--prompt", "hi"], ""),
    }

    def run(args: list, stdin: str) -> subprocess.CompletedProcess:
        return subprocess.run(cli_command(*args), input=stdin, capture_output=True, text=True, timeout=240,
                              env=cli_env(), cwd=REPO, check=False)

    with ThreadPoolExecutor(len(plan)) as pool:
        futures = {name: pool.submit(run, *job) for name, job in plan.items()}
        return {name: future.result() for name, future in futures.items()}


def test_two_turn_chat_with_commands(runs):
    result = runs["chat"]
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    segments = result.stdout.split(PROMPT)  # what follows each prompt: a reply or a command's output
    assert len(segments) == 7, result.stdout
    first, second, stats, reset, after_reset = segments[1:6]
    assert first.strip() and second.strip() and first != second
    assert reset.strip() == "(conversation cleared)"
    assert after_reset == first

    lines = STATS.findall(result.stderr)
    assert len(lines) == 3, result.stderr
    for tokens, seconds, rate, hit_rate, precision, used, guesses in lines:
        assert 1 <= int(tokens) <= 8
        assert float(rate) > 0 and 0 <= float(hit_rate) <= 100
        assert 0 < int(guesses) and float(precision) == round(100 * int(used) / int(guesses), 1)  # what it says it is
    # /stats: overall counters and one hit rate per layer; the precision with its parts, as in the stats lines.
    assert "expert cache since loading:" in stats and "prefetch 1/layer" in stats
    (precision, used, guesses, recall, right, needed), = STATS_PREFETCH.findall(stats)
    assert float(precision) == round(100 * int(used) / int(guesses), 1) and right == used
    assert float(recall) == round(100 * int(right) / int(needed), 1)
    assert int(guesses) == sum(int(g) for *_, g in lines[:2])  # /stats came after the first two replies
    per_layer = stats.split("hit rate by layer:")[1]
    assert len(re.findall(r"\d+\.\d%", per_layer)) == NUM_LAYERS
    # Loading: progress bar and the one-line summary.
    assert "quantizing layers" in result.stderr
    assert "loaded " in result.stderr and "2/8 experts/layer on device" in result.stderr
    assert "kernels " in result.stderr  # which quantized matmuls run (fused or reference)


def test_prompt_mode_answers_once_for_scripts(runs):
    result = runs["prompt"]
    assert result.returncode == 0, result.stderr
    # stdout is the answer alone (the interactive first reply: greedy); everything else is on stderr.
    assert result.stdout.strip()
    assert result.stdout == runs["chat"].stdout.split(PROMPT)[1]
    assert len(STATS.findall(result.stderr)) == 1


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_missing_model_is_a_one_line_error(runs):
    assert "does not exist" in one_error_line(runs["missing_model"])


def test_unknown_config_is_a_one_line_error(runs):
    line = one_error_line(runs["unknown_config"])
    assert "no-such-gpu" in line and "packaged configs" in line and "t4-16gb" in line


class LiveCli:
    """A running interactive CLI whose stdout/stderr are collected by threads, so that a test can wait for text."""

    def __init__(self, args: list[str], command: list[str] | None = None):
        self.proc = subprocess.Popen([*(command or cli_command()), *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(), cwd=REPO)
        self.text = {"stdout": "", "stderr": ""}
        self.threads = [threading.Thread(target=self._collect, args=(name,), daemon=True) for name in self.text]
        for t in self.threads:
            t.start()

    def _collect(self, name: str) -> None:
        stream = getattr(self.proc, name)
        while chunk := os.read(stream.fileno(), 4096):
            self.text[name] += chunk.decode("utf-8", errors="replace")

    def wait_for(self, name: str, condition, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not condition(self.text[name]):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"gave up waiting on {name}; stdout={self.text['stdout']!r} "
                                     f"stderr={self.text['stderr']!r}")
            time.sleep(0.01)

    def send(self, text: str) -> None:
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def finish(self, timeout: float = 60) -> int:
        code = self.proc.wait(timeout)
        for t in self.threads:
            t.join(5)
        return code


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT cannot be sent to a console child on Windows")
def test_ctrl_c_stops_the_reply_not_the_program(chat_model):
    model_dir, config = chat_model
    # tests/paced_chat.py runs the CLI with each reply paused in the middle of a decode step until SIGINT: the
    # Ctrl-C lands while the reply is being generated however fast the machine is.
    live = LiveCli([str(model_dir), "--config", str(config), "--max-new-tokens", "400", "--seed", "0"],
                   command=[sys.executable, str(REPO / "tests" / "paced_chat.py")])
    try:
        for turn in (1, 2):  # a second reply after an interrupted one: the session is still usable
            live.wait_for("stdout", lambda out, turn=turn: out.count(PROMPT) == turn)
            live.send("hello\n")
            live.wait_for("stderr", lambda err, turn=turn: err.count(paced_chat.PAUSED) == turn)
            live.proc.send_signal(signal.SIGINT)
            live.wait_for("stderr", lambda err, turn=turn: err.count("(stopped by Ctrl-C") == turn)
        # Ctrl-C at the prompt (e.g. meant for a reply that had just ended) only asks; two in a row quit.
        live.wait_for("stdout", lambda out: out.count(PROMPT) == 3)
        live.proc.send_signal(signal.SIGINT)
        live.wait_for("stderr", lambda err: "Ctrl-C again to quit" in err)
        live.send("/stats\n")
        live.wait_for("stdout", lambda out: "hit rate by layer:" in out and out.count(PROMPT) == 5)
        live.proc.send_signal(signal.SIGINT)
        live.wait_for("stderr", lambda err: err.count("Ctrl-C again to quit") == 2)
        live.wait_for("stdout", lambda out: out.count(PROMPT) == 6)
        live.proc.send_signal(signal.SIGINT)
        assert live.finish() == 0, live.text["stderr"]
    finally:
        if live.proc.poll() is None:
            live.proc.kill()
    assert "Traceback" not in live.text["stderr"]
    stopped = STATS.findall(live.text["stderr"])
    # Each reply stopped during its PAUSE_AT_STEP-th forward pass: the tokens of the passes before it were shown.
    assert [int(tokens) for tokens, *_ in stopped] == [paced_chat.PAUSE_AT_STEP - 1] * 2
    assert all(out.strip() for out in live.text["stdout"].split(PROMPT)[1:3])  # each partial reply was printed
    assert "hit rate by layer:" in live.text["stdout"]  # /stats ran after the interrupts


# ---- in-process checks of the option handling (no subprocess: these fail before or right after loading) ----

def test_model_without_chat_template_is_a_clear_error(chat_model, tiny_dir, capsys):
    assert cli.main([str(tiny_dir), "--config", str(chat_model[1]), "--prompt", "hi", "--max-new-tokens", "8"]) == 2
    assert "chat needs a tokenizer" in capsys.readouterr().err


@pytest.mark.parametrize("option, message", [(["--max-new-tokens", "600"], "leaves no room"),
                                             (["--top-p", "1.5"], "--top-p"),
                                             (["--max-new-tokens", "0"], "--max-new-tokens")])
def test_bad_sampling_options_fail_before_loading(chat_model, capsys, option, message):
    model_dir, config = chat_model
    assert cli.main([str(model_dir), "--config", str(config), "--prompt", "hi", *option]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "loading" not in err


def test_no_stats_prints_no_stats_line(chat_model, capsys):
    assert cli.main(model_args(chat_model, "--prompt", "hello", "--no-stats")) == 0
    out, err = capsys.readouterr()
    assert out.strip() and not STATS.findall(err) and "tok/s" not in err


def test_stats_line_when_every_expert_is_resident(chat_model, tmp_path, capsys):
    config = tmp_path / "resident.yaml"
    config.write_text(CONFIG_YAML.replace("experts_on_device: 2", "experts_on_device: 8"))
    assert cli.main([str(chat_model[0]), "--config", str(config), "--max-new-tokens", "4", "--prompt", "hi"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"^\[\d+ tokens in [\d.]+ s, [\d.]+ tok/s, all experts on device, prefetch off\]$", err, re.M)


def test_missing_demo_model_says_how_to_get_it(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(checkpoint, "DEMO_DIR", tmp_path / "demo")
    assert cli.main(["--demo", "--prompt", "hi"]) == 2
    assert "train_demo_model.py" in capsys.readouterr().err


def test_default_reply_budget_fits_a_short_context_window():
    assert cli.fit_max_new_tokens(None, 4096) == (512, None)
    budget, note = cli.fit_max_new_tokens(None, 512)
    assert budget == 256 and "256" in note
    assert cli.fit_max_new_tokens(100, 512) == (100, None)
    with pytest.raises(cli.UsageError, match="leaves no room"):
        cli.fit_max_new_tokens(512, 512)
