"""Decode tokens/s of a Mixtral-8x7B-shaped engine with random weights, replaying real Mixtral routing.

    python scripts/bench_decode.py [--device cuda] [--config t4-16gb] [--kernels auto] [--tokens 64]
                                   [--prefetch 0 1] [--cpu-compute off auto] [--shape mixtral-8x7b|small]
                                   [--trace PATH ...]

The engine is built exactly as `load` builds it (memory plan, `auto` experts per layer, expert cache, kernels,
warm-up) but filled with random bytes instead of a checkpoint: speed does not depend on the values, and no
93 GB download is needed. Each layer's router is replaced by the routing that Mixtral-8x7B-Instruct really chose
for consecutive decode tokens (../shared/data/routing, one problem after another), so the expert cache sees real
locality. The replacement router also answers the speculative calls made one layer early with the true experts,
so prefetch here is an *oracle* (exact guesses): the prefetch rows are an upper bound, the prefetch-0 rows are
plain LRU. `--cpu-compute off auto always` times copy-only against hybrid execution (`offload.cpu_compute`,
issue 23: a miss computed on the CPU from its host copy), each mode a row. Prints the command, machine (GPU and
CPU names), dtype, batch, k, and per run tokens/s, hit rate and copy volume.

`--shape small` (hidden 1024, intermediate 3584, 4 layers, vocab 32000) runs anywhere, e.g. to check the script
on CPU; the Mixtral shape needs ~25 GB of host RAM at k=5 on a 16 GB GPU and a CUDA GPU to be meaningful.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import DynamicCache, MixtralConfig  # noqa: E402

from offload_engine.config import load_config  # noqa: E402
from offload_engine.loader import build_engine  # noqa: E402
from offload_engine.simulate import default_trace_paths, load_traces  # noqa: E402

SHAPES = {"mixtral-8x7b": {}, "small": dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=4)}


def random_source(hf: MixtralConfig, cfg, seed: int = 0):
    """A `build_engine` source that fills the trunk and every expert with random (but finite) values."""
    gen = torch.Generator().manual_seed(seed)

    def sane(buffer: torch.Tensor, layouts) -> torch.Tensor:
        for layout in layouts:  # keep scales small so activations stay finite through 32 layers
            views = layout.views(buffer)
            if "scale_range" in views:
                views["scale_range"][:, 0], views["scale_range"][:, 1] = 1e-3, 1e-6
                views["zero_range"].copy_(torch.tensor([1.0, 1 / 255]))
        return buffer

    def fill(model, layout, progress: bool) -> None:
        small = lambda *shape: torch.randn(*shape, generator=gen) * 0.02  # noqa: E731
        expert = sane(torch.randint(0, 256, (layout.nbytes,), dtype=torch.uint8, generator=gen),
                      layout.matrices.values())
        for tensor in model.anatomy.trunk:
            if tensor.part is None:  # norms at one, the rest (embeddings, lm_head, routers) small
                norm = "norm" in tensor.name
                model.set_tensor(tensor.name, torch.ones(tensor.shape) if norm else small(*tensor.shape))
                continue
            packed = tensor.layout(cfg)
            if packed.spec.bits is None:
                model.set_tensor(f"{tensor.name}.weight", small(*tensor.shape))
            else:
                buffer = torch.randint(0, 256, (packed.nbytes,), dtype=torch.uint8, generator=gen)
                model.set_linear(tensor.name, packed, sane(buffer, [packed]))
        for m in range(len(model.moe_layers)):
            for e in range(model.anatomy.num_experts):
                model.cache.fill(m, e, lambda buffer: buffer.copy_(expert))

    return fill


class ReplayRouter(torch.nn.Module):
    """Stands in for one layer's router: logits that pick the experts real Mixtral picked for the current token.
    The routing and the logit values live on the device, so a call makes no host-to-device copy (a copy from
    pageable memory would block the host, which the real router never does)."""

    def __init__(self, routing: torch.Tensor, layer: int, num_experts: int):
        super().__init__()
        self.routing, self.layer, self.num_experts = routing, layer, num_experts  # routing: [tokens, layers, 2]
        self.values = torch.tensor([2.0, 1.0], device=routing.device)
        self.token = 0  # set by the driver before each forward

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[T, H] -> logits [T, E], weights [T, 2], experts [T, 2], as Mixtral's router returns them."""
        logits = torch.zeros(x.shape[0], self.num_experts, device=x.device, dtype=x.dtype)
        chosen = self.routing[self.token % len(self.routing), self.layer]  # [2], on the device: a view
        logits[:, chosen] = self.values.to(x.dtype)
        weights, experts = torch.topk(torch.softmax(logits.float(), dim=-1), 2, dim=-1)
        return logits, weights / weights.sum(dim=-1, keepdim=True), experts


def routing_from_traces(paths, layers: int, num_experts: int) -> np.ndarray:
    """[tokens, layers, 2] expert ids from the shared traces, problems concatenated; missing records (-1) filled."""
    traces = load_traces(*paths)
    routing = np.concatenate([traces[name] for name in sorted(traces)], axis=0)[:, :layers, :2].astype(np.int64)
    rng = np.random.default_rng(0)
    for t, l in zip(*np.nonzero((routing < 0).any(axis=2))):
        keep = [e for e in routing[t, l] if e >= 0]
        others = [e for e in range(num_experts) if e not in keep]
        routing[t, l] = (keep + list(rng.choice(others, 2 - len(keep), replace=False)))[:2]
    return routing


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "CPU unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", default="t4-16gb")
    parser.add_argument("--kernels", default="auto", choices=["auto", "fused", "reference"])
    parser.add_argument("--shape", default="mixtral-8x7b", choices=sorted(SHAPES))
    parser.add_argument("--experts-on-device", default=None, help="override the config's (an int or auto)")
    parser.add_argument("--prefetch", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--tokens", type=int, default=64, help="decode tokens timed (after 8 warm-up tokens)")
    parser.add_argument("--trace", nargs="*", help="routing npz files (default: ../shared/data/routing/*.npz)")
    parser.add_argument("--cpu-compute", nargs="+", default=["off"], choices=["off", "auto", "always"],
                        help="offload.cpu_compute per run: off = copy-only (default), auto / always = hybrid")
    args = parser.parse_args()
    if args.cpu_compute != ["off"] and not hasattr(load_config(args.config).offload, "cpu_compute"):
        sys.exit("error: --cpu-compute needs the hybrid runtime (offload.cpu_compute, issue 23) in this checkout")
    device = torch.device(args.device)
    hf = MixtralConfig(**SHAPES[args.shape])
    paths = args.trace or default_trace_paths()
    if not paths:
        sys.exit("error: no routing traces: pass --trace FILE.npz (../shared/data/routing is missing)")
    routing = routing_from_traces(paths, hf.num_hidden_layers, hf.num_local_experts)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU"
    print("command:", " ".join([Path(sys.executable).name, *sys.argv]))
    print(f"machine: {platform.machine()}, {cpu_name()}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}")
    print(f"model: {args.shape} shapes, random weights; routing replayed from {len(paths)} trace file(s), "
          f"{len(routing)} tokens; batch 1; {args.tokens} decode tokens after 8 warm-up tokens\n")
    print("| config | dtype | kernels | k | prefetch | cpu_compute | tok/s | hit rate | MB host->device per token |")
    print("|---|---|---|---:|---:|---|---:|---:|---:|")
    for prefetch, cpu_compute in [(p, c) for p in args.prefetch for c in args.cpu_compute]:
        cfg = load_config(args.config)
        overrides = {"prefetch": prefetch}
        if cpu_compute != "off":
            overrides["cpu_compute"] = cpu_compute
        if args.experts_on_device:
            k = args.experts_on_device
            overrides["experts_on_device"] = k if k == "auto" else int(k)
        cfg = dataclasses.replace(cfg.replace(**overrides), kernels=args.kernels)
        engine = build_engine(hf, cfg, device, random_source(hf, cfg), progress=False)
        routers = engine.model.routers  # speculation calls them too
        routing_on_device = torch.as_tensor(routing, device=device)
        for l, layer in enumerate(engine.model.layers):
            layer.mlp.gate = routers[l] = ReplayRouter(routing_on_device, l, hf.num_local_experts)
        ids = list(range(1, 9))
        kv = DynamicCache(config=hf)
        seconds, token = 0.0, 0
        for step in range(8 + args.tokens):
            for router in routers:
                router.token = step
            if step == 8:
                engine.reset_stats()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            engine.model(torch.tensor([ids[-1:] if step else ids]), kv)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if step >= 8:
                seconds += time.perf_counter() - start
                token += 1
        stats = engine.stats()["overall"]
        print(f"| {args.config} | {cfg.dtype} | {engine.kernels.name} | {engine.cache.k} | {prefetch} "
              f"{'(oracle)' if prefetch else ''} | {cpu_compute} | {token / seconds:.2f} | "
              f"{100 * stats['hit_rate']:.1f} % | {stats['bytes_h2d'] / token / 1e6:.0f} |")
        engine.close()  # waits for the cache's copies, frees its slots and unlocks its host memory
        del engine
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
