#!/usr/bin/env python
"""Peak RSS and wall time of converting and loading a pre-quantized checkpoint; Mixtral-8x7B sizes from the layouts.

    python scripts/bench_checkpoint.py [--work DIR] [--intermediate 3072] [--layers 8] [--experts-on-device 1]
    python scripts/bench_checkpoint.py --mixtral-sizes

The first form builds a randomly initialised mid-size Mixtral (hidden 1024, 8 experts, vocab 32000; saved in
bfloat16 with transformers' save_pretrained, sharded), then runs each phase in its own child process and reads
the child's peak RSS from the kernel (`os.wait4` rusage ru_maxrss, which counts every resident page the process
ever had, file-backed mmap pages included):
  baseline  python + torch + transformers + offload_engine imported, nothing else;
  convert   quantize_checkpoint(src, dst) at 4-bit attention / 2-bit experts, float16, on CPU;
  load      load(dst) on CPU with few experts "on device": the other experts live in host slots, as on a GPU;
  source    (--compare-source) load(src) quantizing at load time; its logits must equal load(dst)'s exactly;
  load_mmap (--only load_mmap) load(dst) with each tensor read through safe_open + get_tensor + copy_ instead
            of readinto: the alternative the loader does not use, measured for comparison.
The second form allocates nothing: it sums the byte layouts of Mixtral-8x7B at 4/2 and 4/3 bits.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

GB, GiB, MiB = 1e9, 2**30, 2**20
QUANT_42 = {"dtype": "float16", "quant": {"attention": {"bits": 4, "group_size": 64},
                                          "experts": {"bits": 2, "group_size": 16}}}
QUANT_43 = {"dtype": "float16", "quant": {"attention": {"bits": 4, "group_size": 64},
                                          "experts": {"bits": 3, "group_size": 64}}}
PROMPT = [1, 415, 2936, 9060, 285, 1142, 28705, 28770]  # any 8 token ids


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def self_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# ---- child phases: each prints one JSON line last ----
def phase_make(args) -> dict:
    import torch
    from safetensors import safe_open
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=32000, hidden_size=1024, intermediate_size=args.intermediate,
                           num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=2,
                           num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=4096,
                           tie_word_embeddings=False)
    src = Path(args.work) / "src"
    same = lambda c: [getattr(c, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")]  # noqa: E731
    if not (src / "config.json").exists() or same(MixtralConfig.from_pretrained(src)) != same(config):  # else reuse
        torch.manual_seed(0)
        model = MixtralForCausalLM._from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(src, max_shard_size="400MB")  # several shards, like the real checkpoint
        del model
    from offload_engine.checkpoint import SafetensorsCheckpoint

    checkpoint = SafetensorsCheckpoint(src)  # count parameters from the headers, without reading the weights
    params = 0
    for name, file in checkpoint.file_of.items():
        with safe_open(str(file), framework="pt") as f:
            shape = f.get_slice(name).get_shape()
        params += math.prod(shape)
    return {"params": params, "src_bytes": dir_bytes(src)}


def phase_baseline(args) -> dict:
    import offload_engine  # noqa: F401  (torch, transformers, hqq come with it)

    return {}


def phase_convert(args) -> dict:
    from offload_engine import quantize_checkpoint

    start = time.perf_counter()
    quantize_checkpoint(Path(args.work) / "src", Path(args.work) / "dst", QUANT_42, progress=True, device="cpu",
                        overwrite=True)
    return {"seconds": time.perf_counter() - start}


def _load_and_run(path: Path, args, out_name: str) -> dict:
    import torch
    from safetensors.torch import save_file

    import offload_engine

    start = time.perf_counter()
    config = {**QUANT_42, "offload": {"experts_on_device": args.experts_on_device, "prefetch": args.prefetch}}
    engine = offload_engine.load(path, config=config, device="cpu", progress=True)
    seconds, peak_after_load = time.perf_counter() - start, self_peak()
    logits = engine.logits(PROMPT)  # [1, 8, V]: proves the loaded model runs
    save_file({"logits": logits}, str(Path(args.work) / out_name))
    return {"seconds": seconds, "peak_after_load": peak_after_load, "host_bytes": engine.cache.host_bytes(),
            "device_bytes": engine.cache.device_bytes(), "finite": bool(torch.isfinite(logits).all())}


def phase_load(args) -> dict:
    return _load_and_run(Path(args.work) / "dst", args, "logits_dst.safetensors")


def phase_source(args) -> dict:
    return _load_and_run(Path(args.work) / "src", args, "logits_src.safetensors")


def phase_load_mmap(args) -> dict:
    """The alternative reader, for comparison: each tensor through safe_open (mmap) + get_tensor, then copy_."""
    import torch
    from safetensors import safe_open

    import offload_engine.prequantized as prequantized

    handles, names = {}, {}

    def mmap_read_into(f, path, offset, out) -> None:
        if path not in handles:  # one open handle per file, as SafetensorsCheckpoint keeps them
            handles[path] = safe_open(str(path), framework="pt")
            start, header = prequantized.read_header(path)
            names[path] = {start + v["data_offsets"][0]: k for k, v in header.items()}
        tensor = handles[path].get_tensor(names[path][offset])
        out.copy_(tensor.reshape(-1).view(torch.uint8))

    prequantized.read_into = mmap_read_into
    return _load_and_run(Path(args.work) / "dst", args, "logits_mmap.safetensors")


PHASES = {"make": phase_make, "baseline": phase_baseline, "convert": phase_convert, "load": phase_load,
          "source": phase_source, "load_mmap": phase_load_mmap}
LOADS = ("load", "load_mmap", "source")


def run_child(phase: str, args) -> dict:
    """Run one phase in a fresh interpreter; its result JSON plus the kernel's peak RSS and the process wall time."""
    cmd = [sys.executable, __file__, "--phase", phase, "--work", args.work, "--intermediate", str(args.intermediate),
           "--layers", str(args.layers), "--experts-on-device", str(args.experts_on_device),
           "--prefetch", str(args.prefetch)]
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    out = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"phase {phase} failed (exit {child.returncode}); its output:\n{out}")
    result = json.loads(out.strip().splitlines()[-1])
    result.update(peak_rss=usage.ru_maxrss * 1024, process_seconds=time.perf_counter() - start)
    print(f"  {phase}: {json.dumps(result)}", file=sys.stderr)
    return result


# ---- Mixtral-8x7B sizes, from the layouts alone ----
def mixtral_sizes() -> str:
    from transformers import MixtralConfig

    from offload_engine.config import load_config
    from offload_engine.experts import ExpertLayout
    from offload_engine.memory import trunk_bytes
    from offload_engine.prequantized import FILE_METADATA, plan_files
    from offload_engine.prequantized_io import safetensors_header

    hf = MixtralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, tie_word_embeddings=False)
    rows = ["| quant (attention / experts) | expert (MiB) | experts, all (GB) | trunk (GB) | in memory: experts + trunk "
            "(GB / GiB) | + 3 spare slots (GB) | on disk, weight files (GB / GiB) | reference system |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, quant, reference in (("4-bit g64 / 2-bit g16", QUANT_42, 17.54), ("4-bit g64 / 3-bit g64", QUANT_43, 21.37)):
        cfg = load_config(quant)
        expert = ExpertLayout.build(hf.hidden_size, hf.intermediate_size, cfg.quant.experts, cfg.torch_dtype).nbytes
        experts = hf.num_hidden_layers * hf.num_local_experts * expert
        trunk = trunk_bytes(hf, cfg)
        plan = plan_files(hf, cfg)
        disk = sum(len(safetensors_header(specs, FILE_METADATA)) + sum(s.nbytes for s in specs) for specs in plan.values())
        memory = experts + trunk
        rows.append(f"| {label} | {expert / MiB:.2f} | {experts / GB:.2f} | {trunk / GB:.2f} | {memory / GB:.2f} / "
                    f"{memory / GiB:.2f} | {(memory + 3 * expert) / GB:.2f} | {disk / GB:.2f} / {disk / GiB:.2f} | "
                    f"{reference} GB |")
    return "\n".join(rows)


def machine() -> str:
    import torch

    load = os.getloadavg()
    return (f"{platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, torch {torch.__version__}"
            f", load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min) at the end")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/offload_bench_checkpoint", help="scratch directory (src/, dst/)")
    parser.add_argument("--intermediate", type=int, default=3072, help="expert intermediate size (default 3072)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts-on-device", type=int, default=1, help="experts per layer in 'device' slots on load")
    parser.add_argument("--prefetch", type=int, default=0)
    parser.add_argument("--compare-source", action="store_true", help="also load the source, quantizing at load time "
                        "(as slow as the conversion), and check that its logits equal the pre-quantized ones")
    parser.add_argument("--mixtral-sizes", action="store_true", help="only print Mixtral-8x7B's sizes from the layouts")
    parser.add_argument("--only", nargs="+", choices=sorted(PHASES), help="run only these phases, reusing the "
                        "source and converted model in --work (baseline and load are always run)")
    parser.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)  # internal: run in a child
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(PHASES[args.phase](args)))
        return 0
    print(f"command: python {shlex.join(['scripts/bench_checkpoint.py', *sys.argv[1:]])}")
    if args.mixtral_sizes:
        print(mixtral_sizes())
        return 0
    Path(args.work).mkdir(parents=True, exist_ok=True)
    phases = ["make", "baseline", "convert", "load"] + (["source"] if args.compare_source else [])
    if args.only:
        phases = [p for p in PHASES if p in {"make", "baseline", "load", *args.only}]  # make reuses an existing src
    results = {phase: run_child(phase, args) for phase in phases}
    print(report(results, args))
    return 0


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def report(r: dict, args) -> str:
    from safetensors.torch import load_file

    dst = Path(args.work) / "dst"
    size, base, load = dir_bytes(dst), r["baseline"]["peak_rss"], r["load"]
    lines = [f"machine: {machine()}",
             f"model: hidden 1024, intermediate {args.intermediate}, {args.layers} layers, 8 experts, vocab 32000, "
             f"{r['make']['params'] / 1e9:.3f} B parameters; source {r['make']['src_bytes'] / MiB:.0f} MiB (bfloat16)",
             f"quantized: 4-bit g64 attention / 2-bit g16 experts, float16 trunk: {size / MiB:.1f} MiB on disk",
             f"load: experts_on_device={args.experts_on_device}, prefetch={args.prefetch}, on CPU: device slots "
             f"{load['device_bytes'] / MiB:.1f} MiB + host slots {load['host_bytes'] / MiB:.1f} MiB",
             "", "| phase | wall time (s) | peak RSS (MiB) | peak RSS - baseline (MiB) | / quantized size |",
             "|---|---:|---:|---:|---:|"]
    for phase in ("baseline", "convert", "load", "load_mmap", "source"):
        if phase not in r:
            continue
        peak = r[phase]["peak_after_load"] if phase in LOADS else r[phase]["peak_rss"]
        seconds = r[phase].get("seconds")
        lines.append(f"| {phase} | {f'{seconds:.1f}' if seconds else '-'} (process {r[phase]['process_seconds']:.1f}) | "
                     f"{peak / MiB:.0f} | {(peak - base) / MiB:.0f} | {peak / size:.2f}x raw, "
                     f"{(peak - base) / size:.2f}x net |")
    lines.append(f"\nload peak including one 8-token forward: {load['peak_rss'] / MiB:.0f} MiB; logits finite: "
                 f"{load['finite']}")
    ours = load_file(str(Path(args.work) / "logits_dst.safetensors"))["logits"]
    for phase, label in (("source", "load(src), quantizing at load time"), ("load_mmap", "the safe_open reader")):
        if phase in r:
            other = load_file(str(Path(args.work) / f"logits_{'src' if phase == 'source' else 'mmap'}.safetensors"))
            lines.append(f"logits of load(dst) == {label} (torch.equal): {torch_equal(ours, other['logits'])}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
