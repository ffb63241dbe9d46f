"""GPU check (issues 15, 20, 21, 23): what only a GPU can show, asserted, in one run with one JSON report.

    python scripts/gpu_check.py [--report gpu_check.json] [--configs JSON ...] [--new-tokens 32] [--dry-run]

Sized for a T4 (16 GB, Colab's 12.7 GB of RAM) and well under 10 minutes there. Each check passes, fails or is
skipped (with the reason); the report holds the device, every check with its numbers, and every timing. Exit
status 1 when a check failed.
 1. kernels: the Triton kernels against the reference kernels on the GPU, quantized (2-bit g16 on Mixtral's expert
    shapes, 4-bit g64 attention, rows that share packed words and rows that do not) at one token count per kernel
    variant plus 17-64 (tl.dot), in float16, float32 and bfloat16 (compute capability >= 8.0; below, that a
    bfloat16 config runs as float16); and no Triton compile after the warm-up.
 2. engine: fused against reference kernels in a quantized engine (float32 exact to 1e-4; float16 and bfloat16
    within half-precision rounding), prompts of 40 and 80 tokens; an unquantized float32 engine against
    transformers' Mixtral on the same weights.
 3. quantize_checkpoint on the GPU: the manifest says so, and the converted checkpoint decodes as `load(source)`.
 4. long prefill: a prompt of max_context - 16 tokens with Mixtral's 32 query heads; peak allocated device
    memory within the memory plan's total.
 5. page-locked host memory: the T4 plan's offloaded experts (5.9 GiB) locked in one exact-size cudaHostRegister;
    PCIe GB/s measured from it (host->device, device->host, both at once).
 6. copy streams: each of the cache's copies is timed with CUDA events on its own stream (copy-ins, write-backs;
    nothing else, so the sampler's device-to-device clone is not counted); the two streams' busy times must
    overlap each other.
 7. host syncs during decode (torch.cuda.set_sync_debug_mode): none beyond the engine's counted routing reads and
    the sampler's.
 8. decode tokens/s for each config (--configs: JSON overrides of the check model's config, default prefetch 0, 1
    and 2; a key the engine does not have yet, e.g. a future offload.cpu_compute, is reported, not fatal) beside
    the measured inputs: PCIe GB/s, the fused GEMV's GB/s on packed bytes, hit rate, bytes copied per token, and
    the kernel launches per layer of a decode step.
--dry-run runs every check's code on the CPU with tiny shapes (the Triton interpreter for the kernels, the fused
CPU kernels in engines, copies timed on the host); what only a GPU decides is reported as skipped. CI runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if "--dry-run" in sys.argv:  # Triton reads this when kernels are defined: before anything imports it
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # kernel_cases: random packed matrices and the error bound

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import MixtralConfig, MixtralForCausalLM  # noqa: E402

import offload_engine  # noqa: E402
from gpu_timing import (TimedCopies, kernel_launches_per_layer, measure_pcie, overlap_ms,  # noqa: E402
                        triton_compiles)

QUANT = {"attention": {"bits": 4, "group_size": 64}, "experts": {"bits": 2, "group_size": 16}}
DEFAULT_CONFIGS = ['{"offload": {"prefetch": 0}}', '{"offload": {"prefetch": 1}}', '{"offload": {"prefetch": 2}}',
                   '{"offload": {"prefetch": 1, "cpu_compute": "auto"}}']


class Report:
    """Checks and timings, printed as they come and written as one JSON file."""

    def __init__(self, device: torch.device, dry_run: bool):
        self.device, self.dry_run = device, dry_run
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none (dry run on CPU)"
        self.data = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "device": gpu,
                     "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores",
                     "torch": torch.__version__, "dry_run": dry_run, "checks": [], "timings": {}, "decode": []}
        if device.type == "cuda":
            self.data["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))

    def check(self, name: str, ok: bool, detail: str, **numbers) -> None:
        self.data["checks"].append({"name": name, "status": "passed" if ok else "failed", "detail": detail,
                                    **numbers})
        print(f"  {'ok' if ok else 'FAILED'}: {name}: {detail}", flush=True)

    def skip(self, name: str, why: str) -> None:
        self.data["checks"].append({"name": name, "status": "skipped", "detail": why})
        print(f"  skipped: {name}: {why}", flush=True)

    def time(self, name: str, seconds: float) -> None:
        self.data["timings"][name] = round(seconds, 4)

    @property
    def failures(self) -> list[str]:
        return [c["name"] for c in self.data["checks"] if c["status"] == "failed"]


def write_model(path: str, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int,
                context: int = 4096, dtype: torch.dtype = torch.float32, seed: int = 0, std: float = 0.04) -> None:
    torch.manual_seed(seed)
    config = MixtralConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                           num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                           num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=context,
                           eos_token_id=None)
    model = MixtralForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, std)
    model.to(dtype).save_pretrained(path)


def load(path: str, r: Report, **config):
    base = {"dtype": "float16", "quant": QUANT, "offload": {"experts_on_device": 2, "prefetch": 1}}
    for key, value in config.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return offload_engine.load(path, config=base, device=r.device, progress=False)


def sync(r: Report) -> None:
    if r.device.type == "cuda":
        torch.cuda.synchronize(r.device)


def dtypes_here(r: Report) -> list[torch.dtype]:
    bf16 = r.device.type == "cpu" or torch.cuda.get_device_capability(r.device) >= (8, 0)
    return [torch.float16, torch.float32] + ([torch.bfloat16] if bf16 else [])


# ---- 1. kernels ----
def kernels_check(r: Report) -> None:
    from kernel_cases import assert_close_to_reference, layout_for, random_packed

    from offload_engine.loader import resolve_dtype
    from offload_engine.kernels.geometry import warm_up_tokens
    from offload_engine.kernels.packing import PackedFormat
    from offload_engine.kernels.triton_kernels import TritonKernels

    kernels = TritonKernels(r.device)
    sms = kernels._sms(r.device)
    shapes = ([(104, 64, 2, 16), (98, 64, 2, 16), (72, 128, 4, 64)] if r.dry_run else  # rows sharing words or not
              [(14336, 4096, 2, 16), (4096, 14336, 2, 16), (4096, 4096, 4, 64), (1024, 4096, 4, 64),
               (998, 4096, 2, 16)])
    failed, cases = 0, 0
    start = time.perf_counter()
    for out_features, in_features, bits, group in shapes:
        for dtype in dtypes_here(r):
            layout = layout_for((out_features, in_features), bits, group, True, dtype)
            buffer = random_packed(layout, seed=bits).to(r.device)
            kernels.warm_up(layout, r.device)
            compiled = triton_compiles()
            for t in sorted(set(warm_up_tokens(PackedFormat.of(layout), sms)) | {17, 33, 64}):
                x = torch.randn(t, in_features, generator=torch.Generator().manual_seed(t)).to(r.device, dtype)
                got = kernels.linear(x, layout, buffer)
                cases += 1
                try:  # the reference kernels and the float64 product, on the device too
                    assert_close_to_reference(got, x, layout, buffer)
                except AssertionError as e:
                    failed += 1
                    r.check(f"kernels {out_features}x{in_features} {bits}-bit {dtype} T={t}", False, str(e))
            if triton_compiles() != compiled:
                r.check(f"no compile after warm-up ({out_features}x{in_features} {dtype})", False,
                        f"{triton_compiles() - compiled} Triton compile(s) after warm-up")
    r.time("kernel exactness", time.perf_counter() - start)
    r.check("Triton kernels equal the reference kernels on the device", failed == 0,
            f"{cases - failed} of {cases} (matrix, dtype, tokens) cases within the reference's rounding", cases=cases)
    if r.device.type == "cuda" and torch.bfloat16 not in dtypes_here(r):
        with warnings.catch_warnings(record=True):
            runs_as = resolve_dtype(offload_engine.load_config("cpu"), r.device).dtype
        refused = kernels.supports(layout_for((64, 64), 2, 16, True, torch.bfloat16))
        r.check("bfloat16 below compute capability 8.0 runs as float16", runs_as == "float16" and bool(refused),
                f"a bfloat16 config runs as {runs_as}; the Triton kernels: {refused}")


# ---- 2. engine exactness ----
def logits_and_routing(engine, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The engine's logits [1, T, V] for `ids` [1, T] and the experts each position was routed to, per MoE layer,
    sorted: [L, T, K] (read where the family's block hands them to the offloaded experts)."""
    routes = {layer: [] for layer in engine.model.moe_layers}  # per layer, one [T', K] per call (prefill chunks)
    hooks = [engine.model.layers[layer].mlp.experts.register_forward_pre_hook(
        lambda module, args, layer=layer: routes[layer].append(args[1].sort(-1).values.cpu()))
        for layer in routes]
    try:
        logits = engine.logits(ids)
    finally:
        for hook in hooks:
            hook.remove()
    return logits, torch.stack([torch.cat(chunks) for chunks in routes.values()])


def engine_check(r: Report, tmp: Path) -> None:
    path = tmp / "exact"
    small = dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=256) if r.dry_run else \
        dict(hidden=1024, intermediate=3584, layers=4, heads=16, kv_heads=4, vocab=32000)
    write_model(str(path), **small)
    for dtype, bound in [("float32", 1e-4), ("float16", 2e-2), ("bfloat16", 5e-2)]:
        if getattr(torch, dtype) not in dtypes_here(r):
            continue
        engines = {kind: load(str(path), r, dtype=dtype, kernels=kind) for kind in ("fused", "reference")}
        for length in (40, 80):  # attention on tl.dot (17-64 tokens) and on dequantize + matmul
            ids = torch.randint(0, small["vocab"], (1, length), generator=torch.Generator().manual_seed(length))
            (fused, fused_routes), (reference, reference_routes) = (
                logits_and_routing(engines[k], ids) for k in ("fused", "reference"))
            # In half precision two experts' router logits can tie and round either way: such a position takes
            # other experts (and so do later positions' attention to it, a little). Compare where routing agrees.
            agree = (fused_routes == reference_routes).all(-1).all(0)  # [T]
            ties = int((~agree).sum())
            diff = (fused - reference)[0, agree].abs().max().item() / (reference.abs().max().item() + 1e-12)
            r.check(f"engine {dtype}: fused = reference kernels, {length}-token prompt",
                    diff < bound and ties <= length // 20,
                    f"max |fused - reference| / max |logits| = {diff:.1e} (< {bound:g}) where routing agrees; "
                    f"{ties} of {length} positions routed otherwise (<= {length // 20}, router ties)",
                    relative_error=diff, routing_ties=ties)
        prompt = list(range(1, 6))
        same = engines["fused"].generate_ids(prompt, max_new_tokens=12) == \
            engines["reference"].generate_ids(prompt, max_new_tokens=12)
        if dtype == "float32":
            r.check("engine float32: fused and reference greedy tokens equal", same, "12 tokens")
        for engine in engines.values():
            engine.close()
    exact = {"dtype": "float32", "quant": {"attention": {"bits": None}, "experts": {"bits": None}},
             "offload": {"experts_on_device": 2, "prefetch": 2}}
    engine = offload_engine.load(str(path), config=exact, device=r.device, progress=False)
    torch.backends.cuda.matmul.allow_tf32 = False
    reference = MixtralForCausalLM.from_pretrained(path, dtype=torch.float32, experts_implementation="eager").eval()
    ids = torch.randint(0, small["vocab"], (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(ids).logits.float()
    diff = (engine.logits(ids) - expected).abs().max().item()
    r.check("unquantized float32 engine = transformers' Mixtral", diff < 1e-3, f"max |diff| = {diff:.1e}")
    engine.cache.check_invariant()
    engine.close()


# ---- 3. conversion on the device ----
def conversion_check(r: Report, tmp: Path) -> None:
    from offload_engine import quantize_checkpoint

    source, dst = tmp / "exact", tmp / "converted"
    start = time.perf_counter()
    quantize_checkpoint(source, dst, {"dtype": "float16", "quant": QUANT}, progress=False, device=r.device)
    r.time("quantize_checkpoint", time.perf_counter() - start)
    where = json.loads((dst / "offload_manifest.json").read_text())["quantized_on"]
    converted, direct = offload_engine.load(dst, device=r.device, progress=False), load(str(source), r)
    same = converted.generate_ids([1, 2, 3], max_new_tokens=8) == direct.generate_ids([1, 2, 3], max_new_tokens=8)
    r.check("quantize_checkpoint on the device", where == r.device.type and same,
            f"quantized_on {where}; decodes as load(source): {same}")
    converted.close()
    direct.close()


# ---- 4. long prefill ----
def long_prefill_check(r: Report, tmp: Path) -> None:
    from offload_engine.memory import plan_memory

    context = 256 if r.dry_run else 4096
    path = tmp / "long"
    write_model(str(path), hidden=256 if r.dry_run else 2048, intermediate=256 if r.dry_run else 1024, layers=2,
                heads=32, kv_heads=8, vocab=1000 if r.dry_run else 32000, context=context)
    engine = load(str(path), r, max_context=context)
    plan = plan_memory(engine.model.config, engine.config, free_bytes=1 << 50, context=context)
    prompt = torch.randint(0, engine.model.config.vocab_size, (context - 16,)).tolist()
    if r.device.type == "cuda":
        sync(r)
        torch.cuda.reset_peak_memory_stats(r.device)
    start = time.perf_counter()
    engine.generate_ids(prompt, max_new_tokens=4)
    sync(r)
    r.time(f"prefill {len(prompt)} tokens + 4 decode", time.perf_counter() - start)
    if r.device.type != "cuda":
        r.skip("long prefill within the memory plan", "device memory is measured on a GPU")
    else:
        peak = torch.cuda.max_memory_allocated(r.device)
        r.check("long prefill within the memory plan", peak <= plan.total_bytes,
                f"{len(prompt)}-token prompt: peak {peak / 2**30:.2f} GiB allocated, plan "
                f"{plan.total_bytes / 2**30:.2f} GiB ({plan.summary()})", peak_bytes=peak, plan_bytes=plan.total_bytes)
    engine.close()


# ---- 5. page-locked host memory and PCIe ----
def pinned_check(r: Report) -> dict:
    from offload_engine.expert_cache import CacheAllocation
    from offload_engine.experts import ExpertLayout
    from offload_engine.memory import available_host_bytes
    from offload_engine.streams import pin, unpin

    if r.device.type != "cuda":
        r.skip("5.9 GiB page-locked at its exact size", "page-locking needs CUDA")
        return {}
    cfg = offload_engine.load_config("t4-16gb")  # Mixtral on a T4: 5 experts per layer on the GPU, 3 locked
    expert = ExpertLayout.build(4096, 14336, cfg.quant.experts, cfg.torch_dtype).nbytes  # 63.3 MiB
    nbytes = CacheAllocation.build(32, 8, expert, 5, cfg.offload.prefetch, cuda=True).locked_host_bytes
    if available_host_bytes() < nbytes + 2**30:
        r.skip("5.9 GiB page-locked at its exact size", f"{available_host_bytes() / 2**30:.1f} GiB of RAM available")
        return measure_pcie(torch.empty(2**28, dtype=torch.uint8).pin_memory(), r.device)
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    start = time.perf_counter()
    locked = pin(buffer, "the check's buffer")
    r.time("cudaHostRegister 5.9 GiB", time.perf_counter() - start)
    try:
        pcie = measure_pcie(buffer[: 2**29], r.device)
        r.check("5.9 GiB page-locked at its exact size", locked == nbytes and buffer.is_pinned(),
                f"{locked / 2**30:.2f} GiB in one registration; pinned: {buffer.is_pinned()}", locked_bytes=locked)
    finally:
        unpin(buffer)
    return pcie


# ---- 6-8. the speed model: copy streams, syncs, decode ----
def speed_checks(r: Report, tmp: Path, configs: list[str], new_tokens: int, pcie: dict) -> None:
    from offload_engine.config import ConfigError
    from offload_engine import quantize_checkpoint

    path = tmp / "speed"
    shape = dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=256) if r.dry_run else \
        dict(hidden=2048, intermediate=7168, layers=8, heads=16, kv_heads=4, vocab=32000)
    write_model(str(path), **shape, dtype=torch.float16)
    converted = tmp / "speed-converted"  # quantized once: each config then loads its bytes (offload.* may differ)
    quantize_checkpoint(path, converted, {"dtype": "float16", "quant": QUANT}, progress=False, device=r.device)
    prompt = torch.randint(0, shape["vocab"], (16,), generator=torch.Generator().manual_seed(1)).tolist()
    kernel_gbs = gemv_gbs(r)
    for text in configs:
        row = {"config": json.loads(text)}
        fixed_by_conversion = {"dtype", "quant"} & set(row["config"])
        try:
            engine = load(str(path if fixed_by_conversion else converted), r, **row["config"])
        except ConfigError as e:  # e.g. a key of a mode not built yet
            row["error"] = str(e)
            r.data["decode"].append(row)
            print(f"  config {text}: not run: {e}")
            continue
        engine.generate_ids(prompt, max_new_tokens=4)  # warm-up
        engine.reset_stats()
        timed = TimedCopies.attach(engine.cache)
        sync(r)
        start = time.perf_counter()
        engine.generate_ids(prompt, max_new_tokens=new_tokens)
        sync(r)
        seconds = time.perf_counter() - start
        overall = engine.stats()["overall"]
        timeline = timed.intervals()  # ms since the timing began, per stream: the report keeps them
        busy, both = timed.busy_ms(), overlap_ms(timeline)
        timed.detach()
        stats = engine.stats()
        row.update(tokens_per_s=new_tokens / seconds, hit_rate=overall["hit_rate"],
                   cpu_compute=stats["cpu_compute"], cpu_computed_per_token=overall["cpu_computed"] / new_tokens,
                   h2d_bytes_per_token=overall["bytes_h2d"] / new_tokens,
                   d2h_bytes_per_token=overall["bytes_d2h"] / new_tokens, copy_in_ms=busy["copy-in"],
                   write_back_ms=busy["write-back"], overlap_ms=both,
                   launches_per_layer=kernel_launches_per_layer(engine, r.device), kernel_gbs=kernel_gbs, **pcie,
                   timeline_ms={kind: [[round(a, 4), round(b, 4)] for a, b in spans]
                                for kind, spans in timeline.items()})
        r.data["decode"].append(row)
        print(f"  config {text}: {row['tokens_per_s']:.2f} tok/s, hit rate {row['hit_rate']:.1%}, copy-ins "
              f"{busy['copy-in']:.1f} ms, write-backs {busy['write-back']:.1f} ms, overlapping {both:.1f} ms, "
              f"{row['cpu_computed_per_token']:.1f} experts per token on the CPU ({row['cpu_compute']})")
        if r.device.type != "cuda":
            r.skip(f"copy-ins and write-backs overlap ({text})", "copies on the CPU are synchronous")
        elif busy["copy-in"] and busy["write-back"]:
            r.check(f"copy-ins and write-backs overlap ({text})", row["overlap_ms"] > 0,
                    f"{row['overlap_ms']:.2f} ms of both streams busy at once (copy-ins {busy['copy-in']:.1f} ms, "
                    f"write-backs {busy['write-back']:.1f} ms)", overlap_ms=row["overlap_ms"])
        engine.close()
    syncs_check(r, str(converted), shape["layers"])


def gemv_gbs(r: Report) -> float | None:
    """The fused GEMV's bandwidth on the packed bytes of Mixtral's w1 (2-bit g16), one token, float16."""
    if r.device.type != "cuda":
        return None
    from kernel_cases import layout_for, random_packed

    from offload_engine.kernels.triton_kernels import TritonKernels

    kernels, layout = TritonKernels(r.device), layout_for((14336, 4096), 2, 16, True, torch.float16)
    buffer, x = random_packed(layout).cuda(), torch.randn(1, 4096, dtype=torch.float16, device=r.device)
    kernels.warm_up(layout, r.device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(50):
        kernels.linear(x, layout, buffer)
    end.record()
    sync(r)
    seconds = start.elapsed_time(end) / 1e3 / 50
    r.time("GEMV 14336x4096 2-bit, 1 token", seconds)
    return layout.nbytes / seconds / 1e9


def syncs_check(r: Report, path: str, layers: int) -> None:
    from collections import Counter

    if r.device.type != "cuda":
        r.skip("no host sync beyond the counted ones", "sync debug mode needs CUDA")
        return
    engine = load(path, r)
    steps, where = 8, Counter()
    prompt = list(range(1, 17))
    engine.generate_ids(prompt, max_new_tokens=2)  # warm-up
    engine.reset_stats()
    root = str(Path(offload_engine.__file__).resolve().parent)

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack() if f.filename.startswith(root)]
        where[f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else filename] += 1

    sync(r)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            engine.generate_ids(prompt, max_new_tokens=steps + 1)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    reported = engine.stats()["host_syncs"]
    total = sum(where.values())
    r.check("no host sync beyond the counted routing reads and the sampler's", total <= reported + steps + 1,
            f"{total} syncs, {reported} counted + {steps + 1} sampler reads: {dict(where.most_common(5))}")
    r.check("one routing read per layer per token, plus the layer-0 guess", reported == (steps + 1) * (layers + 1),
            f"{reported} = {steps + 1} x {layers + 1}")
    engine.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", default="gpu_check.json", help="the JSON report (default: %(default)s)")
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS,
                        help="config overrides to time, as JSON (default: prefetch 0, 1, 2)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--dry-run", action="store_true", help="run every check's code on the CPU, tiny shapes")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        print("error: this check needs a CUDA GPU (or --dry-run on the CPU)", file=sys.stderr)
        return 2
    for text in args.configs:
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            print(f"error: --configs {text!r} is not JSON ({e})", file=sys.stderr)
            return 2
    transformers.utils.logging.disable_progress_bar()  # the check's own models: no bars for writing and reading them
    r = Report(torch.device("cpu" if args.dry_run else "cuda"), args.dry_run)
    print(f"command: {r.data['command']}\nmachine: {r.data['machine']}, device {r.data['device']}, torch "
          f"{torch.__version__}")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name, run in [("kernels", kernels_check), ("engine", engine_check), ("conversion", conversion_check),
                          ("long prefill", long_prefill_check)]:
            print(f"\n{name}", flush=True)
            guarded(r, name, lambda: run(r) if run is kernels_check else run(r, Path(tmp)))
        print("\npage-locked memory, PCIe", flush=True)
        pcie = guarded(r, "page-locked memory", lambda: pinned_check(r)) or {}
        print("\ncopy streams, syncs, decode", flush=True)
        guarded(r, "speed", lambda: speed_checks(r, Path(tmp), args.configs, args.new_tokens, pcie))
    r.time("total", time.perf_counter() - start)
    Path(args.report).write_text(json.dumps(r.data, indent=2, default=str) + "\n")
    print(f"\nreport: {args.report}")
    if r.failures:
        print(f"{len(r.failures)} check(s) failed: " + "; ".join(r.failures))
        return 1
    print("all checks passed" + (" (dry run: GPU-only checks skipped)" if args.dry_run else ""))
    return 0


def guarded(r: Report, name: str, run):
    """Run one section; an exception fails it (with its traceback in the report) and the others still run."""
    try:
        return run()
    except Exception as e:
        r.check(name, False, f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        if r.device.type == "cuda":
            torch.cuda.empty_cache()
        return None


if __name__ == "__main__":
    sys.exit(main())
