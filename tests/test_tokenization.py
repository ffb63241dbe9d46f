"""Mixtral's prompts are encoded as Mixtral was tuned on them (issue 19 item 13): plain text as sentencepiece with
BOS, chat turns as mistral-common's encode_chat_completion, in `generate`, ChatSession and the server; the
tokenizer transformers 5 builds from tokenizer.model merges runs of spaces differently (`    if` -> `▁▁▁▁ if`)."""

from __future__ import annotations

import time

import shutil

import pytest

import offload_engine
from offload_engine.chat import ChatSession, encode_chat
from offload_engine.tokenization import ENCODER, load_tokenizer

from conftest import MIXTRAL_CHAT_TEMPLATE, exact_config, make_checkpoint, mixtral_tokenizer_model

pytest.importorskip("mistral_common")

CODE = "def f(x):\n    if x:\n        return  1\n    return 0\n"
TEXTS = [CODE, "two  spaces,   three", "  leading and trailing  ", "Zürich, ünïcødé, 日本語 and 🙂", "A plain sentence."]
CONVERSATIONS = [
    [{"role": "user", "content": f"Explain this code:\n{CODE}"}],
    [{"role": "user", "content": "  Hi  there  "}, {"role": "assistant", "content": "  Hello!  Sure:\n    x = 1 "},
     {"role": "user", "content": "Grüße aus Zürich,  日本語 too."}],
    [{"role": "system", "content": " Be  brief. "}, {"role": "user", "content": "    indented"}],
]


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory, mixtral_tokenizer):
    """A tiny random model with Mixtral's 32000-token vocabulary, its tokenizer files as the hub ships them
    (tokenizer.json from transformers, tokenizer.model) and chat template; mistral-common's tokenizer."""
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    model_dir = make_checkpoint(tmp_path_factory.mktemp("mixtral") / "model", vocab_size=32000, hidden_size=32,
                                intermediate_size=64, num_hidden_layers=2, eos_token_id=2)
    mixtral_tokenizer.save_pretrained(model_dir)
    shutil.copy(mixtral_tokenizer_model(), model_dir / "tokenizer.model")
    engine = offload_engine.load(model_dir, config=exact_config(experts_on_device=8), progress=False)
    engine.tokenizer.chat_template = MIXTRAL_CHAT_TEMPLATE  # what the hub's tokenizer_config.json holds
    return engine, MistralTokenizer.from_file(str(mixtral_tokenizer_model()))


def reference_chat(reference, messages) -> list[int]:
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    request = ChatCompletionRequest(messages=[kinds[m["role"]](content=m["content"]) for m in messages])
    return reference.encode_chat_completion(request).tokens


def reference_text(reference, text: str, bos: bool = True) -> list[int]:
    return reference.instruct_tokenizer.tokenizer.encode(text, bos=bos, eos=False)


def test_the_transformers_tokenizer_differs_on_these_texts(mixtral):
    """The premise: without sentencepiece, code and leading spaces come out differently."""
    engine, reference = mixtral
    differ = [t for t in TEXTS if engine.tokenizer(t, add_special_tokens=False)["input_ids"]
              != reference_text(reference, t, bos=False)]
    assert CODE in differ and "  leading and trailing  " in differ


@pytest.mark.parametrize("text", TEXTS)
def test_plain_text_prompts_are_sentencepiece_with_bos(mixtral, text):
    engine, reference = mixtral
    assert engine.encode(text) == reference_text(reference, text)


def test_generate_takes_the_sentencepiece_prompt(mixtral):
    engine, reference = mixtral
    sampling = dict(max_new_tokens=6, temperature=1.0, seed=3)
    out = engine.generate_ids(reference_text(reference, CODE), **sampling)
    assert engine.generate(CODE, **sampling) == engine.tokenizer.decode(out, skip_special_tokens=True)


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_prompts_equal_mistral_common(mixtral, messages):
    engine, reference = mixtral
    assert encode_chat(engine.tokenizer, messages) == reference_chat(reference, messages)


def test_chat_session_turns_equal_mistral_common(mixtral):
    """Each turn's new text (the later one prefilled after the kept history) as mistral-common encodes it."""
    engine, reference = mixtral
    session = ChatSession(engine, system=" Be  brief. ")
    first, second = f"Explain:\n{CODE}", "  and  Zürich?  "
    session.send(first, max_new_tokens=4, seed=0, temperature=1.0)
    history = list(session.history_ids)
    reply = session.messages[-1]["content"]
    expected = reference_chat(reference, [{"role": "system", "content": " Be  brief. "},
                                          {"role": "user", "content": first}])
    assert history[: len(expected)] == expected
    session.send(second, max_new_tokens=4, seed=0, temperature=1.0)
    turn = session.history_ids[len(history): len(session.history_ids) - len(session.last_reply_ids) - 1]
    assert session.history_ids[: len(history)] == history  # the first turn stayed as the model saw it
    full = reference_chat(reference, [{"role": "system", "content": " Be  brief. "},
                                      {"role": "user", "content": first},
                                      {"role": "assistant", "content": reply}, {"role": "user", "content": second}])
    assert turn == full[len(full) - len(turn):] and turn == reference_text(reference, f"[INST] {second} [/INST]",
                                                                             bos=False)


def latest_prompt(finished, served: int, timeout: float = 10.0) -> list[int]:
    """The prompt of the latest request, once the worker has filed its `served`-th (it answers first, then files)."""
    deadline = time.monotonic() + timeout
    while len(finished) < served and time.monotonic() < deadline:
        time.sleep(0.01)
    return finished[-1][0]


def test_server_prompts_equal_mistral_common(mixtral):
    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    from offload_engine.server import BackgroundServer, create_app

    engine, reference = mixtral
    messages = CONVERSATIONS[1]
    with BackgroundServer(create_app(engine, model_name="mixtral")) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=30)
        finished = s.app.state.worker.finished  # (prompt ids, KV cache) of the requests served, latest last
        reply = client.chat.completions.create(model="mixtral", messages=messages, max_tokens=3)
        chat_ids = list(latest_prompt(finished, 1))
        completion = client.completions.create(model="mixtral", prompt=CODE, max_tokens=3)
        text_ids = list(latest_prompt(finished, 2))
    assert chat_ids == reference_chat(reference, messages) and reply.usage.prompt_tokens == len(chat_ids)
    assert text_ids == reference_text(reference, CODE) and completion.usage.prompt_tokens == len(text_ids)


def test_sentencepiece_only_when_it_is_the_tokenizers(chat_dir, tmp_path):
    """A tokenizer.model whose pieces are not the tokenizer's vocabulary is not used (here: a small BPE tokenizer
    beside Mixtral's tokenizer.model), and other families keep transformers' encoding."""
    model_dir = tmp_path / "bpe"
    shutil.copytree(chat_dir, model_dir)
    shutil.copy(mixtral_tokenizer_model(), model_dir / "tokenizer.model")
    assert getattr(load_tokenizer(model_dir), ENCODER, None) is None


def test_mixtral_without_tokenizer_model_uses_mistral_commons_copy(mixtral, tmp_path):
    engine, _ = mixtral
    model_dir = tmp_path / "no-sentencepiece-file"
    model_dir.mkdir()
    engine.tokenizer.save_pretrained(model_dir)
    shutil.copy(engine.model_dir / "config.json", model_dir / "config.json")
    tokenizer = load_tokenizer(model_dir)
    assert getattr(tokenizer, ENCODER).model_file.name == "tokenizer.model.v1"
    (model_dir / "config.json").write_text((model_dir / "config.json").read_text().replace('"mixtral"', '"phimoe"'))
    assert getattr(load_tokenizer(model_dir), ENCODER, None) is None  # another family: transformers' encoding
