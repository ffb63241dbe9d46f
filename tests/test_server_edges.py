"""offload-serve's edge cases (issue 19, item 6): text that is not valid Unicode, subnormal temperatures, too many
stop strings, an unknown model name, and shutdown with requests waiting (the real command, sent SIGTERM)."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import offload_engine  # noqa: E402
from offload_engine.generate import SamplingParams  # noqa: E402
from offload_engine.server import BackgroundServer, create_app  # noqa: E402

from test_server import DEMO_CONFIG, HELLO, REPO, TIMEOUT, error_of, metric, wait_until  # noqa: E402


@pytest.fixture(scope="module")
def engine():
    return offload_engine.load("demo", config=DEMO_CONFIG, progress=False)


@pytest.fixture(scope="module")
def server(engine):
    with BackgroundServer(create_app(engine, model_name="demo")) as s:
        yield s


class Errors(logging.Handler):
    """Records what uvicorn logs at ERROR (a traceback of an unhandled exception)."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def logged_errors():
    handler, logger = Errors(), logging.getLogger("uvicorn.error")
    logger.addHandler(handler)
    yield handler.records
    logger.removeHandler(handler)


# ---- bad input ----
SURROGATE = '"x \\ud800 y"'  # JSON for a lone high surrogate: parses to a str that is not valid Unicode


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", '{"model": "demo", "prompt": %s, "max_tokens": 2}', "prompt"),
    ("/v1/completions", '{"model": "demo", "prompt": [%s], "max_tokens": 2}', "prompt"),
    ("/v1/completions", '{"model": "demo", "prompt": "Hi", "stop": [%s], "max_tokens": 2}', "stop"),
    ("/v1/chat/completions", '{"model": "demo", "messages": [{"role": "user", "content": %s}]}', "messages.0.content"),
    ("/v1/chat/completions", '{"model": "demo", "messages": [{"role": "user", "content": [{"type": "text", '
                             '"text": %s}]}]}', "messages.0.content"),
])
def test_a_lone_surrogate_gets_400_on_a_connection_that_stays_open(server, logged_errors, path, body, param):
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as client:
        r = client.post(path, content=(body % SURROGATE).encode(), headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        error = error_of(r)
        assert error["param"] == param and "lone UTF-16 surrogate" in error["message"]
        assert r.headers.get("connection") != "close"  # keep-alive: the next request goes on the same connection
        ok = client.post("/v1/completions", json={"model": "demo", "prompt": "Hi", "max_tokens": 1})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 1
    assert not logged_errors, [r.getMessage() for r in logged_errors]


@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 1e-6])
def test_a_tiny_temperature_is_greedy_in_the_api_and_the_server(engine, server, temperature):
    assert SamplingParams(temperature=temperature).temperature == 0.0
    assert SamplingParams(temperature=1e-5).temperature == 1e-5  # from GREEDY_BELOW on, it samples
    ids = engine.encode("The history of the city")
    greedy = engine.generate_ids(ids, max_new_tokens=12)
    assert engine.generate_ids(ids, max_new_tokens=12, temperature=temperature, seed=3) == greedy
    r = httpx.post(server.url + "/v1/completions", json={"model": "demo", "prompt": ids, "max_tokens": 12,
                                                        "temperature": temperature}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == engine.tokenizer.decode(greedy, skip_special_tokens=True)


def test_five_stop_strings_say_at_most_four(server):
    r = httpx.post(server.url + "/v1/chat/completions", timeout=TIMEOUT,
                   json={"model": "demo", "messages": HELLO, "stop": ["a", "b", "c", "d", "e"]})
    assert r.status_code == 400
    error = error_of(r)
    assert error["param"] == "stop" and error["message"] == "stop: at most 4 stop strings are allowed, got 5"


@pytest.mark.parametrize("stream", [False, True])
def test_an_unknown_model_is_404_model_not_found(server, stream):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=2, stream=stream)
    assert e.value.status_code == 404
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    assert e.value.body["type"] == "invalid_request_error" and "'demo'" in e.value.body["message"]
    r = httpx.post(server.url + "/v1/completions", json={"model": "demo-2", "prompt": "Hi"}, timeout=TIMEOUT)
    assert r.status_code == 404 and error_of(r)["code"] == "model_not_found"
    # The served name, or none at all, is fine.
    assert client.completions.create(model="demo", prompt="Hi", max_tokens=1).usage.completion_tokens == 1
    assert httpx.post(server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 1},
                      timeout=TIMEOUT).status_code == 200


# ---- /metrics ----
def test_metrics_prefetch_precision_is_its_parts(engine, server):
    """The gauge is guesses used / guesses, both exported, and agrees with Engine.stats() (one definition)."""
    httpx.post(server.url + "/v1/completions", json={"prompt": "The history of", "max_tokens": 8},
               timeout=TIMEOUT).raise_for_status()
    precision, guesses = metric(server, "offload_prefetch_precision"), metric(server, "offload_prefetch_guesses_total")
    used = metric(server, "offload_prefetch_guesses_used_total")
    overall = engine.stats()["overall"]
    assert guesses > 0 and (used, guesses) == (overall["guessed_correct"], overall["guessed"])
    assert precision == pytest.approx(used / guesses) == overall["prefetch_precision"]
    copies = {outcome: metric(server, "offload_prefetch_copies_total", f'{{outcome="{outcome}"}}')
              for outcome in ("issued", "used", "wasted")}
    assert copies == {o: overall[f"prefetch_{o}"] for o in copies} and copies["issued"] > 0
    assert metric(server, "offload_expert_cache_hit_rate") == pytest.approx(
        metric(server, "offload_expert_cache_hits_total") / metric(server, "offload_expert_cache_lookups_total"))


# ---- shutdown ----
def sse_lines(response: httpx.Response) -> list[str]:
    return [line for line in response.iter_lines() if line]


def post(results: dict, key: str, url: str, body: dict) -> threading.Thread:
    """POST `body` in a thread; results[key] = (status, content type, body lines)."""
    def run():
        with httpx.stream("POST", url, json=body, timeout=120) as r:
            results[key] = (r.status_code, r.headers.get("content-type", ""), sse_lines(r))

    thread = threading.Thread(target=run)
    thread.start()
    return thread


class StepGate:
    """Holds the worker inside its first batch step (after the running job started) until the gate opens: the worker
    takes no other job meanwhile, so later requests wait in the FIFO."""

    def __init__(self, worker):
        self.worker, self.original, self.open, self.entered = worker, worker._step, threading.Event(), threading.Event()

    def __enter__(self):
        def step():
            self.entered.set()
            self.open.wait(TIMEOUT)
            self.original()

        self.worker._step = step
        return self

    def __exit__(self, *exc):
        self.open.set()
        self.worker._step = self.original


def test_shutdown_stops_the_running_request_after_the_grace_period_with_an_error_event(engine):
    """In-process (BackgroundServer.stop is uvicorn's shutdown too): the worker is held on the running stream,
    so that the 1 s grace period surely runs out; the waiting requests are answered 503 at once."""
    server = BackgroundServer(create_app(engine, model_name="demo"), grace_s=1.0).start()
    worker, results = server.app.state.worker, {}
    url = server.url + "/v1/completions"
    body = {"model": "demo", "prompt": "Once upon a time", "max_tokens": 400, "temperature": 1.0, "seed": 1}
    with StepGate(worker) as gate:
        threads = [post(results, "running", url, {**body, "stream": True})]
        assert gate.entered.wait(TIMEOUT), "the first request never ran"
        threads.append(post(results, "waiting", url, body))
        threads.append(post(results, "waiting stream", url, {**body, "stream": True}))
        wait_until(lambda: worker.depth() == 2, what="two requests to wait")
        stopping = threading.Thread(target=server.stop)
        stopping.start()
        for key in ("waiting", "waiting stream"):
            threads[["running", "waiting", "waiting stream"].index(key)].join(TIMEOUT)
            status, kind, lines = results[key]
            assert (status, kind) == (503, "application/json"), key
            assert json.loads("".join(lines))["error"]["code"] == "server_shutting_down"
        wait_until(lambda: worker.running and all(r.job.cancelled.is_set() for r in worker.running), timeout=5,
                   what="the grace period to end")
    threads[0].join(TIMEOUT)
    stopping.join(TIMEOUT)
    status, kind, lines = results["running"]
    assert status == 200 and kind.startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2].removeprefix("data: "))["error"]["code"] == "server_shutting_down"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_finishes_the_running_request_and_answers_the_waiting_ones_503(tmp_path):
    """`offload-serve --demo` as a user runs it, sent SIGTERM while one stream runs and two requests wait."""
    config = tmp_path / "exact.yaml"
    config.write_text(json.dumps(DEMO_CONFIG))  # unquantized float32: no HQQ time at start
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "OFFLOAD_SERVE_GRACE_S": "120"}  # a loaded machine must not turn the running reply into a timeout
    proc = subprocess.Popen([sys.executable, "-m", "offload_engine.server.cli", "--demo", "--config", str(config),
                             "--port", str(port), "--max-batch", "1"],  # one runs, the others wait
                            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            assert proc.poll() is None, proc.stdout.read()
            try:
                return httpx.get(url + "/health", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(up, timeout=180, what="offload-serve to start")
        # The running reply must outlast queuing two requests behind it: about 3 s at this machine's speed now.
        started = time.perf_counter()
        httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 16, "temperature": 1.0, "seed": 0},
                   timeout=TIMEOUT).raise_for_status()
        tokens = min(max(int(3 * 16 / (time.perf_counter() - started)), 24), 400)
        results: dict = {}
        running = {"model": "demo", "prompt": "Once upon a time", "max_tokens": tokens, "temperature": 1.0,
                   "seed": 1, "stream": True, "stream_options": {"include_usage": True}}
        threads = [post(results, "running", url + "/v1/completions", running)]
        wait_until(lambda: httpx.get(url + "/health", timeout=TIMEOUT).json()["running"], what="the stream to run")
        threads.append(post(results, "waiting", url + "/v1/completions",
                            {"model": "demo", "prompt": "Hello", "max_tokens": 8}))
        threads.append(post(results, "waiting stream", url + "/v1/chat/completions",
                            {"model": "demo", "messages": HELLO, "max_tokens": 8, "stream": True}))
        wait_until(lambda: httpx.get(url + "/health", timeout=TIMEOUT).json()["waiting"] == 2,
                   what="two requests to wait")
        proc.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(150)
        output = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode in (0, -signal.SIGTERM), output
    assert "Traceback" not in output, output
    status, kind, lines = results["running"]
    assert status == 200 and lines[-1] == "data: [DONE]", lines[-3:]
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert not any("error" in c for c in chunks), "the running reply must not be cut off"
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1]
    assert finish in ("length", "stop") and 1 <= chunks[-1]["usage"]["completion_tokens"] <= tokens
    for key in ("waiting", "waiting stream"):
        status, kind, lines = results[key]
        assert (status, kind) == (503, "application/json"), (key, lines)
        error = json.loads("".join(lines))["error"]
        assert error["code"] == "server_shutting_down" and "shutting down" in error["message"]
