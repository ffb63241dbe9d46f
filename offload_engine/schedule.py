"""The order of one MoE layer call on the expert cache, shared by the model and the timed replay.

Once a layer's routing is on the host: `acquire` every expert it needs (this queues every demand copy before
any compute), then `then()` (the speculative copies for a later layer: queued behind the demand copies), then
per expert `use` -> kernels -> `computed`. `OffloadedModel._run_experts` runs its expert kernels through this
function and `replay.replay_engine` its stand-in kernels, so the replay's figures come from the engine's order of
operations rather than from a description of it.

Hybrid execution: the misses placed on the CPU (`on_cpu`, placement.py's choice) are not acquired. Their host
slots are lent to the CPU (`lend_host`) and handed to `cpu_kernels` first, which starts them on the CPU worker
and returns a function that waits for their results (and adds them in); the device's copies and kernels are
queued meanwhile, then that function runs, and the host slots go back (`cpu_computed`).
"""

from __future__ import annotations

from typing import Callable, Collection, Sequence

import torch

Kernels = Callable[[int, torch.Tensor], None]  # (expert, its device buffer) -> queue the expert's kernels
# [(expert, its host slot)] -> start them on the CPU; returns: wait for their results (and add them in)
CpuKernels = Callable[[list[tuple[int, torch.Tensor]]], Callable[[], None]]


def run_layer(cache, layer: int, order: Sequence[int], kernels: Kernels,
              then: Callable[[], None] | None = None, on_cpu: Collection[int] = (),
              cpu_kernels: CpuKernels | None = None) -> None:
    """Run MoE layer `layer`'s experts `order` (distinct, in order of first use) through `cache`; the misses in
    `on_cpu` run on the CPU through `cpu_kernels`."""

    def run(expert: int) -> None:
        kernels(expert, cache.use(layer, expert))
        cache.computed(layer, expert)

    cache.begin_layer(layer, order)
    cpu_experts = [expert for expert in order if expert in on_cpu]
    finish = cpu_kernels([(expert, cache.lend_host(layer, expert)) for expert in cpu_experts]) if cpu_experts else None
    order = [expert for expert in order if expert not in on_cpu]
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
    if finish is not None:
        finish()
        for expert in cpu_experts:
            cache.cpu_computed(layer, expert)
    cache.end_layer(layer)
