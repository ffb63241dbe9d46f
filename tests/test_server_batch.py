"""offload-serve's continuous batching (issue 22): concurrent clients share each step and each gets the reply it
would get alone; a disconnect frees its slot at the next step; a failing step fails only its own requests."""

from __future__ import annotations

import asyncio
import threading

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import offload_engine  # noqa: E402
import offload_engine.model as model_module  # noqa: E402
from offload_engine.server import BackgroundServer, create_app  # noqa: E402
from offload_engine.server.app import Outbox  # noqa: E402
from offload_engine.server.worker import Job, Piece  # noqa: E402

from test_server import DEMO_CONFIG, TIMEOUT, Gate, expected, metric, wait_until  # noqa: E402

PROMPTS = [f"Story number {i} is about" for i in range(8)]


@pytest.fixture(scope="module")
def engine():
    return offload_engine.load("demo", config=DEMO_CONFIG, progress=False)


def client_of(server: BackgroundServer):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)


def stream_chat(client, prompt: str, max_tokens: int, out: dict, key) -> None:
    try:
        stream = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": prompt}],
                                                max_tokens=max_tokens, temperature=0, stream=True)
        out[key] = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    except openai.APIError as e:
        out[key] = e


def chat_ids(engine, prompt: str) -> list[int]:
    from offload_engine.chat import encode_chat

    return encode_chat(engine.tokenizer, [{"role": "user", "content": prompt}])


def test_eight_concurrent_streaming_clients_get_their_own_replies_in_one_batch(engine):
    answers = {p: expected(engine, chat_ids(engine, p), max_new_tokens=12, temperature=0.0)[0] for p in PROMPTS}
    with BackgroundServer(create_app(engine, model_name="demo", max_batch=8)) as server:
        client, results = client_of(server), {}
        worker = server.app.state.worker
        with Gate(worker) as gate:  # the first request is held until all eight have arrived, then all join at once
            threads = [threading.Thread(target=stream_chat, args=(client, p, 12, results, p)) for p in PROMPTS]
            for t in threads:
                t.start()
            wait_until(lambda: worker.depth() + worker.batch_size() == 8, what="all eight requests to arrive")
            gate.open.set()
            for t in threads:
                t.join(TIMEOUT)
        assert results == answers
        steps = metric(server, "offload_batch_size_count")
        assert steps and metric(server, "offload_batch_size_sum") / steps > 4, "the requests must share steps"
        assert metric(server, "offload_batch_size_bucket", '{le="8.0"}') == steps


def test_a_disconnect_frees_its_slot_at_the_next_step(engine):
    # A request that runs to max_tokens (no EOS): it occupies its slot throughout.
    ids = chat_ids(engine, PROMPTS[1])
    seed = next(s for s in range(50) if len(engine.generate_ids(ids, max_new_tokens=120, temperature=1.0, seed=s))
                == 120)
    with BackgroundServer(create_app(engine, model_name="demo", max_batch=2)) as server:
        client, results = client_of(server), {}
        worker = server.app.state.worker

        def open_stream(prompt: str, **options):
            stream = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": prompt}],
                                                    stream=True, temperature=1.0, **options)
            return stream, [chunk for chunk, _ in zip(stream, range(3))]

        leaving, _ = open_stream(PROMPTS[0], max_tokens=400, seed=1)
        staying, _ = open_stream(PROMPTS[1], max_tokens=120, seed=seed)
        waiting = threading.Thread(target=stream_chat, args=(client, PROMPTS[2], 6, results, "waiting"))
        waiting.start()
        wait_until(lambda: worker.depth() == 1, what="the third request to wait for a slot")
        leaving.close()  # its slot goes to the waiting request at the next step
        waiting.join(TIMEOUT)
        assert results["waiting"] == expected(engine, chat_ids(engine, PROMPTS[2]), max_new_tokens=6,
                                              temperature=0.0)[0]
        assert worker.batch_size() == 1, "the other request is still running: it was the disconnect that made room"
        staying.close()
        wait_until(lambda: metric(server, "offload_generations_stopped_by_disconnect_total") == 2,
                   what="both disconnects to be counted")
        wait_until(lambda: worker.batch_size() == 0, what="the batch to empty")


@pytest.mark.parametrize("fault", [RuntimeError("CUDA out of memory (injected)"), KeyboardInterrupt()])
def test_a_failing_step_fails_only_its_requests_and_the_server_stays_exact(engine, monkeypatch, fault):
    """Two requests run (max_batch 2) when an expert fails mid-step: both get an error, the one waiting behind them
    and every later request get exactly the replies they get alone."""
    answers = {p: expected(engine, chat_ids(engine, p), max_new_tokens=10, temperature=0.0) for p in PROMPTS}
    prompts = [p for p in PROMPTS if answers[p][1] == 10][:4]  # replies that run to max_tokens (no early EOS)
    assert len(prompts) == 4
    answers = {p: answers[p][0] for p in prompts}
    fired, original = [], model_module.expert_forward
    worker = None

    def failing(*args, **kwargs):
        running = list(worker.running)
        if not fired and len(running) == 2 and all(len(r.sequence.tokens) >= 3 for r in running):
            fired.append(True)  # mid-step, both running requests decoding
            raise fault
        return original(*args, **kwargs)

    with BackgroundServer(create_app(engine, model_name="demo", max_batch=2)) as server:
        client, results = client_of(server), {}
        worker = server.app.state.worker
        with Gate(worker) as gate:
            threads = [threading.Thread(target=stream_chat, args=(client, p, 10, results, p)) for p in prompts[:3]]
            for t in threads:
                t.start()
            wait_until(lambda: worker.depth() + worker.batch_size() == 3, what="three requests to arrive")
            monkeypatch.setattr(model_module, "expert_forward", failing)
            gate.open.set()
            for t in threads:
                t.join(TIMEOUT)
        monkeypatch.setattr(model_module, "expert_forward", original)
        assert fired
        failed = [p for p in prompts[:3] if isinstance(results[p], openai.APIError)]
        assert len(failed) == 2 and all("generation failed" in str(results[p]) for p in failed)  # the step's two
        waited = next(p for p in prompts[:3] if p not in failed)
        assert results[waited] == answers[waited]  # the third waited for a slot: exact
        engine.cache.check_invariant()
        later = {}
        threads = [threading.Thread(target=stream_chat, args=(client, p, 10, later, p)) for p in prompts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        assert later == answers
        reply = client.completions.create(model="demo", prompt=PROMPTS[5], max_tokens=5, temperature=0)
        assert reply.choices[0].text == expected(engine, engine.encode(PROMPTS[5]), max_new_tokens=5,
                                                 temperature=0.0)[0]


def test_offload_serve_max_batch_is_planned_against_memory(tmp_path, chat_dir, monkeypatch, capsys):
    """`offload-serve --max-batch N` reaches the worker; a batch whose KV caches do not fit the memory left is
    refused in one line naming what fits; the default is 8 when 8 fit."""
    import json

    from offload_engine.memory import kv_cache_bytes, prefill_bytes
    from offload_engine.server import cli, runner

    config = tmp_path / "exact.yaml"
    config.write_text(json.dumps(DEMO_CONFIG))
    seen = []
    monkeypatch.setattr(runner, "serve", lambda engine, host, port, **options: seen.append(options["max_batch"]))
    assert cli.main(["--demo", "--config", str(config), "--max-batch", "3"]) == 0
    assert cli.main(["--demo", "--config", str(config)]) == 0
    assert cli.main([str(chat_dir), "--config", str(config), "--max-batch", "2"]) == 0  # a MODEL directory
    assert seen == [3, 8, 2]
    assert "batching: 8 sequences at once" in capsys.readouterr().err
    # Host RAM for exactly two sequences' KV caches at max_context and a forward's working memory: 2 fit.
    engine = offload_engine.load("demo", config=DEMO_CONFIG, progress=False)
    hf, cfg = engine.model.config, engine.config
    two = 2 * kv_cache_bytes(hf, cfg, 512) + prefill_bytes(hf, cfg, 512, sequences=2)
    monkeypatch.setattr("offload_engine.memory.available_host_bytes", lambda: two)
    assert cli.main(["--demo", "--config", str(config), "--max-batch", "3"]) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("error: --max-batch 3: ") and "use --max-batch 2," in last
    assert cli.main(["--demo", "--config", str(config), "--max-batch", "0"]) == 2
    assert capsys.readouterr().err == "error: --max-batch must be >= 1, got 0\n"


def test_prefix_reuse_per_conversation(engine):
    """Two conversations interleaved: each next turn reuses its own previous turn's KV cache, not the latest
    request's, and answers what a full prefill answers."""
    from offload_engine.chat import encode_chat

    with BackgroundServer(create_app(engine, model_name="demo", max_batch=4)) as server:
        client = client_of(server)
        conversations = [[{"role": "user", "content": PROMPTS[i]}] for i in (3, 4)]
        for messages in conversations:  # first turns, one after the other
            reply = client.chat.completions.create(model="demo", messages=messages, max_tokens=8, temperature=0)
            messages += [{"role": "assistant", "content": reply.choices[0].message.content},
                         {"role": "user", "content": "And then?"}]
        for messages in conversations:  # second turns: the first conversation's is not the latest request
            text, _ = expected(engine, encode_chat(engine.tokenizer, messages), max_new_tokens=8, temperature=0.0)
            reply = client.chat.completions.create(model="demo", messages=messages, max_tokens=8, temperature=0)
            assert reply.usage.prompt_tokens_details.cached_tokens > 0
            assert reply.choices[0].message.content == text


def test_load_test_script_reports_each_client_count():
    """`scripts/load_test.py --demo --clients 1 2` as the README runs it (short): a table row per client count."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "scripts/load_test.py", "--demo", "--clients", "1", "2", "--duration", "1",
                           "--max-tokens", "4"], cwd=repo, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": str(repo), "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert len(rows) == 2 and "errors none" in done.stdout and "inter-token p50" in done.stdout


@pytest.mark.parametrize("model", ["hub-id", "missing-path"])
def test_load_test_names_its_model_as_offload_serve_does(tmp_path, model):
    """scripts/load_test.py MODEL takes offload-serve's model arguments (--cache-dir, --yes; model_args.py), not a
    hand-built copy of them without those, and a model it cannot load is one `error:` line with status 2."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    cache = tmp_path / "conversions"
    args = (["org/absent", "--cache-dir", str(cache), "--yes"] if model == "hub-id"
            else [str(tmp_path / "no-such-model")])
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("HF_", "OFFLOAD_ENGINE_DEBUG"))},
           "PYTHONPATH": str(repo), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run([sys.executable, "scripts/load_test.py", *args, "--device", "cpu", "--clients", "1",
                           "--duration", "1"], cwd=repo, capture_output=True, text=True, timeout=300, env=env)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-2000:]
    if model == "hub-id":  # the conversion cache it was given is where it looked
        assert "org/absent" in lines[0] and "HF_HUB_OFFLINE" in lines[0] and str(cache) in lines[0], lines[0]
    else:
        assert "no-such-model" in lines[0] and "does not exist" in lines[0]


def test_the_outbox_wakes_the_event_loop_once_for_a_steps_events():
    """Events put from another thread while the loop is busy cross in one call_soon_threadsafe, each reaching its
    own request's queue in order; once the loop is gone, the jobs with undelivered events are cancelled."""
    outbox, jobs = Outbox(), [Job([1], None, lambda event: None) for _ in range(3)]

    async def scenario() -> tuple[int, list[list[str]]]:
        loop = asyncio.get_running_loop()
        queues = [asyncio.Queue() for _ in jobs]
        wakes = 0
        schedule = loop.call_soon_threadsafe

        def counted(*args):
            nonlocal wakes
            wakes += 1
            return schedule(*args)

        loop.call_soon_threadsafe = counted
        # The worker's step: two tokens for each of three sequences, while the loop is not running callbacks.
        step = threading.Thread(target=lambda: [outbox.put(loop, job, queue, Piece(f"{i}{t}"))
                                                for t in "ab" for i, (job, queue) in enumerate(zip(jobs, queues))])
        step.start()
        step.join()
        await asyncio.sleep(0)
        return wakes, [[queue.get_nowait().text for _ in range(queue.qsize())] for queue in queues]

    wakes, received = asyncio.run(scenario())
    assert wakes == 1
    assert received == [["0a", "0b"], ["1a", "1b"], ["2a", "2b"]]
    assert not any(job.cancelled.is_set() for job in jobs)

    closed = asyncio.new_event_loop()
    closed.close()
    outbox.put(closed, jobs[0], None, Piece("x"))  # nobody is listening: the job is told to stop
    assert jobs[0].cancelled.is_set() and not outbox.pending
