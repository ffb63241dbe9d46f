"""Shared fixtures: small Mixtral-architecture checkpoints written with transformers' own save_pretrained.

Tests run on the CPU unless marked `cuda`: `load()` and `offload-chat` default to the GPU when torch sees one, so on
a machine with a GPU every unmarked test sees none (`torch.cuda.is_available()` is False in the test, and
subprocesses it starts get `CUDA_VISIBLE_DEVICES=`). Tests marked `cuda` need a real GPU and are skipped without
one. `--fake-cuda-available` makes torch claim a GPU for the whole session (tests/test_cuda_defaults.py runs CPU
tests that way, as they would run on a GPU machine).
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub call would otherwise retry for ~25 s before failing
# Without a GPU, Triton kernels run in Triton's interpreter (tests/test_triton_kernels.py). Triton reads this when
# a kernel is decorated, including its own standard library at import, so it must be set before anything imports
# triton (torch and transformers may).
if not Path("/proc/driver/nvidia").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM

REAL_CUDA = torch.cuda.is_available()  # before `--fake-cuda-available` can change the answer


def pytest_addoption(parser) -> None:
    parser.addoption("--fake-cuda-available", action="store_true",
                     help="make torch.cuda.is_available() answer True (a GPU machine as the CPU tests see it)")


def pytest_configure(config) -> None:
    if config.getoption("--fake-cuda-available"):
        torch.cuda.is_available = lambda: True


def pytest_collection_modifyitems(config, items) -> None:
    if REAL_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marked cuda)")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def cpu_unless_marked_cuda(request, monkeypatch):
    """Pin the CPU for every test not marked `cuda`: the engine's default device, and any subprocess's."""
    if request.node.get_closest_marker("cuda") is None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    yield


SHARED = Path(__file__).resolve().parents[1].parent / "shared"

# No quantization, float32: the engine must then match transformers to float rounding.
EXACT = {"dtype": "float32", "quant": {"attention": {"bits": None}, "experts": {"bits": None}}}


def tiny_config(**overrides) -> MixtralConfig:
    params = dict(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=512,
                  eos_token_id=None, bos_token_id=1, tie_word_embeddings=False)
    params.update(overrides)
    return MixtralConfig(**params)


def make_checkpoint(path: Path, seed: int = 0, edit=None, std: float = 0.15, **overrides) -> Path:
    """Save a randomly initialised tiny Mixtral to `path`; `edit(model)` may change its weights first."""
    torch.manual_seed(seed)
    model = MixtralForCausalLM(tiny_config(**overrides))
    # Larger-than-default weights so that routing and logits are far from uniform (ties would make tests flaky).
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, std)
    if edit is not None:
        edit(model)
    model.save_pretrained(path)
    return path


def reference_model(path: Path) -> MixtralForCausalLM:
    return MixtralForCausalLM.from_pretrained(path, dtype=torch.float32, experts_implementation="eager").eval()


def exact_config(**offload) -> dict:
    return {**EXACT, "offload": {"experts_on_device": 8, "prefetch": 0, **offload}}


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_ref(tiny_dir) -> MixtralForCausalLM:
    return reference_model(tiny_dir)


# Mixtral-8x7B-Instruct-v0.1's chat template (tokenizer_config.json on the hub), verbatim.
MIXTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. A café in Zürich serves crème brûlée and naïve jokes. "
    "Mixture-of-experts models route each token to two of eight experts. 東京 and Москва are cities. "
    "Offloading keeps most experts in host memory and copies them to the GPU when a token needs them. "
) * 3


def train_bpe_tokenizer(path: Path, vocab_size: int = 400):
    """A small byte-level BPE with <unk>=0, <s>=1, </s>=2 and Mixtral's chat template, saved into `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = SHARED / "data/corpus/c4_texts.txt"
    lines = corpus.read_text().splitlines()[:400] if corpus.exists() else []
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([SAMPLE_TEXT, *lines], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = MIXTRAL_CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def make_chat_checkpoint(path: Path, **overrides) -> Path:
    tokenizer = train_bpe_tokenizer(path)
    # bos/eos ids as in Mixtral; the tokenizer's post-processor adds no BOS, the chat template does.
    return make_checkpoint(path, vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2, **overrides)


@pytest.fixture(scope="session")
def chat_dir(tmp_path_factory) -> Path:
    return make_chat_checkpoint(tmp_path_factory.mktemp("chat"))


def mixtral_tokenizer_model() -> Path:
    """Mixtral-8x7B's sentencepiece model (tokenizer.model.v1), as mistral-common ships it; skips without it."""
    mistral_common = pytest.importorskip("mistral_common")
    source = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not source.exists():
        pytest.skip("mistral-common does not ship tokenizer.model.v1")
    return source


@pytest.fixture(scope="session")
def mixtral_tokenizer(tmp_path_factory):
    """Mixtral's tokenizer (32000 tokens) through transformers, from mistral-common's copy of tokenizer.model."""
    import shutil

    from transformers import LlamaTokenizer

    folder = tmp_path_factory.mktemp("mixtral_tokenizer")
    shutil.copy(mixtral_tokenizer_model(), folder / "tokenizer.model")
    return LlamaTokenizer.from_pretrained(str(folder))


@pytest.fixture
def one_thread():
    """Tiny ops on a busy 2-core machine: OpenMP barriers can wait tens of ms for a descheduled thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_build():
    """Libraries built anew under the test's compiler settings; later tests get the default build back."""
    from offload_engine.kernels import cpu as cpu_kernels

    cpu_kernels._library.cache_clear()
    cpu_kernels._PLANS.clear()
    yield
    cpu_kernels._library.cache_clear()
    cpu_kernels._PLANS.clear()
