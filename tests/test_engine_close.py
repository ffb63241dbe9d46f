"""Using an engine after close() (issue 19, item 6): every entry point says the engine is closed."""

from __future__ import annotations

import pytest

from conftest import exact_config

import offload_engine
from offload_engine.engine import EngineClosedError

CLOSED = "the engine is closed"


@pytest.fixture(scope="module")
def closed_engine():
    engine = offload_engine.load("demo", config=exact_config(experts_on_device=4, prefetch=1), progress=False)
    session = engine.chat()  # made before close(): its next turn must fail the same way
    ids = engine.encode("The history of the city")
    assert len(engine.generate_ids(ids, max_new_tokens=3)) == 3
    engine.close()
    return engine, session, ids


@pytest.mark.parametrize("use", [
    lambda engine, session, ids: engine.logits([ids]),
    lambda engine, session, ids: engine.generate_ids(ids, max_new_tokens=3),
    lambda engine, session, ids: engine.generate("The city", max_new_tokens=3),
    lambda engine, session, ids: list(engine.stream("The city", max_new_tokens=3)),
    lambda engine, session, ids: engine.chat().send("Hello", max_new_tokens=3),
    lambda engine, session, ids: session.send("Hello", max_new_tokens=3),
    lambda engine, session, ids: engine.reset_stats(),
], ids=["logits", "generate_ids", "generate", "stream", "new chat", "old chat", "reset_stats"])
def test_using_a_closed_engine_says_it_is_closed(closed_engine, use):
    engine, session, ids = closed_engine
    assert engine.closed
    with pytest.raises(EngineClosedError, match=CLOSED):
        use(engine, session, ids)


def test_closing_twice_is_harmless_and_stats_stay_readable(closed_engine):
    engine, _, _ = closed_engine
    engine.close()
    assert engine.stats()["overall"]["lookups"] > 0  # the counters of the work done before close()


def test_a_server_on_a_closed_engine_answers_500_saying_so(closed_engine):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from offload_engine.server import BackgroundServer, create_app

    engine, _, _ = closed_engine
    with BackgroundServer(create_app(engine, model_name="demo")) as server:
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=30)
    assert r.status_code == 500 and CLOSED in r.json()["error"]["message"]
