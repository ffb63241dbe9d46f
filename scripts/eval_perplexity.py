"""Perplexity (sliding window) of a model under a quantization config, or a table of configs (issue 7).

    python scripts/eval_perplexity.py MODEL TEXT_FILE [--config NAME_OR_PATH] [--tail 0.05] [--max-tokens N]
    python scripts/eval_perplexity.py --demo --table            # the demo model's table in BENCHMARKS.md

`--tail 0.05` evaluates the last 5 % of the file (the demo model's held-out validation split). The window is
the model's context (capped by --window) and slides by half of it; each token is scored once, with at least
half a window of context (the usual Hugging Face recipe). Runs through the engine: quantize -> expert cache
-> forward, with all experts resident (offloading does not change the numbers, the tests prove it).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import offload_engine  # noqa: E402
from offload_engine.errors import add_debug_flag, user_errors  # noqa: E402

DEMO = Path(offload_engine.__file__).parent / "demo"
CORPUS = Path(__file__).resolve().parents[2] / "shared/data/corpus/c4_texts.txt"


def spec(bits, group, quant_meta=True, optimize=True) -> dict:
    return {"bits": bits, "group_size": group, "quant_meta": quant_meta, "optimize": optimize}


# (label, attention spec, experts spec)
TABLE = [
    ("unquantized (float32)", spec(None, 64), spec(None, 64)),
    ("4/4 (attn g64 / experts g64)", spec(4, 64), spec(4, 64)),
    ("4/3 (g64 / g64)", spec(4, 64), spec(3, 64)),
    ("4/2 (g64 / g16)", spec(4, 64), spec(2, 16)),
    ("2/2 (g16 / g16)", spec(2, 16), spec(2, 16)),
    ("4/4, 16-bit scales/zeros", spec(4, 64, False), spec(4, 64, False)),
    ("4/3, 16-bit scales/zeros", spec(4, 64, False), spec(3, 64, False)),
    ("4/2, 16-bit scales/zeros", spec(4, 64, False), spec(2, 16, False)),
    ("2/2, 16-bit scales/zeros", spec(2, 16, False), spec(2, 16, False)),
    ("4/4 round-to-nearest", spec(4, 64, False, False), spec(4, 64, False, False)),
    ("4/3 round-to-nearest", spec(4, 64, False, False), spec(3, 64, False, False)),
    ("4/2 round-to-nearest", spec(4, 64, False, False), spec(2, 16, False, False)),
    ("2/2 round-to-nearest", spec(2, 16, False, False), spec(2, 16, False, False)),
]


def load_ids(engine, text_file: Path, tail: float, max_tokens: int | None) -> list[int]:
    text = text_file.read_text(encoding="utf-8")
    if tail:
        text = text[int(len(text) * (1 - tail)) :]
    ids = engine.tokenizer(text)["input_ids"]
    return ids[:max_tokens] if max_tokens else ids


@torch.inference_mode()
def perplexity(engine, ids: list[int], window: int) -> tuple[float, int]:
    """(perplexity, tokens scored) with a window sliding by half its length."""
    stride, nll, scored, prev_end = window // 2, 0.0, 0, 0
    for start in range(0, len(ids) - 1, stride):
        end = min(start + window, len(ids))
        new = end - prev_end  # score only tokens not scored by the previous window
        logits = engine.logits([ids[start:end]])[0]  # [L, V]
        targets = torch.tensor(ids[start + 1 : end])  # [L - 1]
        losses = torch.nn.functional.cross_entropy(logits[:-1], targets, reduction="none")
        nll += losses[-min(new, len(losses)) :].sum().item()
        scored += min(new, len(losses))
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll / scored), scored


@user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?")
    parser.add_argument("text_file", nargs="?", type=Path)
    parser.add_argument("--demo", action="store_true", help=f"MODEL = the packaged demo, TEXT_FILE = {CORPUS.name}")
    parser.add_argument("--config", help="quantization config (name, YAML path); default: the cpu config")
    parser.add_argument("--table", action="store_true", help="evaluate the table of quantization settings")
    parser.add_argument("--tail", type=float, default=0.05, help="evaluate only the last fraction of the file")
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--window", type=int, default=512)
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    if args.demo:
        args.model, args.text_file = args.model or str(DEMO), args.text_file or CORPUS
    if not args.model or not args.text_file:
        parser.error("give MODEL and TEXT_FILE, or --demo")
    print("command:", " ".join([Path(sys.executable).name, *sys.argv]))
    print("machine:", f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, CPU")

    if args.table:
        runs = [(label, {"dtype": "float32", "quant": {"attention": a, "experts": e},
                         "offload": {"experts_on_device": 8, "prefetch": 0}}) for label, a, e in TABLE]
    else:
        runs = [(args.config or "cpu", args.config or "cpu")]
    print("\n| setting | bits/weight (experts) | perplexity | tokens | seconds |")
    print("|---|---|---|---|---|")
    for label, config in runs:
        engine = offload_engine.load(args.model, config=config, device="cpu", progress=False)
        ids = load_ids(engine, args.text_file, args.tail, args.max_tokens)
        window = min(args.window, engine.context_window)
        start = time.perf_counter()
        ppl, scored = perplexity(engine, ids, window)
        bpw = 8 * engine.cache.nbytes / (3 * engine.model.config.hidden_size * engine.model.config.intermediate_size)
        print(f"| {label} | {bpw:.2f} | {ppl:.2f} | {scored} | {time.perf_counter() - start:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
