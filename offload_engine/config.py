"""Engine configuration: frozen dataclasses that read and write the public YAML format.

    dtype: float16            # float32 | bfloat16 | float16
    max_context: 4096         # tokens of KV cache to plan memory for
    max_batch: 1              # sequences generated at once (offload-serve --max-batch), each with its KV cache
    kernels: auto             # quantized matmuls: auto | fused | reference (see offload_engine.kernels)
    quant:
      attention: {bits: 4, group_size: 64}
      experts:   {bits: 2, group_size: 16}
      trunk:     {bits: 4, group_size: 64}  # shared experts and dense MLP layers (families that have them)
    offload:
      experts_on_device: 4    # per layer; 8 = everything resident; auto = as many as fit
      prefetch: 1             # experts per layer guessed ahead; 0 = off
      prefetch_min_precision: 0.0  # copy a layer's guesses only while this many are right (0 = always)
      policy: lru             # eviction policy (see offload_engine.policy)
      write_back: auto        # always | never | auto: never when host RAM holds every expert (memory.py)
      cpu_compute: auto       # a missed expert computed on the CPU from its host copy: auto | off | always
      cpu_threads: null       # threads of the CPU kernel for those experts; null = torch's (torch.get_num_threads)
      cpu_layers: 0           # the first N MoE layers' experts stay in host RAM, computed on the CPU; all = every layer
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch
import yaml

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SUPPORTED_BITS = (1, 2, 3, 4, 8)
KERNEL_CHOICES = ("auto", "fused", "reference")  # auto: fused where this device can run them
WRITE_BACK_CHOICES = ("auto", "always", "never")


class ConfigError(ValueError):
    """A configuration that cannot be used; the message says which key and what is allowed."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # YAML's `true` is not a count


@dataclass(frozen=True)
class QuantSpec:
    """How one part of the model is stored: `bits=None` keeps it in the model dtype.

    `quant_meta` stores HQQ's scales and zeros in 8 bits (the default; 16 bits otherwise) and `optimize`
    runs HQQ's optimiser (off = plain min-max round-to-nearest): both exist to measure what they buy."""

    bits: int | None = None
    group_size: int = 64
    quant_meta: bool = True
    optimize: bool = True

    def __post_init__(self) -> None:
        if self.bits is not None and not (_is_int(self.bits) and self.bits in SUPPORTED_BITS):
            raise ConfigError(f"quant bits must be one of {SUPPORTED_BITS} or null, got {self.bits!r}")
        if not _is_int(self.group_size) or self.group_size <= 0:
            raise ConfigError(f"quant group_size must be a positive integer, got {self.group_size!r}")
        for name in ("quant_meta", "optimize"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"quant {name} must be true or false, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class QuantConfig:
    attention: QuantSpec = field(default_factory=lambda: QuantSpec(4, 64))
    experts: QuantSpec = field(default_factory=lambda: QuantSpec(2, 16))
    # The linear layers that stay on the device besides attention: shared experts (Qwen2-MoE, DeepSeek) and dense
    # MLP layers (DeepSeek's first layer). Quantized like attention by default: they run for every token.
    trunk: QuantSpec = field(default_factory=lambda: QuantSpec(4, 64))


@dataclass(frozen=True)
class OffloadConfig:
    """`write_back`: "always" keeps only the offloaded experts in host RAM and writes an evicted expert back into
    the host slot its replacement vacated (a swap: both PCIe directions busy); "never" keeps every expert in
    host RAM, so an evicted device copy is just dropped (half the traffic, E instead of E - k experts per layer
    page-locked); "auto" (default) picks "never" where the host RAM available holds every expert beside the
    process, "always" otherwise (and on a CPU device, where the device slots are host RAM too).
    `prefetch_min_precision`: a layer's guesses are copied only once at least this share of its recent guesses
    were right (prefetch.PrefetchGate; 0 = copy every guess). The timed replay puts prefetch's break-even
    at 0.86-0.97 on a T4-class link (scripts/throughput_model.py).
    `cpu_compute` (hybrid execution, placement.py): "off" copies every miss to the device; "always" computes every
    miss on the CPU from its host slot (on a CPU device too: how CI runs that path); "auto" (default) measures the
    link, the CPU kernel and the device's kernels at load and sends each miss where it finishes first (on a CPU
    device the device is the CPU, so auto behaves like off). `cpu_threads`: the CPU kernel's threads for those
    experts (None: torch's count). `cpu_layers` (static placement, like llama.cpp's --n-cpu-moe): the routed
    experts of the first N MoE layers (or "all") stay in host RAM and are always computed on the CPU: no device
    slots, never copied. With experts_on_device: auto on CUDA, the memory plan picks N itself when not even one
    expert per layer fits the GPU (memory.py)."""

    experts_on_device: Union[int, str] = 4  # an int, or "auto"
    prefetch: int = 1
    policy: str = "lru"
    write_back: str = "auto"  # auto | always | never
    prefetch_min_precision: float = 0.0
    cpu_compute: str = "auto"  # auto | off | always
    cpu_threads: int | None = None
    cpu_layers: Union[int, str] = 0  # an int >= 0, or "all"

    def __post_init__(self) -> None:
        from .placement import CPU_COMPUTE_CHOICES
        from .policy import POLICIES

        k = self.experts_on_device
        if not (k == "auto" or (_is_int(k) and k >= 1)):
            raise ConfigError(f"offload.experts_on_device must be a positive integer or 'auto', got {k!r}")
        if not _is_int(self.prefetch) or self.prefetch < 0:
            raise ConfigError(f"offload.prefetch must be an integer >= 0, got {self.prefetch!r}")
        if self.policy not in POLICIES:
            raise ConfigError(f"offload.policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.write_back not in WRITE_BACK_CHOICES:
            raise ConfigError(f"offload.write_back must be one of {', '.join(WRITE_BACK_CHOICES)}, "
                              f"got {self.write_back!r}")
        threshold = self.prefetch_min_precision
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
            raise ConfigError(f"offload.prefetch_min_precision must be a number from 0 to 1, got {threshold!r}")
        if self.cpu_compute not in CPU_COMPUTE_CHOICES:
            raise ConfigError(f"offload.cpu_compute must be one of {', '.join(CPU_COMPUTE_CHOICES)}, "
                              f"got {self.cpu_compute!r}")
        if self.cpu_threads is not None and not (_is_int(self.cpu_threads) and self.cpu_threads >= 1):
            raise ConfigError(f"offload.cpu_threads must be a positive integer or null (torch's thread count), "
                              f"got {self.cpu_threads!r}")
        if not (self.cpu_layers == "all" or (_is_int(self.cpu_layers) and self.cpu_layers >= 0)):
            raise ConfigError(f"offload.cpu_layers must be an integer >= 0 (the first N MoE layers' experts on the "
                              f"CPU) or 'all', got {self.cpu_layers!r}")


@dataclass(frozen=True)
class EngineConfig:
    dtype: str = "float16"
    max_context: int = 4096  # tokens the KV cache is planned for; chat drops old turns beyond it
    max_batch: int = 1  # sequences generated at once (offload-serve): KV caches `auto` plans memory for
    kernels: str = "auto"  # quantized matmul backend: auto | fused | reference
    quant: QuantConfig = field(default_factory=QuantConfig)
    offload: OffloadConfig = field(default_factory=OffloadConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.dtype, str) or self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if not _is_int(self.max_context) or self.max_context < 16:
            raise ConfigError(f"max_context must be an integer >= 16, got {self.max_context!r}")
        if not _is_int(self.max_batch) or self.max_batch < 1:
            raise ConfigError(f"max_batch must be an integer >= 1, got {self.max_batch!r}")
        if self.kernels not in KERNEL_CHOICES:
            raise ConfigError(f"kernels must be one of {', '.join(KERNEL_CHOICES)}, got {self.kernels!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **offload_overrides: Any) -> "EngineConfig":
        """A copy with some `offload` keys changed (the engine resolves `auto` this way)."""
        return dataclasses.replace(self, offload=dataclasses.replace(self.offload, **offload_overrides))


ConfigLike = Union[None, str, os.PathLike, dict, EngineConfig]  # what `load_config` (and so `load`) accepts


def _build(cls: type, data: Any, where: str) -> Any:
    """Build a (nested) dataclass from a dict, rejecting keys the format does not have."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
            f"valid keys{' under ' + where if where else ''}: {', '.join(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        nested = _NESTED.get((cls, name))
        kwargs[name] = _build(nested, value, f"{where}.{name}".lstrip(".")) if nested else value
    try:
        return cls(**kwargs)
    except TypeError as e:  # e.g. a wrong type that the dataclass itself cannot take
        raise ConfigError(f"invalid {where or 'config'}: {e}") from e


_NESTED = {
    (EngineConfig, "quant"): QuantConfig,
    (EngineConfig, "offload"): OffloadConfig,
    (QuantConfig, "attention"): QuantSpec,
    (QuantConfig, "experts"): QuantSpec,
    (QuantConfig, "trunk"): QuantSpec,
}


def named_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def read_yaml(path: Path) -> Any:
    """A YAML file's data; a syntax error or an unreadable file is a ConfigError naming the file (and line)."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path} is not valid YAML{where}: {problem}; fix the file or pass a packaged config "
                          f"name ({', '.join(named_configs())})") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config {path}: {e}") from e


def explicit_keys(config: ConfigLike) -> dict:
    """The keys a caller actually gave (a dict or YAML may leave some out; an EngineConfig sets them all)."""
    if config is None:
        return {}
    if isinstance(config, EngineConfig):
        return config.to_dict()
    if isinstance(config, dict):
        return config
    path = Path(config)
    if not path.exists() and (CONFIG_DIR / f"{config}.yaml").exists():
        path = CONFIG_DIR / f"{config}.yaml"
    load_config(config)  # a name that is neither a file nor a packaged config: its usual error
    return read_yaml(path)


def load_config(config: ConfigLike) -> EngineConfig:
    """Accept None (defaults), an EngineConfig, a dict, a YAML path, or a packaged config name like 't4-16gb'."""
    if config is None:
        return EngineConfig()
    if isinstance(config, EngineConfig):
        return config
    if isinstance(config, dict):
        return _build(EngineConfig, config, "")
    path = Path(config)
    if not path.exists() and (CONFIG_DIR / f"{config}.yaml").exists():
        path = CONFIG_DIR / f"{config}.yaml"
    if not path.exists():
        raise ConfigError(
            f"config {str(config)!r} is neither a YAML file nor a packaged config; "
            f"packaged configs: {', '.join(named_configs())}"
        )
    data = read_yaml(path)
    try:
        return _build(EngineConfig, data, "")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
