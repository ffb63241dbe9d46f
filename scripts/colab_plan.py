#!/usr/bin/env python
"""Computed (not measured) resource table for Mixtral-8x7B-Instruct on a Colab T4, for the README's Colab section.

    python scripts/colab_plan.py [--free-gib 14.5]

Everything is derived from Mixtral-8x7B's shapes and this package's byte layouts, nothing is allocated:
  * download: the source weights in bf16 (the hub repo's 19 safetensors shards; headers not counted);
  * peak disk while converting from the hub: the output plus one source shard (the converter deletes a shard before
    fetching the next); a shard is at most 5 GB (the limit the repo was written with), so that is the bound used;
    with --keep-source the whole source stays;
  * peak RAM while converting (HQQ on the GPU): the import baseline measured in BENCHMARKS.md section 3 (427 MiB)
    plus twice the largest source tensor (the 262 MB embedding / lm_head: read, then cast), CUDA's host-side
    allocations not included;
  * output: the pre-quantized checkpoint's weight files (plan_files + safetensors headers);
  * experts on the T4 and host RAM while chatting: `experts_on_device: auto` for the free VRAM (plan_memory), and
    the experts that stay in pinned host memory (the other 8 - k per layer) plus the import baseline.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from transformers import MixtralConfig  # noqa: E402

from offload_engine.config import load_config  # noqa: E402
from offload_engine.memory import GiB, plan_memory  # noqa: E402
from offload_engine.anatomy import Anatomy  # noqa: E402
from offload_engine.prequantized import FILE_METADATA, plan_files  # noqa: E402
from offload_engine.prequantized_io import safetensors_header  # noqa: E402

MIXTRAL_8X7B = MixtralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                             num_experts_per_tok=2, max_position_embeddings=32768, tie_word_embeddings=False)
SHARD_LIMIT = 5e9  # bytes: max_shard_size of the hub repo's 19 shards
BASELINE = 427 * 2**20  # python + torch + transformers + hqq imported (BENCHMARKS.md section 3, measured)
CONFIGS = {"t4-16gb (4-bit attention / 2-bit g16 experts)": "t4-16gb",
           "4/3 on a T4 (4-bit attention / 3-bit g64 experts)": {
               **load_config("t4-16gb").to_dict(), "quant": load_config("24gb").to_dict()["quant"]}}


def source_tensors(hf: MixtralConfig) -> dict[str, int]:
    """Parameter count of every kind of source tensor, times how many there are."""
    H, I, L, E, V = hf.hidden_size, hf.intermediate_size, hf.num_hidden_layers, hf.num_local_experts, hf.vocab_size
    attn = sum(math.prod(t.shape) for t in Anatomy.of(hf).quantized() if t.layer == 0)
    return {"embed + lm_head": 2 * V * H, "final norm": H, "attention": L * attn, "experts": L * E * 3 * I * H,
            "routers": L * E * H, "layer norms": L * 2 * H}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--free-gib", type=float, default=14.5, help="free VRAM before loading (a T4: ~14.5 GiB)")
    args = parser.parse_args()
    print("command:", " ".join(["python", *sys.argv]))
    print("computed from shapes and layouts (nothing measured here); GB = 1e9 bytes")
    hf = MIXTRAL_8X7B
    download = 2 * sum(source_tensors(hf).values())  # bf16
    largest_tensor = 2 * hf.vocab_size * hf.hidden_size
    print("| config | download | peak disk (streamed) | peak disk (--keep-source) | peak RAM converting | output | "
          "experts/layer on the T4 | host RAM chatting |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, name in CONFIGS.items():
        cfg = load_config(name)
        output = sum(len(safetensors_header(specs, FILE_METADATA)) + sum(s.nbytes for s in specs)
                     for specs in plan_files(hf, cfg).values())
        plan = plan_memory(hf, cfg, int(args.free_gib * GiB))
        host = hf.num_hidden_layers * (hf.num_local_experts - plan.experts_on_device) * plan.expert_bytes + BASELINE
        gb = lambda n: f"{n / 1e9:.1f} GB"  # noqa: E731
        print(f"| {label} | {gb(download)} | {gb(output + SHARD_LIMIT)} | {gb(output + download)} | "
              f"{gb(BASELINE + 2 * largest_tensor)} | {gb(output)} | {plan.experts_on_device} of 8 | {gb(host)} |")


if __name__ == "__main__":
    main()
