"""Conversion to the pre-quantized format: streamed from the hub shard by shard, resumable, and shareable."""

from .push import model_card, push_to_hub
from .run import ConversionCancelled, ConversionError, ConversionInterrupted, ConversionPlan, quantize_checkpoint

__all__ = ["quantize_checkpoint", "push_to_hub", "model_card", "ConversionError", "ConversionCancelled",
           "ConversionInterrupted", "ConversionPlan"]
