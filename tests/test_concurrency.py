"""One Engine shared by threads: calls are serialized, so each returns exactly what it returns alone."""

from __future__ import annotations

import gc
import threading

import pytest
from conftest import exact_config

import offload_engine

# Few experts on device and prefetch on: every forward moves experts, so interleaved forwards would corrupt them.
OFFLOADED = {**exact_config(experts_on_device=2, prefetch=2)}


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return offload_engine.load(tiny_dir, OFFLOADED, device="cpu", progress=False)


@pytest.fixture(scope="module")
def chat_engine(chat_dir):
    return offload_engine.load(chat_dir, OFFLOADED, device="cpu", progress=False)


def requests(n: int) -> list[tuple[list[int], dict]]:
    """n different calls: greedy and seeded sampling on different prompts."""
    out = []
    for i in range(n):
        prompt = [(7 * i + j * 13) % 150 + 3 for j in range(3 + i % 4)]
        sampling = {"max_new_tokens": 12} if i % 2 else {"max_new_tokens": 12, "temperature": 0.9, "seed": i}
        out.append((prompt, sampling))
    return out


def run_threads(target, n_threads: int, timeout: float = 120) -> None:
    errors: list[BaseException] = []

    def wrapped(t: int) -> None:
        try:
            target(t)
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=wrapped, args=(t,)) for t in range(n_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
        assert not thread.is_alive(), "a thread is stuck: deadlock"
    if errors:
        raise errors[0]


@pytest.mark.parametrize("n_threads", [2, 4])
def test_threads_sharing_an_engine_get_their_own_tokens(engine, n_threads):
    calls = requests(4 * n_threads)
    alone = [engine.generate_ids(p, **s) for p, s in calls]
    got: dict[int, list[int]] = {}

    def worker(t: int) -> None:
        for i in range(t, len(calls), n_threads):
            prompt, sampling = calls[i]
            got[i] = engine.generate_ids(prompt, **sampling)

    run_threads(worker, n_threads)
    assert [got[i] for i in range(len(calls))] == alone
    assert engine.generate_ids(*calls[0][:1], **calls[0][1]) == alone[0]  # still sound afterwards


@pytest.mark.parametrize("n_threads", [2, 4])
def test_streams_and_logits_from_threads(chat_engine, n_threads):
    prompts = ["The quick brown fox", "A café in Zürich", "Mixture-of-experts models", "Offloading keeps"]
    alone_text = {p: chat_engine.generate(p, max_new_tokens=10) for p in prompts}
    alone_logits = chat_engine.logits([5, 6, 7, 8])
    got_text: dict[tuple[int, str], str] = {}
    got_logits: list = []

    def worker(t: int) -> None:
        for p in prompts:
            got_text[t, p] = "".join(chat_engine.stream(p, max_new_tokens=10))
            got_logits.append(chat_engine.logits([5, 6, 7, 8]))

    run_threads(worker, n_threads)
    assert all(got_text[t, p] == alone_text[p] for t in range(n_threads) for p in prompts)
    assert all((x == alone_logits).all() for x in got_logits)


def test_an_abandoned_stream_releases_the_engine(chat_engine):
    stream = chat_engine.stream("The quick brown fox", max_new_tokens=20)
    next(stream)
    assert chat_engine.lock.locked
    del stream  # dropped mid-reply: finalising it must release the lock
    assert not chat_engine.lock.locked

    # A stream caught in a reference cycle is finalised by the garbage collector, here from another thread.
    holder: dict = {}
    holder["self"] = holder
    holder["stream"] = chat_engine.stream("The quick brown fox", max_new_tokens=20)
    next(holder["stream"])
    del holder
    run_threads(lambda t: gc.collect(), 1)
    run_threads(lambda t: chat_engine.generate_ids([3, 4, 5], max_new_tokens=2), 2, timeout=60)


def test_a_stream_resumed_in_another_thread_keeps_the_engine(chat_engine):
    alone = chat_engine.generate("A café in Zürich", max_new_tokens=16)
    stream = chat_engine.stream("A café in Zürich", max_new_tokens=16)
    pieces = [next(stream)]
    other: list = []
    # The consumer moves to another thread (as a server's thread pool does) while this thread generates too.
    consumer = threading.Thread(target=lambda: pieces.extend(stream))
    rival = threading.Thread(target=lambda: other.append(chat_engine.generate("A café in Zürich", max_new_tokens=16)))
    consumer.start()
    rival.start()
    consumer.join(60)
    rival.join(60)
    assert "".join(pieces) == alone and other == [alone]


def test_the_lock_is_reentrant_for_its_holder(chat_engine):
    """Generating while consuming one's own stream (same thread) must not deadlock."""
    done: list = []

    def nested(t: int) -> None:
        for _ in chat_engine.stream("The quick brown fox", max_new_tokens=3):
            done.append(chat_engine.generate_ids([3, 4], max_new_tokens=2))

    run_threads(nested, 1, timeout=60)
    assert done and not chat_engine.lock.locked


def test_one_chat_session_used_by_two_threads_is_refused(chat_engine):
    session = chat_engine.chat()
    stream = session.stream("hello there", max_new_tokens=8)
    next(stream)
    errors: list = []

    def intruder(t: int) -> None:
        try:
            session.send("and again", max_new_tokens=4)
        except RuntimeError as e:
            errors.append(str(e))

    run_threads(intruder, 1, timeout=30)
    assert errors and "already in use" in errors[0] and "ChatSession" in errors[0]
    with pytest.raises(RuntimeError, match="already in use"):
        session.reset()
    stream.close()
    assert session.send("and again", max_new_tokens=4) is not None  # free again once the stream is closed
    assert not chat_engine.lock.locked


def test_chat_sessions_in_threads_match_sequential_ones(chat_engine):
    turns = ["hello there", "tell me more", "thanks"]

    def converse() -> list[str]:
        session = chat_engine.chat()
        return [session.send(t, max_new_tokens=8) for t in turns]

    alone = converse()
    got: dict[int, list[str]] = {}
    run_threads(lambda t: got.__setitem__(t, converse()), 3)
    assert all(replies == alone for replies in got.values())
