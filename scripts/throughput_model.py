#!/usr/bin/env python
"""Modelled decode tokens/s of offloaded MoE models: a timed replay of the engine's own expert cache over real
routing traces (offload_engine/replay.py), on stated GPUs. Labelled "modelled (timed replay of the engine's cache)":
no GPU runs here.

    python scripts/throughput_model.py [TRACE ...] [--markdown] [--precision 0.8] [--host-ms 0.5]
        [--sensitivity] [--break-even] [--batch 1 2 4 8] [--hybrid] [--gpu t4] [--experts-on-device K] [--tokens N]

TRACE: routing traces in the shared npz format (Mixtral-8x7B; default: ../shared/data/routing/*.npz beside a
checkout), or a profiler report of any model (`python scripts/profile_cache.py MODEL --out report.json`): its own
model is then replayed, with the costs the report records, at the experts per layer it ran with (or
--experts-on-device) on --gpu. Without TRACE and without the shared traces this says what to pass.

--hybrid adds copy-only against hybrid execution (`offload.cpu_compute: auto` and `always`, issue 23) per GPU and
CPU profile, each CPU's kernel time scaled from this machine's measurement (offload_engine/throughput.py, CPUS).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import MixtralConfig  # noqa: E402

from offload_engine.config import load_config  # noqa: E402
from offload_engine.errors import UsageError, add_debug_flag, user_errors  # noqa: E402
from offload_engine.replay import ModelCosts  # noqa: E402
from offload_engine.simulate import load_traces, routing_from_report  # noqa: E402
from offload_engine.throughput import (CPUS, GPUS, HAND_OVER_SHARE, HOST_RAM, MEASURED_CPU,  # noqa: E402
                                       ROUND_TRIP_MS, break_even_precision, costs_of, cpu_tier, modelled, plan_on,
                                       shared_traces, speeds_of, with_speeds)

REFERENCE = {"full": 2.09, "lru": 1.57, "naive": 0.66}  # the reference system on a Colab T4, measured
# (GPU, packaged config, host RAM available) for Mixtral-8x7B at 4-bit attention / 2-bit experts
SETUPS = [("t4", "t4-16gb", "Colab (12.7 GB)"), ("t4", "t4-16gb", "Kaggle T4 VM (29 GB)"),
          ("rtx3060", "12gb", "desktop (32 GB)"), ("rtx3090", "24gb", "desktop (32 GB)")]
HYBRID_GPUS = ("t4", "rtx3060")  # the RTX 3090 keeps every expert on the device: no misses
# Hybrid sensitivity, RTX 3060 beside the 8-core desktop: (label, Speeds changes, CpuSpeeds changes, CPU ms factor,
# replay options: no prefetch and batch 1 unless said)
HYBRID_SENSITIVITY = [("the profiles' inputs", {}, {}, 1.0, {}), ("CPU kernel 1.2x slower", {}, {}, 1.2, {}),
                      ("CPU kernel 1.35x slower", {}, {}, 1.35, {}), ("CPU kernel 1.5x slower", {}, {}, 1.5, {}),
                      ("CPU kernel 2x slower", {}, {}, 2.0, {}),
                      ("a T4 (PCIe gen3) instead, CPU kernel 2.5x slower", {}, {}, 2.5, dict(gpu="t4")),
                      ("a T4 (PCIe gen3) instead, CPU kernel 3x slower", {}, {}, 3.0, dict(gpu="t4")),
                      ("round trip 0.3 ms", {}, dict(round_trip_ms=0.3), 1.0, {}),
                      ("host hand-over 0.3 ms per layer", {}, dict(call_host_ms=0.3), 1.0, {}),
                      ("host 1.0 ms/layer", dict(host_ms_per_layer=1.0), {}, 1.0, {}),
                      ("PCIe gen3 (11.5 GB/s each way)", dict(h2d_gbps=11.5, d2h_gbps=11.5), {}, 1.0, {}),
                      ("the config's prefetch and gate (guesses right --precision of the time)", {}, {}, 1.0,
                       dict(prefetch=None)),
                      ("batches of 4 sequences (aggregate tok/s)", {}, {}, 1.0, dict(batch=4)),
                      ("oversubscribed (kernel on every hardware thread)", {}, dict(oversubscribed=True), 1.0, {})]
SENSITIVITY = [("T4 inputs", {}), ("PCIe 9 GB/s each way", dict(h2d_gbps=9, d2h_gbps=9)),
               ("PCIe 6 GB/s each way", dict(h2d_gbps=6, d2h_gbps=6)),
               ("both directions share 11.5 GB/s", dict(duplex_gbps=11.5)),
               ("kernels at 50 % of 320 GB/s", dict(kernel_gbps=160)),
               ("host 1.0 ms/layer", dict(host_ms_per_layer=1.0)), ("host 1.5 ms/layer", dict(host_ms_per_layer=1.5)),
               ("6 GB/s and host 1.5 ms/layer", dict(h2d_gbps=6, d2h_gbps=6, host_ms_per_layer=1.5))]
PRECISIONS = (0.6, 0.7, 0.8, 0.9, 0.95, 0.97, 1.0)


class Model:
    """The traces, the model's costs and how it is set up (a profiler report's own model, or Mixtral-8x7B)."""

    def __init__(self, paths: list[Path], args: argparse.Namespace):
        self.report = None
        if any(p.suffix.lower() == ".json" for p in paths):
            if len(paths) != 1:
                raise UsageError("give one profiler report (its model's costs are in it), or npz traces only")
            self.report = read_report(paths[0])
            self.traces = {paths[0].stem: routing_from_report(self.report)}
            self.costs = ModelCosts(**self.report["costs"])
            self.cfg = load_config(self.report["config"])
            if args.experts_on_device is not None:
                self.cfg = self.cfg.replace(experts_on_device=args.experts_on_device)
            measured = self.report.get("timing", {}).get("host_ms_per_layer")
            self.name = f"{self.report['model']} (profiler report {paths[0]}" + (
                f"; host ms per layer measured there: {measured:.2f}, {self.report['timing']['host_timing']})"
                if measured is not None else ")")
        else:
            self.traces = load_traces(*paths) if paths else shared_traces()
            self.costs = costs_of(MixtralConfig(), load_config("t4-16gb"))
            self.cfg = None
            self.name = "Mixtral-8x7B, 4-bit attention / 2-bit g16 experts"
        if args.tokens:
            self.traces = cut(self.traces, args.tokens)
        self.tokens = sum(len(t) for t in self.traces.values())

    @property
    def experts(self) -> int:
        return self.report["num_experts"] if self.report is not None else 8

    def setups(self, args) -> list[tuple[str, object, object, int, bool]]:
        """(label, GPU, config, k, write-backs) per setup: the report's own, or Mixtral's as the engine plans it."""
        if self.report is not None:
            k = min(self.cfg.offload.experts_on_device, self.experts)
            return [(GPUS[args.gpu].name, GPUS[args.gpu], self.cfg, k, args.write_back == "always" and k < self.experts)]
        out = []
        for gpu_key, cfg_name, ram in SETUPS:
            cfg, gpu = load_config(cfg_name), GPUS[gpu_key]
            plan = plan_on(gpu, cfg, host_bytes=HOST_RAM[ram])
            out.append((f"{gpu.name}, {ram}", gpu, cfg, plan.experts_on_device, plan.write_back))
        return out

    def hybrid_setup(self, args, gpu_key: str, ram: str) -> tuple[str, object, object, int, bool]:
        """The hybrid table's setup: the report's own (on --gpu), or Mixtral's as the engine plans it on `gpu_key`
        beside the CPU's RAM."""
        if self.report is not None:
            return self.setups(args)[0]
        gpu_key, cfg_name, _ = next(setup for setup in SETUPS if setup[0] == gpu_key)
        cfg, gpu = load_config(cfg_name), GPUS[gpu_key]
        plan = plan_on(gpu, cfg, host_bytes=HOST_RAM[ram])
        return f"{gpu.name}, {ram}", gpu, cfg, plan.experts_on_device, plan.write_back

    def reference(self, args, write_back: bool):
        """The sensitivity tables' setup: the report's own, or the T4 with t4-16gb at auto k; write-backs forced."""
        label, gpu, cfg, k, _ = self.setups(args)[0]
        return gpu, cfg, k, write_back and k < self.experts


def read_report(path: Path) -> dict:
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        routing_from_report(report)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UsageError(f"cannot read profiler report {path} ({e}); record one with `python scripts/profile_cache.py "
                         f"MODEL --out report.json`") from e
    if "costs" not in report:
        raise UsageError(f"{path} has no 'costs' (written by an older profile_cache.py): record it again with "
                         f"`python scripts/profile_cache.py MODEL --out report.json`")
    return report


def cut(traces: dict, tokens: int) -> dict:
    """The first `tokens` tokens of the traces, taken in turn from each problem."""
    out, left = {}, tokens
    for name, trace in traces.items():
        if left <= 0:
            break
        out[name], left = trace[:left], left - len(trace[:left])
    return out


def ms(result, seconds: float) -> str:
    return f"{result.per_token_ms(seconds):.1f}"


def main_table(model: Model, args, bar) -> list[str]:
    lines = ["| setup | k | write-backs | prefetch | hit % | copies / token | write-backs / token | busy ms/token: "
             "H2D, D2H, both at once, kernels, host | critical path ms/token: H2D, D2H, kernels, host | tok/s |",
             "|---|---:|---|---|---:|---:|---:|---|---|---:|"]
    for label, gpu, cfg, k, write_back in model.setups(args):
        speeds = speeds_of(gpu, host_ms_per_layer=args.host_ms, precision=args.precision)
        gate = cfg.offload.prefetch_min_precision
        rows = [("none", dict(prefetch=0))]
        if cfg.offload.prefetch and k < model.experts:
            rows += [(f"{cfg.offload.prefetch}/layer, p={args.precision:g}, gate {gate:g}", {}),
                     (f"{cfg.offload.prefetch}/layer, p={args.precision:g}, every guess copied", dict(min_precision=0))]
        for name, options in rows:
            r = modelled(model.traces, model.costs, speeds, cfg, k, write_back, **options)
            bar.update()
            s, b, c = r.stats, r.busy_s, r.critical_s
            lines.append(f"| {label} | {k} | {'yes' if write_back else 'no'} | {name} | "
                         f"{100 * s['hits'] / s['lookups']:.1f} | {r.copies_per_token:.2f} | "
                         f"{r.write_backs_per_token:.2f} | {ms(r, b['h2d'])}, {ms(r, b['d2h'])}, "
                         f"{ms(r, r.both_copying_s)}, {ms(r, b['compute'])}, {ms(r, b['host'])} | {ms(r, c['h2d'])}, "
                         f"{ms(r, c['d2h'])}, {ms(r, c['compute'])}, {ms(r, c['host'])} | **{r.tokens_per_s:.2f}** |")
    return lines


def sensitivity_table(model: Model, args, bar) -> list[str]:
    gpu, cfg, k, _ = model.reference(args, True)
    gate = cfg.offload.prefetch_min_precision
    lines = [f"| inputs (the rest as the T4 row) | swap, no prefetch | swap, prefetch gate {gate:g} | no write-backs, "
             f"no prefetch | no write-backs, prefetch gate {gate:g} | break-even precision (every guess copied) |",
             "|---|---:|---:|---:|---:|---:|"]
    for label, changes in SENSITIVITY:
        speeds = with_speeds(speeds_of(gpu, host_ms_per_layer=args.host_ms, precision=args.precision), **changes)
        rates = []
        for write_back in (True, False):
            for options in (dict(prefetch=0), {}):
                rates.append(modelled(model.traces, model.costs, speeds, cfg, k, write_back and k < model.experts,
                                      **options).tokens_per_s)
                bar.update()
        even = "-"
        if args.break_even:
            value = break_even_precision(lambda p: modelled(model.traces, model.costs, with_speeds(speeds, precision=p),
                                                            cfg, k, True, min_precision=0).tokens_per_s, rates[0])
            bar.update(8)
            even = "never" if value is None else f"{value:.2f}"
        lines.append(f"| {label} | " + " | ".join(f"{x:.2f}" for x in rates) + f" | {even} |")
    return lines


def precision_table(model: Model, args, bar) -> list[str]:
    gpu, cfg, k, write_back = model.reference(args, True)
    gate = cfg.offload.prefetch_min_precision
    speeds = speeds_of(gpu, host_ms_per_layer=args.host_ms)
    off = modelled(model.traces, model.costs, speeds, cfg, k, write_back, prefetch=0).tokens_per_s
    bar.update()
    lines = [f"| guess precision | no prefetch | prefetch, gate {gate:g} | prefetch, every guess copied |",
             "|---:|---:|---:|---:|"]
    for p in PRECISIONS:
        rates = [modelled(model.traces, model.costs, with_speeds(speeds, precision=p), cfg, k, write_back,
                          **options).tokens_per_s for options in ({}, dict(min_precision=0))]
        bar.update(2)
        lines.append(f"| {p:g} | {off:.2f} | {rates[0]:.2f} | {rates[1]:.2f} |")
    return lines


def hybrid_table(model: Model, args, bar) -> list[str]:
    """Copy-only against hybrid execution, per GPU and CPU: every run at the CPU's own host ms per layer."""
    lines = ["| GPU, host RAM | CPU | k | write-backs | host ms/layer | CPU ms/expert (1 token) | copy ms/expert | "
             "copy-only tok/s | auto tok/s | always tok/s | auto: CPU experts / token, device hit % |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for gpu_key in (args.gpu,) if model.report is not None else HYBRID_GPUS:
        for cpu in CPUS.values():
            label, gpu, cfg, k, write_back = model.hybrid_setup(args, gpu_key, cpu.host_ram)
            speeds = speeds_of(gpu, host_ms_per_layer=cpu.host_ms_per_layer, precision=args.precision)
            copy_only = modelled(model.traces, model.costs, speeds, cfg, k, write_back, prefetch=0)
            auto, always = (modelled(model.traces, model.costs, speeds, cfg, k, write_back, prefetch=0,
                                     cpu=cpu_tier(cpu, mode, model.costs.expert_bytes)) for mode in ("auto", "always"))
            bar.update(3)
            x = lambda r: f"{r.tokens_per_s:.2f} ({r.tokens_per_s / copy_only.tokens_per_s:.2f}x)"  # noqa: E731
            lines.append(f"| {label} | {cpu.name} | {k} | {'yes' if write_back else 'no'} | "
                         f"{cpu.host_ms_per_layer:g} | {cpu.expert_ms(model.costs.expert_bytes)[0][1]:.2f} | "
                         f"{1e3 * model.costs.expert_bytes / gpu.h2d:.2f} | {copy_only.tokens_per_s:.2f} | "
                         f"**{x(auto)}** | {x(always)} | {auto.cpu_per_token:.1f}, {100 * auto.device_hit_rate:.1f} "
                         f"(copy-only {100 * copy_only.device_hit_rate:.1f}) |")
    return lines


def hybrid_sensitivity_table(model: Model, args, bar) -> list[str]:
    cpu = CPUS["desktop8"]
    gpu_key = args.gpu if model.report is not None else "rtx3060"
    label = model.hybrid_setup(args, gpu_key, cpu.host_ram)[0]
    lines = [f"| inputs (the rest as {label} beside the {cpu.name}) | copy-only tok/s | auto tok/s | "
             "auto: CPU experts / token |", "|---|---:|---:|---:|"]
    for name, speed_changes, tier_changes, slower, options in HYBRID_SENSITIVITY:
        options = {"prefetch": 0, **options}
        if "gpu" in options and model.report is not None:  # a report's model runs on --gpu only
            bar.update(2)
            continue
        _, gpu, cfg, k, write_back = model.hybrid_setup(args, options.pop("gpu", gpu_key), cpu.host_ram)
        if options.get("batch", 1) > model.tokens:  # fewer traced tokens than the batch's sequences
            bar.update(2)
            continue
        speeds = with_speeds(speeds_of(gpu, host_ms_per_layer=cpu.host_ms_per_layer, precision=args.precision),
                             **speed_changes)
        tier = cpu_tier(cpu, "auto", model.costs.expert_bytes)
        tier = dataclasses.replace(tier, expert_ms=tuple((t, ms * slower) for t, ms in tier.expert_ms), **tier_changes)
        copy_only = modelled(model.traces, model.costs, speeds, cfg, k, write_back, **options)
        auto = modelled(model.traces, model.costs, speeds, cfg, k, write_back, cpu=tier, **options)
        bar.update(2)
        lines.append(f"| {name} | {copy_only.tokens_per_s:.2f} | **{auto.tokens_per_s:.2f}** "
                     f"({auto.tokens_per_s / copy_only.tokens_per_s:.2f}x) | {auto.cpu_per_token:.1f} |")
    return lines


def hybrid_inputs(model: Model) -> list[str]:
    measured = MEASURED_CPU["float16_ms"]
    return [f"CPU kernel measured here (BENCHMARKS §1, bench_kernels.py --sweep, AMD EPYC Zen 4 VM, "
            f"{MEASURED_CPU['cores']} cores, float16 activations, medians): "
            + "; ".join(f"{isa} build {' / '.join(f'{ms:g}' for ms in values)} ms at 1 / 2 / 3 / 4 tokens"
                        for isa, values in measured.items())
            + f" for a {MEASURED_CPU['expert_bytes'] / 1e6:.1f} MB expert; memory {MEASURED_CPU['read_gbps']:g} GB/s "
            "read (torch.sum, 2 threads)",
            "a profile's CPU ms per expert = max(measured ms x 2 cores / (cores x per-core speed), expert bytes / "
            "its read GB/s), scaled by expert bytes for other models: modelled, not measured",
            f"hybrid: round trip {ROUND_TRIP_MS:g} ms per layer with CPU experts; the host's hand-over "
            f"{HAND_OVER_SHARE:g} x its ms per layer; the host joins the worker before the next layer; "
            "oversubscribed CPUs (the kernel on every hardware thread) stretch the kernel by the hand-over (assumed)",
            ] + [f"CPU {c.name}: {c.cores:g} cores x {c.core_speed:.2f}, {c.isa}, {c.read_gbps:g} GB/s, ms per expert "
                 f"at 1-4 tokens {' / '.join(f'{ms:.2f}' for _, ms in c.expert_ms(model.costs.expert_bytes))}; "
                 f"{c.why}" for c in CPUS.values()]


def batch_table(model: Model, args, bar) -> list[str]:
    lines = ["| write-backs | B (sequences per step) | steps | copies / generated token | write-backs / token | "
             "ms per step | aggregate tok/s | tok/s per sequence |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for mode in (True, False):
        gpu, cfg, k, write_back = model.reference(args, mode)
        speeds = speeds_of(gpu, host_ms_per_layer=args.host_ms, precision=args.precision)
        for b in args.batch:
            r = modelled(model.traces, model.costs, speeds, cfg, k, write_back, batch=b, prefetch=0)
            bar.update()
            lines.append(f"| {'yes' if write_back else 'no'} | {b} | {r.steps} | {r.copies_per_token:.2f} | "
                         f"{r.write_backs_per_token:.2f} | {1e3 * r.seconds / r.steps:.1f} | "
                         f"**{r.tokens_per_s:.2f}** | {r.tokens_per_s / b:.2f} |")
    return lines


@user_errors
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("traces", nargs="*", metavar="TRACE", help="npz traces or one profiler JSON report "
                    "(default: ../shared/data/routing/*.npz)")
    ap.add_argument("--precision", type=float, default=0.8, help="share of guesses that are right (default 0.8)")
    ap.add_argument("--host-ms", type=float, default=0.5, help="host time per MoE layer per step (default 0.5)")
    ap.add_argument("--gpu", choices=sorted(GPUS), default="t4", help="GPU for a profiler report's model, and of "
                    "the sensitivity, precision and batch tables (default t4)")
    ap.add_argument("--experts-on-device", type=int, help="k for a profiler report's model (default: as it ran)")
    ap.add_argument("--write-back", choices=("always", "never"), default="always",
                    help="write-back mode for a profiler report's model (default always)")
    ap.add_argument("--sensitivity", action="store_true", help="also the tables over link, kernel and host inputs "
                    "and over guess precision")
    ap.add_argument("--break-even", action="store_true", help="with --sensitivity: the precision at which copying "
                    "every guess stops losing (8 more replays per row)")
    ap.add_argument("--batch", type=int, nargs="+", metavar="B", help="also model batches of B sequences per step")
    ap.add_argument("--hybrid", action="store_true", help="also copy-only vs hybrid execution (offload.cpu_compute "
                    "auto / always) per GPU and CPU profile, no prefetch")
    ap.add_argument("--tokens", type=int, help="replay only the first N traced tokens (quicker, less exact)")
    ap.add_argument("--markdown", action="store_true", help="markdown bullets around the tables")
    add_debug_flag(ap)
    args = ap.parse_args(argv)
    if not 0 <= args.precision <= 1:
        ap.error(f"--precision must be between 0 and 1, got {args.precision}")
    for name in ("host_ms",):
        if getattr(args, name) < 0:
            ap.error(f"--{name.replace('_', '-')} must be >= 0")
    if any(b < 1 for b in args.batch or []) or (args.tokens is not None and args.tokens < 1):
        ap.error("--batch and --tokens take positive integers")
    paths = [Path(p) for p in args.traces]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise UsageError(f"trace file(s) not found: {', '.join(missing)}; give npz traces or a profiler report "
                         "(python scripts/profile_cache.py MODEL --out report.json)")
    try:
        model = Model(paths, args)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    except (KeyError, ValueError, OSError) as e:
        raise UsageError(f"cannot read the traces ({type(e).__name__}: {e}); give npz traces in the shared format "
                         "or a profiler report") from e
    if args.batch and max(args.batch) > model.tokens:
        ap.error(f"--batch {max(args.batch)} is more than the {model.tokens} traced tokens")

    start = time.perf_counter()
    shown = sys.argv[1:] if argv is None else argv
    n_setups = len(model.setups(args))
    work = 3 * n_setups + (len(SENSITIVITY) * (4 + 8 * args.break_even) + 1 + 2 * len(PRECISIONS)) * args.sensitivity
    work += 2 * len(args.batch or []) + 3 * len(CPUS) * (1 if model.report else len(HYBRID_GPUS)) * args.hybrid
    work += 2 * len(HYBRID_SENSITIVITY) * args.hybrid
    with tqdm(total=work, desc="replays", file=sys.stderr, disable=None) as bar:
        body = ["Per setup: modelled (timed replay of the engine's cache); a GPU's inputs are in its line above.",
                "", *main_table(model, args, bar)]
        if args.sensitivity:
            body += ["", f"Sensitivity ({GPUS[args.gpu].name if model.report else 'T4, t4-16gb, auto k'}; guesses "
                     f"right {args.precision:g} of the time):", "", *sensitivity_table(model, args, bar),
                     "", "Guess precision (same setup, swap):", "", *precision_table(model, args, bar)]
        if args.hybrid:
            body += ["", "Hybrid execution (issue 23): copy-only against `offload.cpu_compute: auto` and `always`, "
                     "modelled (timed replay of the engine's cache with a CPU timeline); no prefetch; each row at its "
                     "CPU's host ms per layer; (x) = over copy-only on the same row:", "",
                     *hybrid_table(model, args, bar), "", "Hybrid sensitivity (`auto`; no prefetch and batch 1 unless "
                     "said):", "", *hybrid_sensitivity_table(model, args, bar)]
        if args.batch:
            body += ["", "Batches of B sequences on the real routing (the traces cut into B runs, stepped together; "
                     "no prefetch):", "", *batch_table(model, args, bar)]
    c = model.costs
    header = [
        f"$ python scripts/throughput_model.py {' '.join(shlex.quote(a) for a in shown)}".rstrip(),
        f"machine: {platform.platform()}, Python {platform.python_version()}, torch {torch.__version__} (no GPU needed: "
        "every figure is modelled by a timed replay of the engine's cache)",
        f"model: {model.name}; traces: {', '.join(model.traces)} ({model.tokens} decode tokens, batch 1 unless said)",
        f"costs: expert {c.expert_bytes / 1e6:.1f} MB per copy, its fused kernels {c.expert_kernel_bytes / 1e6:.1f} MB "
        f"per token; trunk {c.trunk_bytes_per_layer / 1e6:.1f} MB + KV {c.kv_bytes_per_layer / 1e6:.1f} MB per layer; "
        f"lm_head {c.head_bytes / 1e6:.0f} MB per step",
        f"inputs: host {args.host_ms:g} ms per MoE layer (before each routing read); guesses right {args.precision:g} "
        "of the time (one guess per layer, next layer); full-duplex PCIe unless said",
    ] + [f"{g.name}: {g.link}, {g.free_bytes / 2**30:.1f} GiB free; {g.why}" for g in GPUS.values()]
    if args.hybrid:
        header += hybrid_inputs(model)
    if args.markdown:
        header = [f"`{header[0][2:]}`", ""] + [f"- {line}" for line in header[1:]]
    print("\n".join(header + [""] + body))
    print(f"\n(modelled in {time.perf_counter() - start:.0f} s; the reference system measured {REFERENCE['full']} "
          f"tok/s on a Colab T4 with LRU + prefetch, {REFERENCE['lru']} LRU only, {REFERENCE['naive']} naive)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
