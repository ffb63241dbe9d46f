"""Multi-turn chat that keeps the KV cache between turns and prefills only what is new.

The conversation's token ids are kept exactly as the model saw them (prompt, generated reply, EOS). A new
turn renders the conversation with the tokenizer's own chat template (Mixtral-Instruct's
`<s>[INST] ... [/INST] reply</s>[INST] ...`, Qwen's `<|im_start|>`, ...) and tokenizes only the text that the new
turn adds, so the tokens already in the KV cache stay valid even when a generated reply would re-tokenize
differently. The cache keeps its longest prefix shared with the new ids (cropped if needed) and only the rest is prefilled.
When old turns are dropped to fit the context window the whole conversation is re-tokenized.

`encode_chat` and `PrefixCache` are shared with the HTTP server (offload_engine/server/).
"""

from __future__ import annotations

import warnings
from typing import Iterator, Protocol

from jinja2.exceptions import TemplateError
from transformers import DynamicCache

from .concurrency import BusyGuard, EngineLock, locked_iter
from .generate import SamplingParams, generate_tokens, stream_text
from .model import OffloadedModel
from .tokenization import encode_text


class ChatEngine(Protocol):
    """What a chat uses of an `Engine` (engine.py imports this module, so it is named here, not imported)."""

    model: OffloadedModel
    tokenizer: object
    lock: EngineLock
    context_window: int
    eos_ids: list[int]


def render_chat(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """The chat template's text for `messages` (raises jinja2's TemplateError for a conversation it refuses)."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def fold_system(tokenizer, messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """`messages` as the template takes them: Mixtral-Instruct's template has no system role, and the usual
    practice (mistral-common's too) is to prepend the system prompt to the first user message."""
    if not messages or messages[0]["role"] != "system":
        return messages
    try:
        render_chat(tokenizer, messages)
        return messages
    except TemplateError:
        if len(messages) < 2 or messages[1]["role"] != "user":
            raise
        first = {"role": "user", "content": f"{messages[0]['content']}\n\n{messages[1]['content']}"}
        return [first, *messages[2:]]


def encode_chat(tokenizer, messages: list[dict[str, str]], per_message: bool = True) -> list[int]:
    """Token ids of a conversation (ending with a user turn) through the chat template.

    `per_message` (Mixtral, families.py's `chat: mixtral`): each message's text (what it adds to the rendered
    conversation) is tokenized on its own after a leading BOS, as mistral-common's `encode_chat_completion` does:
    sentencepiece then gives `[INST]` and a reply their leading "▁" wherever they sit, and Mixtral's text is
    encoded by sentencepiece itself (tokenization.py), so Mixtral-Instruct sees exactly the prompts it was tuned
    on. Otherwise, and for a template whose rendering of a conversation is not a prefix of the next one's, the
    rendered text is tokenized as one, as `apply_chat_template` does."""
    messages = fold_system(tokenizer, messages)
    text = render_chat(tokenizer, messages)
    cuts: list[int] = []  # where each message's text ends in `text`
    try:
        for end in range(1, len(messages) if per_message else 0):
            if messages[end - 1]["role"] != "system":  # a system message alone renders nothing by itself
                before = render_chat(tokenizer, messages[:end], add_generation_prompt=False)
                if not text.startswith(before) or (cuts and len(before) < cuts[-1]):
                    raise TemplateError("not a prefix")
                cuts.append(len(before))
    except TemplateError:
        cuts = []
    bos = getattr(tokenizer, "bos_token", None)
    ids: list[int] = []
    for start, end in zip([0, *cuts], [*cuts, len(text)]):
        segment = text[start:end]
        if bos and segment.startswith(bos):
            ids.append(tokenizer.bos_token_id)
            segment = segment[len(bos):]
        if segment:
            ids.extend(encode_text(tokenizer, segment))
    return ids


class PrefixCache:
    """A KV cache and exactly the token ids whose keys/values it holds, reused across requests that share a
    prefix: `reuse(ids)` crops it to the longest shared prefix, `sync(ids)` records what it holds afterwards."""

    def __init__(self, model_config):
        self.model_config = model_config
        self.clear()

    def clear(self) -> None:
        self.kv_cache = DynamicCache(config=self.model_config)
        self.ids: list[int] = []

    def reuse(self, ids: list[int]) -> int:
        """Crop the KV cache to the longest prefix it shares with `ids`; return that prefix's length."""
        keep = 0
        for cached, new in zip(self.ids, ids):
            if cached != new:
                break
            keep += 1
        keep = min(keep, len(ids) - 1)  # at least one token must be prefilled to get next-token logits
        if keep == 0:
            self.clear()
        elif keep < len(self.ids):
            self.kv_cache.crop(keep - len(self.ids))
        self.ids = self.ids[:keep]
        return keep

    def sync(self, candidate_ids: list[int]) -> None:
        """Record which tokens the KV cache holds (a prefix of `candidate_ids`); an interrupted forward leaves
        layers uneven: start afresh."""
        lengths = {layer.get_seq_length() for layer in self.kv_cache.layers}
        if len(lengths) != 1:
            self.clear()
        else:
            self.ids = list(candidate_ids[: lengths.pop()])


class ChatSession:
    """One conversation. Turns take the engine's lock (other threads' calls wait); one session used by two
    threads at once, or a new turn while the previous stream is still open, is refused with a RuntimeError."""

    def __init__(self, engine: ChatEngine, system: str | None = None):
        if engine.tokenizer is None or getattr(engine.tokenizer, "chat_template", None) is None:
            raise ValueError("chat needs a tokenizer with a chat template; this model directory has none")
        self.engine, self.system = engine, system
        self.messages: list[dict[str, str]] = []
        self.notices: list[str] = []  # things the user should know, e.g. that old turns were dropped
        self.last_reply_ids: list[int] = []  # the tokens of the latest reply, as generated
        self._busy = BusyGuard("this ChatSession")
        self.reset()

    @property
    def kv_cache(self) -> DynamicCache:
        return self.prefix.kv_cache

    @property
    def cached_ids(self) -> list[int]:
        return self.prefix.ids

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        with self._busy():
            self._clear()

    def _clear(self) -> None:
        self.messages = []
        self.prefix = PrefixCache(self.engine.model.config)
        self.history_ids: list[int] = []  # the conversation so far, as the model saw it

    def send(self, message: str, **sampling) -> str:
        return "".join(self.stream(message, **sampling))

    def stream(self, message: str, **sampling) -> Iterator[str]:
        with self._busy():  # checked before waiting for the engine: a second user of this session fails at once
            yield from locked_iter(self.engine.lock, self._turn(message, sampling))

    def _turn(self, message: str, sampling: dict) -> Iterator[str]:
        if not message or not message.strip():
            raise ValueError("the message is empty: type something to send")
        params = SamplingParams.from_kwargs(**sampling)
        messages = self.messages + [{"role": "user", "content": message}]
        ids = self._extend(messages)
        budget = self.engine.context_window - params.max_new_tokens
        while len(ids) > budget and len(messages) > 2:
            messages = messages[2:]  # the oldest user/assistant pair
            ids = self._render(messages)
            self._notice("the conversation outgrew the context window: dropped the oldest turn")
        if len(ids) > budget:
            raise ValueError(f"the message is {len(ids)} tokens; with max_new_tokens={params.max_new_tokens} the "
                             f"context window of {self.engine.context_window} tokens is exceeded: shorten it")
        keep = self.prefix.reuse(ids)
        reply_ids: list[int] = []
        eos = self.engine.eos_ids
        tokens = generate_tokens(self.engine.model, ids[keep:], params, self.kv_cache, eos, ids[:keep], feed_eos=True)

        def tracked() -> Iterator[int]:
            for token in tokens:
                reply_ids.append(token)
                yield token

        text = ""
        try:
            for piece in stream_text(tracked(), self.engine.tokenizer, params.stop):
                text += piece
                yield piece
        finally:  # also on Ctrl-C or an abandoned stream: keep what was said, and a cache that matches it
            tokens.close()
            self.messages = messages + [{"role": "assistant", "content": text}]
            self.last_reply_ids = reply_ids
            self.history_ids = ids + reply_ids + eos[:1]  # the template closes every reply with EOS
            self.prefix.sync(self.history_ids)

    # ---- helpers ----
    def _extend(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids for `messages` (the conversation plus a new user turn): the kept history plus the new text."""
        before, after = self._render(self.messages, tokenize=False), self._render(messages, tokenize=False)
        if not self.history_ids or not after.startswith(before):
            return self._render(messages)
        return self.history_ids + encode_text(self.engine.tokenizer, after[len(before):])

    def _render(self, messages: list[dict[str, str]], tokenize: bool = True):
        """The chat template applied to `messages`: token ids, or the text with `tokenize=False`."""
        if not messages:
            return ""
        full = ([{"role": "system", "content": self.system}] if self.system else []) + messages
        if tokenize:
            return encode_chat(self.engine.tokenizer, full, self.engine.model.family.chat == "mixtral")
        return render_chat(self.engine.tokenizer, fold_system(self.engine.tokenizer, full))

    def _notice(self, text: str) -> None:
        self.notices.append(text)
        warnings.warn(text, stacklevel=3)
