"""Conversion to the pre-quantized format: streamed from the hub shard by shard, resumable, and shareable."""

from .run import ConversionError, ConversionInterrupted, ConversionPlan, quantize_checkpoint

__all__ = ["quantize_checkpoint", "ConversionError", "ConversionInterrupted", "ConversionPlan"]
