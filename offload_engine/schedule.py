"""The order of one MoE layer call on the expert cache, shared by the model and the timed replay.

Once a layer's routing is on the host: `acquire` every expert it needs (this queues every demand copy before
any compute), then `then()` (the speculative copies for a later layer: queued behind the demand copies), then
per expert `use` -> kernels -> `computed`. `OffloadedModel._run_experts` runs its expert kernels through this
function and `replay.replay_engine` its stand-in kernels, so the replay's figures come from the engine's order of
operations rather than from a description of it.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

Kernels = Callable[[int, torch.Tensor], None]  # (expert, its device buffer) -> queue the expert's kernels


def run_layer(cache, layer: int, order: Sequence[int], kernels: Kernels,
              then: Callable[[], None] | None = None) -> None:
    """Run MoE layer `layer`'s experts `order` (distinct, in order of first use) through `cache`."""

    def run(expert: int) -> None:
        kernels(expert, cache.use(layer, expert))
        cache.computed(layer, expert)

    cache.begin_layer(layer, order)
    ran = 0
    for i, expert in enumerate(order):
        # All demand copies go out before any compute, unless the spare slots run out (a long prefill): then
        # the experts already fetched run first and give back the slots of those evicted meanwhile.
        if not cache.can_acquire(layer, expert):
            for earlier in order[ran:i]:
                run(earlier)
            ran = i
        cache.acquire(layer, expert, protect=order[i + 1 :])
    if then is not None:
        then()
    for expert in order[ran:]:
        run(expert)
    cache.end_layer(layer)
