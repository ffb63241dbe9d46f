"""offload_engine: mixture-of-experts LLMs (Mixtral-8x7B first, and the families in families.py) on one 16 GB GPU
with HQQ quantization, an LRU expert cache and speculative prefetch."""

from .config import ConfigError, EngineConfig, OffloadConfig, QuantConfig, QuantSpec, load_config
from .checkpoint import CheckpointError
from .engine import Engine
from .loader import load
from .memory import NotEnoughMemory, plan_memory
from .convert import push_to_hub, quantize_checkpoint

__all__ = ["load", "quantize_checkpoint", "push_to_hub", "Engine", "EngineConfig", "QuantConfig", "QuantSpec", "OffloadConfig",
           "load_config", "ConfigError", "CheckpointError", "NotEnoughMemory", "plan_memory"]
__version__ = "0.1.0"
