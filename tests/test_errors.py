"""User errors on the command line: one `error: ...` line, exit status 2, no traceback (unless --debug)."""

from __future__ import annotations

import builtins
import importlib.util
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import EXACT

import offload_engine
from offload_engine import cli
from offload_engine.errors import DEBUG_ENV

REPO = Path(__file__).resolve().parents[1]


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def profile_cache():
    return script("profile_cache")


@pytest.fixture(scope="module")
def simulate_cache():
    return script("simulate_cache")


def status_and_error(main, argv, capsys) -> tuple[int, str]:
    """Run a main(argv); argparse's own errors exit via SystemExit."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return code, lines[0]


@pytest.mark.parametrize("args, message", [
    (["--prefetch", "20"], "offload.prefetch is 20, but this model has 8 experts"),
    (["--experts-on-device", "0"], "offload.experts_on_device"),
    (["--policy", "mru"], "offload.policy must be one of"),
    (["--device", "tpu"], "'tpu' is not a device"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--num-random-prompts", "0"], "--num-random-prompts"),
    (["--prompt-tokens", "0"], "--prompt-tokens"),
    (["--prefetch", "x"], "--prefetch"),
    (["--config", "no-such.yaml"], "no-such.yaml"),
    (["--prompts", "no-such-prompts.txt"], "no-such-prompts.txt"),
    (["--max-new-tokens", "600"], "context window"),
])
def test_profile_cache_bad_arguments(profile_cache, tiny_dir, capsys, args, message):
    code, line = status_and_error(profile_cache.main, [str(tiny_dir), "--quiet", *args], capsys)
    assert code == 2 and message in line


def test_profile_cache_bad_prompt_file_and_model(profile_cache, tiny_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("1 2 3\n4 5 999\n")
    config = tmp_path / "quick.yaml"
    config.write_text("dtype: float32\nkernels: reference\nquant: {attention: {bits: null}, experts: {bits: null}}\n")
    code, line = status_and_error(profile_cache.main, [str(tiny_dir), "--quiet", "--prompts", str(prompts),
                                                       "--config", str(config)], capsys)
    assert code == 2 and "token id 999" in line and "prompts.txt" in line
    code, line = status_and_error(profile_cache.main, [str(tmp_path / "nothing")], capsys)
    assert code == 2 and "nothing" in line


def test_simulate_cache_missing_or_bad_trace(simulate_cache, tmp_path, capsys):
    code, line = status_and_error(simulate_cache.main, [str(tmp_path / "gone.npz")], capsys)
    assert code == 2 and "gone.npz" in line and "not found" in line
    bad = tmp_path / "bad.json"
    bad.write_text("not json")
    code, line = status_and_error(simulate_cache.main, [str(bad)], capsys)
    assert code == 2 and "bad.json" in line


def test_debug_flag_and_environment_show_the_traceback(simulate_cache, tmp_path, monkeypatch):
    with pytest.raises(Exception, match="not found"):
        simulate_cache.main([str(tmp_path / "gone.npz"), "--debug"])
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(Exception, match="not found"):
        simulate_cache.main([str(tmp_path / "gone.npz")])


def test_script_exit_status_as_a_process(tiny_dir):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    env.pop(DEBUG_ENV, None)
    done = subprocess.run([sys.executable, str(REPO / "scripts/profile_cache.py"), str(tiny_dir), "--quiet",
                           "--prefetch", "20"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: offload.prefetch is 20")


# ---- offload-chat ----
@pytest.fixture(scope="module")
def chat_config(tmp_path_factory) -> Path:
    import yaml

    path = tmp_path_factory.mktemp("cfg") / "exact.yaml"
    path.write_text(yaml.safe_dump({**EXACT, "offload": {"experts_on_device": 2, "prefetch": 1}}))
    return path


def test_chat_yaml_syntax_error(chat_dir, tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("offload:\n  experts_on_device: [2\n")
    code, line = status_and_error(cli.main, [str(chat_dir), "--config", str(broken), "--prompt", "hi"], capsys)
    assert code == 2 and "broken.yaml is not valid YAML" in line and "line" in line


@pytest.mark.parametrize("option, value", [("--temperature", "nan"), ("--top-p", "nan"),
                                           ("--repetition-penalty", "inf"), ("--seed", "99999999999999999999999")])
def test_chat_non_finite_sampling_options(chat_dir, chat_config, capsys, option, value):
    code, line = status_and_error(cli.main, [str(chat_dir), "--config", str(chat_config), "--prompt", "hi",
                                             option, value], capsys)
    assert code == 2 and option in line


def test_chat_debug_flag_shows_the_traceback(chat_dir, tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("offload: [\n")
    with pytest.raises(offload_engine.ConfigError):
        cli.main([str(chat_dir), "--config", str(broken), "--prompt", "hi", "--debug"])


def corrupt_header(src: Path, dst: Path, header_len: int) -> Path:
    shutil.copytree(src, dst)
    shard = dst / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[:8] = header_len.to_bytes(8, "little")
    shard.write_bytes(data)
    return dst


@pytest.mark.parametrize("header_len", [2**63, 2**64 - 1, 10**9, 0])
def test_corrupt_shard_header_names_the_file(tiny_dir, tmp_path, capsys, header_len):
    bad = corrupt_header(tiny_dir, tmp_path / "bad", header_len)
    with pytest.raises(offload_engine.CheckpointError, match=r"model.safetensors has a corrupt safetensors header"):
        offload_engine.load(bad, progress=False)
    code, line = status_and_error(cli.main, [str(bad), "--prompt", "hi"], capsys)
    assert code == 2 and str(bad / "model.safetensors") in line


# ---- chat: Ctrl-C at the prompt ----
def scripted_input(monkeypatch, actions: list) -> None:
    """input() plays `actions`: a string is typed, KeyboardInterrupt is Ctrl-C, EOFError is Ctrl-D."""
    queue = list(actions)

    def fake_input(prompt: str = "") -> str:
        action = queue.pop(0)
        if isinstance(action, type) and issubclass(action, BaseException):
            raise action()
        return action

    monkeypatch.setattr(builtins, "input", fake_input)


@pytest.fixture()
def terminal_chat(chat_dir):
    engine = offload_engine.load(chat_dir, {**EXACT, "offload": {"experts_on_device": 8, "prefetch": 0}},
                                 device="cpu", progress=False)
    out, err = io.StringIO(), io.StringIO()
    return cli.Chat(engine, engine.chat(), {"max_new_tokens": 4}, True, out, err), out, err


def test_one_ctrl_c_after_a_reply_keeps_the_conversation(terminal_chat, monkeypatch):
    chat, out, err = terminal_chat
    scripted_input(monkeypatch, ["hello", KeyboardInterrupt, "second message", "/exit"])
    assert chat.loop() == 0
    assert [m["role"] for m in chat.session.messages] == ["user", "assistant", "user", "assistant"]
    assert "Ctrl-C again to quit" in err.getvalue()


def test_two_ctrl_c_in_a_row_quit(terminal_chat, monkeypatch):
    chat, out, err = terminal_chat
    scripted_input(monkeypatch, [KeyboardInterrupt, "hello", KeyboardInterrupt, KeyboardInterrupt, "never read"])
    assert chat.loop() == 0
    assert len(chat.session.messages) == 2  # the message between the presses disarmed the first one


def test_ctrl_c_after_the_stream_ended_does_not_quit(terminal_chat, monkeypatch):
    chat, out, err = terminal_chat
    calls = []

    def interrupted_stats(*args) -> str:  # Ctrl-C lands while the stats line is being printed
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return "stats"

    monkeypatch.setattr(cli, "reply_stats", interrupted_stats)
    scripted_input(monkeypatch, ["hello", "again", EOFError])
    assert chat.loop() == 0
    assert len(chat.session.messages) == 4 and "conversation is kept" in err.getvalue()


def test_soak_script_short_run(chat_dir, capsys):
    """A short soak on a tiny chat model: valid, invalid and interrupted calls (ids, streams, chat turns); no crash,
    nothing accepted that should be refused, slots accounted for at rest, greedy tokens equal to a fresh engine's
    afterwards. Interrupts here land between forwards (sampler) or abandon streams; interrupts inside a forward
    (expert compute, cache copies) are the expert cache's own fault-injection tests."""
    soak = script("soak")
    code = soak.main([str(chat_dir), "--iterations", "150", "--check-every", "50", "--experts-on-device", "2",
                      "--prefetch", "1", "--hooks", "sample", "abandon", "--interrupt-rate", "0.3",
                      "--invalid-rate", "0.3", "--kernels", "reference"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "PASS" in out and "crashed 0" in out and "not_rejected 0" in out
