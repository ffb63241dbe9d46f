"""offload-serve (issue 12): the real server on a loopback port, driven by the official openai client and raw HTTP.

Expected answers come from the engine's own generate path on the same token ids and seed; the prompt encoding of
Mixtral-Instruct conversations is checked against mistral-common's encode_chat_completion."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import offload_engine  # noqa: E402
from offload_engine.chat import encode_chat  # noqa: E402
from offload_engine.server import BackgroundServer, create_app  # noqa: E402

from conftest import MIXTRAL_CHAT_TEMPLATE, exact_config, make_checkpoint, mixtral_tokenizer_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 30  # seconds, for every HTTP call
# The demo model unquantized in float32 (no HQQ time at load, exact arithmetic), half of each layer's experts
# offloaded with prefetch on, so that the cache metrics mean something.
DEMO_CONFIG = {**exact_config(experts_on_device=4, prefetch=1), "max_context": 512}
HELLO = [{"role": "user", "content": "Tell me about the history of the city."}]


def wait_until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def metric(server: BackgroundServer, name: str, labels: str = "") -> float:
    text = httpx.get(server.url + "/metrics", timeout=TIMEOUT).text
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


@pytest.fixture(scope="module")
def engine():
    return offload_engine.load("demo", config=DEMO_CONFIG, progress=False)


@pytest.fixture(scope="module")
def server(engine):
    with BackgroundServer(create_app(engine, model_name="demo", max_queue=16)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)


class Gate:
    """Holds the worker before each job joins the batch until opened, and records the order in which jobs joined."""

    def __init__(self, worker):
        self.worker, self.original, self.open, self.served = worker, worker._start, threading.Event(), []

    def __enter__(self):
        def start(job):
            self.served.append(tuple(job.ids))
            self.open.wait(TIMEOUT)
            self.original(job)

        self.worker._start = start
        return self

    def __exit__(self, *exc):
        self.open.set()
        self.worker._start = self.original


def expected(engine, ids: list[int], **sampling) -> tuple[str, int]:
    """Text and token count from the engine's own generate path."""
    out = engine.generate_ids(ids, **sampling)
    return engine.tokenizer.decode(out, skip_special_tokens=True), len(out)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["demo"]
    health = httpx.get(server.url + "/health", timeout=TIMEOUT).json()
    assert health["status"] == "ok" and health["waiting"] == 0


def test_chat_matches_the_engine_and_counts_usage(engine, client):
    ids = encode_chat(engine.tokenizer, HELLO)
    text, n = expected(engine, ids, max_new_tokens=24, temperature=0.9, top_p=0.95, seed=3)
    reply = client.chat.completions.create(model="demo", messages=HELLO, max_tokens=24, temperature=0.9, top_p=0.95,
                                           seed=3)
    assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == text and len(text) > 10
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (len(ids), n,
                                                                                                    len(ids) + n)
    assert reply.choices[0].finish_reason == ("length" if n == 24 else "stop")


@pytest.mark.parametrize("seed", [0, 5])
def test_streamed_chat_joins_to_the_non_streamed_text(client, seed):
    kwargs = dict(model="demo", messages=HELLO, max_completion_tokens=30, temperature=1.0, seed=seed)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces) == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_completions_stream_and_not(engine, server, client):
    ids = engine.encode("The history of the city")
    text, n = expected(engine, ids, max_new_tokens=20, temperature=0.0)
    whole = client.completions.create(model="demo", prompt="The history of the city", max_tokens=20, temperature=0)
    assert whole.choices[0].text == text and whole.usage.prompt_tokens == len(ids)
    assert whole.usage.completion_tokens == n
    # Raw SSE: every event is `data: {json}`, the last one `data: [DONE]`.
    body = {"model": "demo", "prompt": "The history of the city", "max_tokens": 20, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=TIMEOUT) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == text
    assert chunks[-1]["choices"][0]["finish_reason"] == whole.choices[0].finish_reason


def test_stop_strings_end_the_reply(client):
    full = client.completions.create(model="demo", prompt="The history of", max_tokens=30, temperature=0)
    text = full.choices[0].text
    stop = text[8:11]
    cut = client.completions.create(model="demo", prompt="The history of", max_tokens=30, temperature=0,
                                    stop=[stop, "zzzz"])
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_next_turn_reuses_the_kv_cache_and_matches_a_full_prefill(engine, server, client):
    first = client.chat.completions.create(model="demo", messages=HELLO, max_tokens=12, temperature=0)
    conversation = HELLO + [{"role": "assistant", "content": first.choices[0].message.content},
                            {"role": "user", "content": "And what happened next?"}]
    ids = encode_chat(engine.tokenizer, conversation)
    text, _ = expected(engine, ids, max_new_tokens=12, temperature=0.0)
    before = metric(server, "offload_prefix_reused_tokens_total")
    second = client.chat.completions.create(model="demo", messages=conversation, max_tokens=12, temperature=0)
    reused = metric(server, "offload_prefix_reused_tokens_total") - before
    assert reused >= first.usage.prompt_tokens, "the first turn's prompt must come from the cache"
    assert second.usage.prompt_tokens_details.cached_tokens == reused
    assert second.choices[0].message.content == text
    # The same request again does not extend the previous prompt: a fresh prefill, the same answer.
    again = client.chat.completions.create(model="demo", messages=conversation, max_tokens=12, temperature=0)
    assert metric(server, "offload_prefix_reused_tokens_total") - before == reused
    assert again.usage.prompt_tokens_details.cached_tokens == 0
    assert again.choices[0].message.content == text


def test_eight_concurrent_clients_are_answered_in_arrival_order(engine, server, client):
    prompts = [f"Story number {i} is about" for i in range(8)]
    answers = {p: expected(engine, engine.encode(p), max_new_tokens=8, temperature=0.0)[0] for p in prompts}
    results: dict[str, str] = {}
    worker = server.app.state.worker

    def ask(prompt: str) -> None:
        reply = client.completions.create(model="demo", prompt=prompt, max_tokens=8, temperature=0)
        results[prompt] = reply.choices[0].text

    with Gate(worker) as gate:
        threads = []
        for i, prompt in enumerate(prompts):  # one at a time, each queued before the next is sent
            threads.append(threading.Thread(target=ask, args=(prompt,)))
            threads[-1].start()
            wait_until(lambda: len(gate.served) + worker.depth() == i + 1, what=f"request {i} to arrive")
        assert httpx.get(server.url + "/health", timeout=TIMEOUT).json()["waiting"] == 7
        gate.open.set()
        for t in threads:
            t.join(TIMEOUT)
    assert gate.served == [tuple(engine.encode(p)) for p in prompts]
    assert results == answers


def test_queue_overflow_gives_429(engine):
    with BackgroundServer(create_app(engine, max_queue=1, max_batch=1)) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)
        worker, results = s.app.state.worker, []
        ask = lambda: results.append(client.completions.create(model="demo", prompt="Hi", max_tokens=2))  # noqa: E731
        with Gate(worker) as gate:
            running = threading.Thread(target=ask)
            running.start()
            wait_until(lambda: len(gate.served) == 1, what="the first request to run")
            waiting = threading.Thread(target=ask)
            waiting.start()
            wait_until(lambda: worker.depth() == 1, what="the second request to wait")
            with pytest.raises(openai.RateLimitError) as e:
                client.completions.create(model="demo", prompt="Hi", max_tokens=2)
            assert e.value.status_code == 429 and e.value.body["type"] == "rate_limit_error"
            assert "retry later" in e.value.body["message"]
            gate.open.set()
            running.join(TIMEOUT)
            waiting.join(TIMEOUT)
        assert len(results) == 2 and all(r.usage.completion_tokens >= 1 for r in results)
        assert metric(s, "offload_requests_total", '{endpoint="/v1/completions",status="429"}') == 1


def test_disconnect_mid_stream_stops_generation(server, client):
    stopped = metric(server, "offload_generations_stopped_by_disconnect_total")
    generated = metric(server, "offload_generated_tokens_total")
    stream = client.chat.completions.create(model="demo", messages=HELLO, max_tokens=400, temperature=1.0, seed=1,
                                            stream=True)
    received = [chunk for chunk, _ in zip(stream, range(4))]
    stream.close()
    assert len(received) == 4
    wait_until(lambda: metric(server, "offload_generations_stopped_by_disconnect_total") == stopped + 1,
               what="the disconnect counter")
    assert metric(server, "offload_generated_tokens_total") - generated < 400
    assert client.completions.create(model="demo", prompt="Hi", max_tokens=2).usage.completion_tokens >= 1


def test_disconnect_while_waiting_for_a_whole_answer_stops_it(server):
    stopped = metric(server, "offload_generations_stopped_by_disconnect_total")
    body = {"model": "demo", "prompt": "Once upon a time", "max_tokens": 480, "temperature": 1.0, "seed": 2}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(TIMEOUT, read=0.3))
    wait_until(lambda: metric(server, "offload_generations_stopped_by_disconnect_total") == stopped + 1,
               what="the disconnect counter")


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"])
    assert body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize("body, param", [
    ({"messages": HELLO, "temperature": 5}, "temperature"),
    ({"messages": HELLO, "temperature": "hot"}, "temperature"),
    ({"messages": HELLO, "top_p": 1.5}, "top_p"),
    ({"messages": HELLO, "max_tokens": 0}, "max_tokens"),
    ({"messages": HELLO, "n": 2}, "n"),
    ({"messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": HELLO, "presence_penalty": 0.5}, "presence_penalty"),
    ({"messages": HELLO, "logprobs": True}, "logprobs"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "messages"),
    ({}, "messages"),
])
def test_bad_parameters_get_400_with_an_openai_error(server, body, param):
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "demo", **body}, timeout=TIMEOUT)
    assert r.status_code == 400
    error = error_of(r)
    assert error["type"] == "invalid_request_error" and error["param"] == param


def test_malformed_json_and_context_overflow_get_400(server, client):
    r = httpx.post(server.url + "/v1/chat/completions", content=b'{"model": "demo", "messages": [',
                   headers={"content-type": "application/json"}, timeout=TIMEOUT)
    assert r.status_code == 400 and "not valid JSON" in error_of(r)["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="demo", messages=HELLO, max_tokens=510)
    assert "context window of 512 tokens" in e.value.body["message"]
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="context window"):
        client.completions.create(model="demo", prompt="word " * 600, max_tokens=1)
    # The server is still there.
    assert client.completions.create(model="demo", prompt="Hi", max_tokens=1).usage.completion_tokens == 1


def test_api_key(engine):
    with BackgroundServer(create_app(engine, api_key="s3cret")) as s:
        wrong = openai.OpenAI(base_url=s.url + "/v1", api_key="nope", max_retries=0, timeout=TIMEOUT)
        with pytest.raises(openai.AuthenticationError) as e:
            wrong.models.list()
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        # The key is checked before the body is read: even a malformed body gets 401.
        r = httpx.post(s.url + "/v1/completions", content=b"{", headers={"Authorization": "Bearer nope"},
                       timeout=TIMEOUT)
        assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key"
        right = openai.OpenAI(base_url=s.url + "/v1", api_key="s3cret", max_retries=0, timeout=TIMEOUT)
        assert right.completions.create(model="demo", prompt="Hi", max_tokens=1).usage.completion_tokens == 1
        assert httpx.get(s.url + "/health", timeout=TIMEOUT).status_code == 200


def test_metrics(server, client):
    client.completions.create(model="demo", prompt="Hi", max_tokens=3)
    text = httpx.get(server.url + "/metrics", timeout=TIMEOUT).text
    for name in ("offload_requests_total", "offload_generated_tokens_total", "offload_queue_depth",
                 "offload_time_to_first_token_seconds_bucket", "offload_time_per_output_token_seconds_bucket",
                 "offload_expert_cache_hit_rate", "offload_prefetch_precision", "offload_bytes_copied_total",
                 "offload_generations_stopped_by_disconnect_total"):
        assert re.search(rf"^{name}\b", text, re.M), name
    assert metric(server, "offload_requests_total", '{endpoint="/v1/completions",status="200"}') >= 1
    assert 0 < metric(server, "offload_expert_cache_hit_rate") < 1  # 4 of 8 experts offloaded: real misses
    assert metric(server, "offload_bytes_copied_total", '{direction="host_to_device"}') > 0


# ---- Mixtral-Instruct's prompt format ----
@pytest.fixture(scope="module")
def mixtral(tmp_path_factory, mixtral_tokenizer):
    """A tiny random model with Mixtral's 32000-token vocabulary, tokenizer and chat template; mistral-common's
    tokenizer for the same vocabulary."""
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    model_dir = make_checkpoint(tmp_path_factory.mktemp("mixtral") / "model", vocab_size=32000, hidden_size=32,
                                intermediate_size=64, num_hidden_layers=2, eos_token_id=2)
    mixtral_tokenizer.save_pretrained(model_dir)
    engine = offload_engine.load(model_dir, config=exact_config(experts_on_device=8), progress=False)
    engine.tokenizer.chat_template = MIXTRAL_CHAT_TEMPLATE  # what the hub's tokenizer_config.json holds
    return engine, MistralTokenizer.from_file(str(mixtral_tokenizer_model()))


CONVERSATIONS = [
    [{"role": "user", "content": "Hello, who are you?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke about Zürich."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name three rivers.\nOnly names."}],
]


def mistral_common_ids(tokenizer, messages) -> list[int]:
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    request = ChatCompletionRequest(messages=[kinds[m["role"]](content=m["content"]) for m in messages])
    return tokenizer.encode_chat_completion(request).tokens


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_mixtral_prompts_equal_mistral_common_token_for_token(mixtral, messages):
    engine, reference = mixtral
    ids = mistral_common_ids(reference, messages)
    assert encode_chat(engine.tokenizer, messages) == ids
    with BackgroundServer(create_app(engine, model_name="mixtral")) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)
        reply = client.chat.completions.create(model="mixtral", messages=messages, max_tokens=10, temperature=1.5,
                                               seed=4)
    text, n = expected(engine, ids, max_new_tokens=10, temperature=1.5, seed=4)
    assert reply.usage.prompt_tokens == len(ids) and reply.usage.completion_tokens == n
    assert reply.choices[0].message.content == text


# ---- the command and the optional extra ----
def test_offload_serve_command(tmp_path, monkeypatch):
    """`offload-serve --demo --api-key k` loads the model and serves it on 127.0.0.1:8000 with the key (uvicorn
    itself replaced by a loopback server on a free port, so that the test can talk to it and end it)."""
    from offload_engine.server import cli, runner

    config = tmp_path / "exact.yaml"
    config.write_text(json.dumps(DEMO_CONFIG))  # YAML is a superset of JSON; unquantized: no HQQ time at start
    seen = {}

    def serve(engine, host, port, **options):
        seen["bind"] = (host, port)
        with BackgroundServer(create_app(engine, **options)) as s:
            headers = {"Authorization": "Bearer k"}
            seen["models"] = httpx.get(s.url + "/v1/models", headers=headers, timeout=TIMEOUT).json()
            seen["without key"] = httpx.get(s.url + "/v1/models", timeout=TIMEOUT).status_code

    monkeypatch.setattr(runner, "serve", serve)
    assert cli.main(["--demo", "--api-key", "k", "--config", str(config)]) == 0
    assert seen == {"bind": ("127.0.0.1", 8000), "models": {"object": "list", "data": [
        {"id": "demo", "object": "model", "created": 0, "owned_by": "offload_engine", "max_model_len": 512}]},
        "without key": 401}


def test_command_line_errors_are_one_line(capsys):
    from offload_engine.server.cli import main

    assert main(["--demo", "--max-queue", "-1"]) == 2
    assert capsys.readouterr().err == "error: --max-queue must be >= 0, got -1\n"


def test_package_imports_without_the_serve_extra():
    """Without FastAPI the package imports, and offload-serve says in one line what to install."""
    code = ("import sys; sys.modules['fastapi'] = None\n"
            "import offload_engine, offload_engine.server, offload_engine.server.cli\n"
            "sys.exit(offload_engine.server.cli.main(['--demo']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: the server needs the `serve` extra") and proc.stderr.count("\n") == 1
