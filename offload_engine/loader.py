"""From a model's name to a running `Engine`, in one direction:

    name --resolve_model_dir--> directory --(config.json, engine config, weights)--> build_engine --> Engine

`load` resolves the source (a local directory, the packaged demo, a hub repo), then the configs (the checkpoint's
config.json and the engine config: the caller's, the demo's own set-up, or a pre-quantized checkpoint's), picks
how the weights are read (`checkpoint_loader`: full precision, quantized tensor by tensor; or prequantized.py's
loader: packed bytes straight into place), and only then builds: `build_engine` allocates the expert cache and the
trunk and lets the weight loader fill them. Nothing below imports anything above it.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .anatomy import Anatomy
from .checkpoint import DEMO_DIR, MANIFEST, SafetensorsCheckpoint, read_config, resolve_model_dir
from .config import ConfigError, ConfigLike, EngineConfig, load_config
from .engine import Engine
from .expert_tensors import read_expert_tensor
from .experts import ExpertLayout, expert_forward
from .hybrid import CpuTier, StaticExperts, calibrate
from .kernels import REFERENCE, Kernels, bfloat16_problem, select_kernels, warm_up
from .memory import resolve_offload
from .model import OffloadedModel
from .prequantized import open_prequantized
from .expert_cache import ExpertCache
from .quantize import MatrixLayout, QuantizationError, quantize_matrix
from .tokenization import load_tokenizer

# The demo's one set-up, wherever it is named (`demo`, --demo, its directory; offload-chat, offload-serve, the
# scripts, load()): the cpu config with half of each layer's experts offloaded and prefetch on, so that the expert
# cache really works.
DEMO_OFFLOAD = {"experts_on_device": 4, "prefetch": 1, "policy": "lru"}


def load(model: str | os.PathLike, config: ConfigLike = None, device: str | torch.device | None = None,
         progress: bool = True) -> Engine:
    """Load an MoE checkpoint of a supported family and build the engine.

    `model`: a local directory (full precision, or pre-quantized by `quantize_checkpoint`: loads without
    re-quantizing), "demo" (the model shipped in the package), or a hub repo id (downloaded into the hub cache).
    `config`: a packaged config name, a YAML path, a dict or an EngineConfig; None: the defaults (the demo's own
    set-up for the demo; a pre-quantized checkpoint's own config, of which a caller may change only offload.*,
    max_context, max_batch and kernels)."""
    device = resolve_device(device)
    if config is not None:
        load_config(config)  # a bad config fails before anything is downloaded or read
    model_dir = resolve_model_dir(model)
    if config is None and is_demo(model_dir):
        config = demo_config(device)
    if (model_dir / MANIFEST).exists():
        hf_config, cfg, weights = open_prequantized(model_dir, config)
    else:
        hf_config, cfg = read_config(model_dir), resolve_dtype(load_config(config), device)
        weights = checkpoint_loader(SafetensorsCheckpoint(model_dir), hf_config, cfg, device)
    engine = build_engine(hf_config, cfg, device, weights, progress)
    engine.tokenizer = load_tokenizer(model_dir)
    engine.model_dir = model_dir
    return engine


# ---- resolving: where, what, with which settings ----
def resolve_device(device: str | torch.device | None) -> torch.device:
    """`device`, or CUDA when there is a GPU; a CUDA device that is not there is an error now, not at the first copy."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was requested, but torch sees no CUDA GPU: use the cpu device "
                         f"(--device cpu, device='cpu')")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r} was requested, but there are only {torch.cuda.device_count()} "
                         f"CUDA device(s)")
    return device


def is_demo(model_dir: Path) -> bool:
    return model_dir.resolve() == DEMO_DIR


def demo_config(device: torch.device) -> dict:
    """The demo's set-up as a config dict: cpu.yaml with DEMO_OFFLOAD; float16 on a GPU without fast bfloat16."""
    config = {**load_config("cpu").to_dict(), "offload": dict(DEMO_OFFLOAD)}
    if bfloat16_problem(device) is not None:  # e.g. a T4: no bfloat16 arithmetic
        config["dtype"] = "float16"
    return config


def resolve_dtype(cfg: EngineConfig, device: torch.device) -> EngineConfig:
    """The compute dtype that runs fast on `device`: bfloat16 on a GPU before Ampere (compute capability < 8.0, e.g.
    a T4) becomes float16, with one warning, since the fused kernels cannot compute in bfloat16 there and the
    reference kernels are several times slower. `kernels: reference` keeps bfloat16 (the slow path, asked for)."""
    why_not = bfloat16_problem(device) if cfg.dtype == "bfloat16" and cfg.kernels != "reference" else None
    if why_not is None:
        return cfg
    warnings.warn(f"dtype bfloat16 runs as float16 on {device}: {why_not} (set dtype: float16 to silence this, "
                  f"or kernels: reference to keep bfloat16)", RuntimeWarning, stacklevel=3)
    return replace(cfg, dtype="float16")


# ---- reading full-precision weights (pre-quantized ones: prequantized.py) ----
def checkpoint_loader(checkpoint: SafetensorsCheckpoint, hf_config, cfg: EngineConfig, device: torch.device):
    """Fill a model from a full-precision checkpoint, quantizing tensor by tensor (on the GPU when there is one)."""
    quant_device = device if device.type == "cuda" else torch.device("cpu")

    def fill(model: OffloadedModel, layout: ExpertLayout, progress: bool) -> None:
        anatomy, renames = model.anatomy, model.family.renames
        by_layer: dict[int | None, list] = {}
        for tensor in anatomy.trunk:
            by_layer.setdefault(tensor.layer, []).append(tensor)
        moe_index = {l: m for m, l in enumerate(anatomy.moe_layers)}
        for l in tqdm([None, *range(hf_config.num_hidden_layers)], desc="quantizing layers", disable=not progress):
            for tensor in by_layer.get(l, []):
                if tensor.part is None:
                    model.set_tensor(tensor.name, checkpoint.trunk(tensor.name, tensor.shape, renames),
                                     tensor.dtype(cfg))
                    continue
                weight = checkpoint.trunk(f"{tensor.name}.weight", tensor.shape, renames)
                linear, buffer = quantize_matrix(weight.to(quant_device, cfg.torch_dtype),
                                                 getattr(cfg.quant, tensor.part), cfg.torch_dtype)
                model.set_linear(tensor.name, linear, buffer)
            if l not in moe_index:
                continue
            for e in range(anatomy.num_experts):
                weights = {name: read_expert_tensor(checkpoint, anatomy, l, e, name).to(quant_device, cfg.torch_dtype)
                           for name in layout.names}
                model.fill_expert(moe_index[l], e, lambda buffer: layout.pack(weights, buffer))
                checkpoint.close()  # unmap the source shards, or their pages stay resident (host RAM is scarce)

    return fill


# ---- building ----
def build_engine(hf_config, cfg: EngineConfig, device: torch.device, source, progress: bool) -> Engine:
    """Allocate the cache and trunk, then let `source` fill them (from full-precision or pre-quantized weights)."""
    why_not = bfloat16_problem(device) if cfg.dtype == "bfloat16" and cfg.kernels != "reference" else None
    if why_not:  # weights already stored in bfloat16 (a pre-quantized checkpoint): not converted here
        raise ConfigError(f"this model is stored in bfloat16 and {why_not}: convert it again with dtype: float16, "
                          f"or load it with kernels: reference (several times slower)")
    anatomy = Anatomy.of(hf_config, cfg.torch_dtype)
    check_config_for_model(cfg, anatomy)
    layout = anatomy.expert_layout(cfg)
    k, write_back, cpu_layers = resolve_offload(cfg, hf_config, device)
    cfg = cfg.replace(experts_on_device=k, write_back=write_back, cpu_layers=cpu_layers)
    on_device = len(anatomy.moe_layers) - cpu_layers  # MoE layers in the expert cache (the rest: static, on the CPU)
    trunk = [t.layout(cfg) for t in anatomy.quantized()]
    kernels, warmup_s = _ready_kernels(cfg.kernels, device, [*layout.matrices.values(), *trunk])
    cache = ExpertCache(on_device, anatomy.num_experts, layout.nbytes, k if on_device else anatomy.num_experts,
                        cfg.offload.prefetch, device, cfg.offload.policy, write_back=write_back == "always",
                        prefetch_min_precision=cfg.offload.prefetch_min_precision)
    model = OffloadedModel(hf_config, anatomy, cache, layout, cfg.torch_dtype, device, kernels)
    if cpu_layers:
        model.static = StaticExperts(cpu_layers, anatomy.num_experts, layout.nbytes, cache.cpu_jobs)
        model.cpu_layers = cpu_layers
    source(model, layout, progress)
    model.finish_loading()
    model.cpu_tier, model.cpu_kernels = _cpu_tier(cfg, model, layout, device)
    return Engine(model, cfg, kernel_warmup_s=warmup_s)


def _cpu_tier(cfg: EngineConfig, model: OffloadedModel, layout: ExpertLayout,
              device: torch.device) -> tuple[CpuTier, Kernels]:
    """Hybrid execution (offload.cpu_compute) for this engine: the CPU tier and the kernels it computes with; under
    auto on CUDA, the costs measured now on this machine (hybrid.calibrate)."""
    mode, threads, cache, static = cfg.offload.cpu_compute, cfg.offload.cpu_threads, model.cache, bool(model.cpu_layers)
    note = ""
    if not cache.allocation.host_slots and mode != "off":
        note = "every expert is on the device" + (" or static" if static else "") + ": no misses"
    elif mode == "auto" and device.type == "cpu":
        note = "the device is the CPU: nothing to place apart"
    if device.type == "cpu":  # the cache's device slots are host memory: the device's kernels are the CPU's
        return CpuTier(mode, device, threads, note=note, static=static), model.kernels
    if (mode == "off" or note) and not static:  # no CPU work at all
        return CpuTier(mode, device, note=note), model.kernels
    cpu = torch.device("cpu")
    cpu_kernels, _ = _ready_kernels("reference" if cfg.kernels == "reference" else "auto", cpu,
                                    list(layout.matrices.values()))
    tier = CpuTier(mode, device, threads, note=note, static=static)
    if mode == "auto" and not note:
        def run_cpu(host_slot: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return expert_forward(layout, host_slot, x, cpu_kernels)

        def run_device(slot: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return expert_forward(layout, slot, x, model.kernels)

        tier.costs = calibrate(cache, run_device, run_cpu, tier.worker, layout.hidden_size, cfg.torch_dtype, device)
    return tier, cpu_kernels


def check_config_for_model(cfg: EngineConfig, anatomy: Anatomy) -> None:
    """The config rules that need the model's shapes, checked before anything is allocated."""
    E = anatomy.num_experts
    if cfg.offload.prefetch > E:
        raise ConfigError(f"offload.prefetch is {cfg.offload.prefetch}, but this model has {E} experts per layer: "
                          f"use 0 (off) to {E}")
    try:
        anatomy.expert_layout(cfg)
    except QuantizationError as e:
        raise ConfigError(f"quant.experts.group_size {cfg.quant.experts.group_size} does not fit this model: "
                          f"{e}") from None
    for tensor in anatomy.quantized():
        try:
            tensor.layout(cfg)
        except QuantizationError as e:
            spec = getattr(cfg.quant, tensor.part)
            raise ConfigError(f"quant.{tensor.part}.group_size {spec.group_size} does not fit this model: "
                              f"{e}") from None


def _ready_kernels(choice: str, device: torch.device, layouts: list[MatrixLayout]) -> tuple[Kernels, float]:
    """The configured kernels, compiled for every matrix shape now so that the first reply does not stall.
    Under `auto`, kernels that fail to compile here give way to the reference ones with one warning."""
    kernels = select_kernels(choice, device, layouts)
    try:
        return kernels, warm_up(kernels, layouts, device)
    except Exception as e:  # a broken compiler toolchain, a Triton/driver mismatch, a library that will not load
        why = f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e) else type(e).__name__  # names the file, the fix
        if choice == "fused":
            raise ConfigError(f"kernels: fused failed to compile on {device} ({why}); use kernels: auto or "
                              f"reference") from e
        warnings.warn(f"fused kernels failed to compile on {device} ({why}); using the reference kernels "
                      "(dequantize + matmul), which are several times slower", RuntimeWarning, stacklevel=3)
        return REFERENCE, 0.0
