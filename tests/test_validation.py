"""Validation at the boundary: sampling parameters, token ids and config rules give errors that name the
parameter and what is allowed, instead of raw torch errors, silent truncation or a crash at the first forward."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import exact_config

import offload_engine
from offload_engine.config import ConfigError, load_config
from offload_engine.generate import SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return offload_engine.load(tiny_dir, exact_config(experts_on_device=2, prefetch=1), device="cpu", progress=False)


@pytest.mark.parametrize("option, value, allowed", [
    ("max_new_tokens", 2.5, "integer"), ("max_new_tokens", "5", "integer"), ("max_new_tokens", 0, ">= 1"),
    ("max_new_tokens", True, "integer"), ("seed", "abc", "integer"), ("seed", 2**70, "2**64"),
    ("seed", 1.5, "integer"), ("top_k", 2.5, "integer"), ("top_k", -1, ">= 0"), ("stop", 5, "string"),
    ("stop", ["ok", 3], "string"), ("stop", [""], "non-empty"), ("temperature", math.nan, ">= 0"),
    ("temperature", "0.7", "number"), ("temperature", -1, ">= 0"), ("temperature", math.inf, ">= 0"),
    ("top_p", math.nan, "(0, 1]"), ("top_p", 0, "(0, 1]"), ("repetition_penalty", math.nan, "> 0"),
    ("repetition_penalty", 0, "> 0"),
])
def test_bad_sampling_parameter_is_named(engine, option, value, allowed):
    with pytest.raises((ValueError, TypeError)) as info:
        engine.generate_ids([3, 4, 5], **{"max_new_tokens": 2, option: value})
    text = str(info.value)
    assert option in text and allowed in text
    assert isinstance(info.value, ValueError)  # also a ValueError, so one-line error handlers catch wrong types


def test_wrong_types_are_type_errors():
    for kwargs in ({"max_new_tokens": "5"}, {"seed": "abc"}, {"top_k": 2.5}, {"stop": 5}, {"bogus": 1}):
        with pytest.raises(TypeError):
            SamplingParams.from_kwargs(**kwargs)


def test_valid_sampling_parameters_still_work(engine):
    params = SamplingParams.from_kwargs(max_new_tokens=np.int64(3), temperature=1, top_k=5, seed=2**64 - 1,
                                        stop=["x", "y"], top_p=np.float32(0.5))
    assert params.max_new_tokens == 3 and params.seed == 2**64 - 1 and params.stop == ("x", "y")
    assert SamplingParams(seed=-(2**63)).seed == -(2**63)
    out = engine.generate_ids([3, 4, 5], max_new_tokens=4, temperature=0.8, seed=2**64 - 1)
    assert out == engine.generate_ids([3, 4, 5], max_new_tokens=4, temperature=0.8, seed=2**64 - 1)


@pytest.mark.parametrize("ids, message", [
    ([3, 160], "token id 160 at position 1 is outside the vocabulary of 160 tokens"),
    ([-1, 3], "token id -1 at position 0"),
    ([3, 4.0], "integers"), ([3, 4.7], "integers"), ([3, "3"], "integers"), ([True, 3], "integers"),
    (torch.tensor([3.0, 4.0]), "integers"), (np.array([3.0]), "integers"),
    # A list of prompts (issue 22): each is checked, and the error names it.
    ([[3, 4], [3, 4.0]], r"prompts\[1\]: token ids must be integers"),
    (["3"], r"prompts\[0\]: this model has no tokenizer files"),
])
def test_bad_token_ids_are_refused_with_the_id_and_vocabulary(engine, ids, message):
    with pytest.raises((ValueError, TypeError), match=message.replace("(", r"\(")):
        engine.generate_ids(ids, max_new_tokens=2)


def test_token_ids_for_logits(engine):
    with pytest.raises(ValueError, match="token id 999 .* 160 tokens"):
        engine.logits([[1, 2], [3, 999]])
    with pytest.raises(TypeError, match="integers"):
        engine.logits(torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="differ in length"):
        engine.logits([[1, 2], [3]])
    same = engine.logits(torch.tensor([[1, 2], [3, 4]]))
    assert torch.equal(same, engine.logits([[1, 2], [3, 4]]))
    assert torch.allclose(same[:1], engine.logits(np.array([1, 2])), atol=1e-5)
    assert engine.generate_ids(torch.tensor([3, 4, 5]), max_new_tokens=3) == engine.generate_ids([3, 4, 5],
                                                                                                 max_new_tokens=3)


def test_prefetch_above_the_expert_count_is_refused_at_load(tiny_dir):
    with pytest.raises(ConfigError, match=r"offload.prefetch is 20, but this model has 8 experts.*0 \(off\) to 8"):
        offload_engine.load(tiny_dir, exact_config(experts_on_device=2, prefetch=20), device="cpu", progress=False)
    # At the bound it works.
    engine = offload_engine.load(tiny_dir, exact_config(experts_on_device=2, prefetch=8), device="cpu", progress=False)
    assert len(engine.generate_ids([3, 4], max_new_tokens=3)) == 3


def test_group_size_that_does_not_fit_the_model_names_the_key(tiny_dir):
    config = {"dtype": "float32", "quant": {"experts": {"bits": 2, "group_size": 24}}}
    with pytest.raises(ConfigError, match="quant.experts.group_size 24"):
        offload_engine.load(tiny_dir, config, device="cpu", progress=False)


@pytest.mark.parametrize("config, message", [
    ({"offload": {"prefetch": True}}, "offload.prefetch"),
    ({"offload": {"experts_on_device": True}}, "offload.experts_on_device"),
    ({"offload": {"policy": "mru"}}, "offload.policy must be one of lru"),
    ({"quant": {"experts": {"bits": True}}}, "bits"),
    ({"quant": {"experts": {"quant_meta": "yes"}}}, "quant_meta must be true or false"),
    ({"max_context": 100.5}, "max_context"),
    ({"dtype": 16}, "dtype"),
])
def test_config_values_of_the_wrong_type(config, message):
    with pytest.raises(ConfigError, match=message):
        load_config(config)


def test_yaml_syntax_error_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("offload:\n  prefetch: [1\n")
    with pytest.raises(ConfigError, match=r"broken.yaml is not valid YAML \(line 3"):
        load_config(str(path))
