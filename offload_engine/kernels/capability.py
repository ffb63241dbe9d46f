"""What a GPU can compute: read by the launcher (triton_kernels.py) and the loader (which dtype to run)."""

from __future__ import annotations

import torch

BFLOAT16_CAPABILITY = (8, 0)


def bfloat16_problem(device: torch.device) -> str | None:
    """Why the fused kernels will not compute in bfloat16 on `device`, or None."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) >= BFLOAT16_CAPABILITY:
        return None
    return (f"{torch.cuda.get_device_name(device)} has compute capability {major}.{minor} and no bfloat16 "
            f"arithmetic (the fused Triton kernels need 8.0 for bfloat16)")
