"""Speculation policy: which experts a layer will want, guessed one layer early.

Consecutive layers' residual streams are close (each layer adds a small update), so a layer's router applied
to the *previous* layer's hidden state usually names the experts it will pick (the reference system's
observation). We guess layer l+1 from the residual stream right after layer l's attention — before layer l's
experts run, so the copies overlap layer l's expert compute and layer l+1's attention — and layer 0 from the
token embeddings. The guess feeds layer l+1's own router through layer l+1's own norm (the one in front of
its router), which is the input the router was trained on.
"""

from __future__ import annotations

import torch


def guess_experts(router_logits: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` experts with the most router probability summed over the tokens.  [T, E] -> [count]."""
    probs = torch.softmax(router_logits.float(), dim=-1).sum(dim=0)  # [E]
    return torch.topk(probs, count).indices
