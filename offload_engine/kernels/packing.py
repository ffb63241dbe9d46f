"""Where each quantized weight lives in a `MatrixLayout`'s bytes: the facts every fused kernel needs.

hqq quantizes a [N, K] matrix (axis=1) in groups of `g` consecutive weights of a row, i.e. it reshapes the matrix
to [n_groups, g] with group i = n * G + k // g (G = K / g groups per row). It then packs `pack` codes into one
word along the *group* axis: the codes tensor is [S, g] words, S = ceil(n_groups / pack), and word (p, j) holds
group q * S + p in bits [bits * (pack - 1 - q), +bits) for q = 0 .. pack - 1. So the code of weight (n, k) is

    i = n * G + k // g;   word = codes[i % S, k % g];   q = (word >> (bits * (pack - 1 - i // S))) & (2^bits - 1)

and its scale and zero are those of group i (8-bit codes with a float range, or float16: see quantize.py).
The fused kernels read these words directly, so no layout change is needed, and they need K to be a multiple of
g (a group must not straddle two rows: the group-sum identity works row by row).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from hqq.core.quantize import Quantizer

from ..quantize import SCALE_GROUP, MatrixLayout

# hqq's packing name -> (codes per word, word dtype)
_WORDS = {"8bit_u8": (1, torch.uint8), "4bit_u8": (2, torch.uint8), "3bit_32": (10, torch.int32),
          "2bit_u8": (4, torch.uint8), "1bit_u8": (8, torch.uint8)}


class UnsupportedLayout(ValueError):
    """A matrix layout that the fused kernels cannot read; the message says why and what to change."""


@dataclass(frozen=True)
class PackedFormat:
    """The constants a fused kernel is specialised on (all derived from a `MatrixLayout`)."""

    out_features: int  # N
    in_features: int  # K
    bits: int
    group_size: int  # g
    pack: int  # codes per word
    packed_rows: int  # S: rows of the [S, g] codes tensor
    quant_meta: bool  # 8-bit scale/zero codes (else float16 scales and zeros)
    scale_group: int = SCALE_GROUP  # scales sharing one (min, step) pair when quant_meta

    @property
    def groups_per_row(self) -> int:  # G
        return self.in_features // self.group_size

    @property
    def word_bytes(self) -> int:
        return _WORDS[Quantizer.bit_to_packing[self.bits]][1].itemsize

    @property
    def n_groups(self) -> int:
        return self.out_features * self.groups_per_row

    @property
    def shifts(self) -> list[int]:
        """Bit offset of slot q = 0 .. pack - 1 inside a word."""
        return [self.bits * (self.pack - 1 - q) for q in range(self.pack)]

    @staticmethod
    @functools.cache  # called for every matmul: derive the constants once per layout
    def of(layout: MatrixLayout) -> "PackedFormat":
        spec = layout.spec
        if spec.bits is None:
            raise UnsupportedLayout("an unquantized matrix has no packed format")
        n, k = layout.shape
        if k % spec.group_size:
            raise UnsupportedLayout(
                f"fused kernels need in_features ({k}) to be a multiple of group_size ({spec.group_size}) for a "
                f"matrix of shape {layout.shape}; choose a group_size that divides {k}, or kernels: reference")
        pack, _ = _WORDS[Quantizer.bit_to_packing[spec.bits]]
        codes = next(s for s in layout.segments if s.name == "codes")
        return PackedFormat(n, k, spec.bits, spec.group_size, pack, codes.shape[0], spec.quant_meta)
