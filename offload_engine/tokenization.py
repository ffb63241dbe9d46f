"""Text to token ids exactly as the model was tuned on them.

Mixtral's tokenizer is a sentencepiece model (`tokenizer.model`). The tokenizer transformers 5 builds from it
merges runs of spaces in another order than sentencepiece (its whitespace pieces carry score -1e9, so
sentencepiece merges them last): indented code such as `    if x` becomes `▁▁▁▁ if` where sentencepiece and
mistral-common's `encode_chat_completion` give `▁▁▁ ▁if`, and a leading space loses its own `▁`. So a Mixtral
checkpoint's text is encoded by sentencepiece itself, on the checkpoint's `tokenizer.model` (or, when the directory
ships none, on mistral-common's copy of Mixtral's, `tokenizer.model.v1`, if that package is installed); either
file is used only when its pieces are the tokenizer's vocabulary. transformers' tokenizer still decodes and
renders chat templates, and every other family is encoded by it as before.

Everything in the package that turns text into ids goes through `encode_text`: `Engine.encode` (generate,
/v1/completions) and `chat.encode_chat` (ChatSession, /v1/chat/completions).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .families import FAMILIES

ENCODER = "offload_sentencepiece"  # the attribute of a transformers tokenizer that holds its SentencePieceText


class SentencePieceText:
    """sentencepiece's encoding of text, with the tokenizer's special tokens (`<s>`, `</s>`, `<unk>`) written in
    the text taken as those tokens (a chat template's rendering holds them); each run of text between them is
    encoded on its own, as mistral-common encodes each message."""

    def __init__(self, model_file: Path, special: dict[str, int]):
        import sentencepiece

        self.model_file = Path(model_file)
        self.processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        self.special = dict(special)
        self.splitter = re.compile("(" + "|".join(map(re.escape, sorted(special, key=len, reverse=True))) + ")")

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for i, part in enumerate(self.splitter.split(text) if self.special else [text]):
            if i % 2:
                ids.append(self.special[part])
            elif part:
                ids.extend(self.processor.encode(part))
        return ids

    def matches(self, tokenizer) -> bool:
        """Whether this model's pieces are `tokenizer`'s vocabulary, id for id."""
        size = self.processor.get_piece_size()
        vocab = tokenizer.get_vocab()
        if len(vocab) != size:
            return False
        return all(vocab.get(self.processor.id_to_piece(i)) == i for i in range(size))


def load_tokenizer(model_dir: Path):
    """The checkpoint's own tokenizer (transformers'), or None when it ships none (logits and token-id generation
    still work). A Mixtral checkpoint's tokenizer gets a SentencePieceText that `encode_text` uses."""
    model_dir = Path(model_dir)
    if not any((model_dir / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if _chat_format(model_dir) == "mixtral":
        special = {token: tokenizer.convert_tokens_to_ids(token) for token in tokenizer.all_special_tokens}
        for model_file in _sentencepiece_models(model_dir):
            encoder = SentencePieceText(model_file, special)
            if encoder.matches(tokenizer):
                setattr(tokenizer, ENCODER, encoder)
                break
    return tokenizer


def _chat_format(model_dir: Path) -> str | None:
    try:
        model_type = json.loads((model_dir / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    family = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    return family.chat if family is not None else None


def _sentencepiece_models(model_dir: Path) -> list[Path]:
    """The checkpoint's tokenizer.model, then mistral-common's copy of Mixtral's (if that package is installed)."""
    files = [model_dir / "tokenizer.model"]
    try:
        import mistral_common
    except ImportError:
        pass
    else:
        files.append(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1")
    return [f for f in files if f.is_file()]


def encode_text(tokenizer, text: str, bos: bool = False) -> list[int]:
    """`text`'s token ids (special tokens written in it become those tokens); `bos`: BOS first.

    With a SentencePieceText (Mixtral) sentencepiece's ids; otherwise transformers' tokenizer's, whose own
    settings decide whether `bos` adds a BOS (as `tokenizer(text)` does)."""
    encoder = getattr(tokenizer, ENCODER, None)
    if encoder is None:
        return list(tokenizer(text, add_special_tokens=bos)["input_ids"])
    return ([tokenizer.bos_token_id] if bos else []) + encoder.encode(text)
