"""The expert cache (mechanism only): which expert lives in which buffer, the copies that move them, counters.

Memory model, per layer, for E experts and k = experts_on_device < E:
  * k experts live in device slots ("main"); the other E - k live in host slots (pinned when the device is
    CUDA). The host holds *only* the non-resident experts, which is what lets Mixtral's 2-bit experts fit
    beside Colab's 12.7 GB of RAM: a miss swaps, i.e. copies the wanted expert host->device into a spare slot
    and writes the evicted expert device->host into the host slot just vacated.
  * A few spare device slots, shared by all layers (every expert has the same byte size): one for a miss and
    `prefetch` per layer for the two layers whose guesses can be in flight at once.
  * Prefetch rule (the reference system's): a prefetched expert sits in a spare slot ("staged") and displaces
    nothing; when a lookup uses it, it takes the place of the policy's victim, like a miss that was already
    paid for. The victim is never an expert the current layer call still needs; if every resident is still
    needed (fewer slots than experts per token), the newcomer is used in place and its slot freed after. Staged experts that were not used are dropped when their layer finishes (counted as wasted);
    their host copy never left, so dropping costs nothing.
With k >= E every expert is resident and there are no host slots and no copies.

CUDA: all copies run on one side stream, in order. Each slot has a `ready` event (its last copy-in finished)
and a `free` event (the last kernel that read it finished); a copy into or out of a slot waits for `free`,
and compute waits for `ready` only when it actually needs that expert. On CPU the copies are plain copies.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields
from typing import Callable, Sequence

import torch

from .policy import make_policy


@dataclass
class LayerStats:
    lookups: int = 0
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    prefetch_issued: int = 0  # experts copied ahead of need
    prefetch_used: int = 0  # ... that a later lookup found staged
    prefetch_wasted: int = 0  # ... dropped unused
    guessed: int = 0  # experts named by speculation (resident or not)
    guessed_correct: int = 0  # ... that the layer then really used
    needed_after_guess: int = 0  # experts used by layers for which a guess had been made
    bytes_h2d: int = 0
    bytes_d2h: int = 0
    wait_s: float = 0.0  # host time spent waiting for an in-flight copy (CUDA only)

    def add(self, other: "LayerStats") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


class ExpertCache:
    def __init__(self, num_layers: int, num_experts: int, expert_nbytes: int, experts_on_device: int,
                 prefetch: int, device: torch.device, policy: str = "lru"):
        self.num_layers, self.num_experts, self.nbytes = num_layers, num_experts, expert_nbytes
        self.k = min(experts_on_device, num_experts)
        self.prefetch_count = prefetch if self.k < num_experts else 0
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        offloaded = num_experts - self.k
        spares = (1 + 2 * self.prefetch_count) if offloaded else 0
        # [L*k + spares, nbytes]: main slots of layer l start at l*k; slots change layers as experts swap.
        self.slots = torch.empty(num_layers * self.k + spares, expert_nbytes, dtype=torch.uint8, device=self.device)
        self.free_slots = list(range(num_layers * self.k, num_layers * self.k + spares))
        # [E - k, nbytes] per layer; pinned so that copies are truly asynchronous.
        self.host = [torch.empty(offloaded, expert_nbytes, dtype=torch.uint8, pin_memory=self.cuda)
                     for _ in range(num_layers)] if offloaded else []
        self.main: list[dict[int, int]] = []  # layer -> {expert: device slot}
        self.staged: list[dict[int, int]] = []  # layer -> {expert: spare slot holding a prefetched copy}
        self.transient: list[dict[int, int]] = [{} for _ in range(num_layers)]  # used in place, see get()
        self.host_of: list[dict[int, int]] = []  # layer -> {expert: host slot}
        self.policies = []
        for layer in range(num_layers):
            self.main.append({e: layer * self.k + e for e in range(self.k)})
            self.staged.append({})
            self.host_of.append({e: e - self.k for e in range(self.k, num_experts)})
            layer_policy = make_policy(policy, num_experts)
            for e in range(self.k):  # initial residents, expert k-1 most recent
                layer_policy.touch(e)
            self.policies.append(layer_policy)
        self.pending_guess: list[list[int] | None] = [None] * num_layers
        self.stats = [LayerStats() for _ in range(num_layers)]
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(self.device)
            self.ready = [None] * len(self.slots)  # torch.cuda.Event | None
            self.freed = [None] * len(self.slots)

    # ---- loading: every expert is written once into its initial home ----
    def fill(self, layer: int, expert: int, write: Callable[[torch.Tensor], None]) -> None:
        """Call `write(buffer)` with the expert's initial home: its host slot, or a CPU scratch copied to device."""
        if expert in self.host_of[layer]:
            write(self.host[layer][self.host_of[layer][expert]])
        elif self.device.type == "cpu":
            write(self.slots[self.main[layer][expert]])
        else:
            scratch = torch.empty(self.nbytes, dtype=torch.uint8)
            write(scratch)
            self.slots[self.main[layer][expert]].copy_(scratch)

    # ---- lookups ----
    def get(self, layer: int, expert: int, protect: Sequence[int] = ()) -> torch.Tensor:
        """The device buffer holding `expert`, loading it if needed. Never evicts an expert in `protect`."""
        stats = self.stats[layer]
        stats.lookups += 1
        main = self.main[layer]
        if expert in main:
            stats.hits += 1
            slot = main[expert]
        else:
            if expert in self.staged[layer]:
                stats.hits += 1
                stats.prefetch_used += 1
                slot = self.staged[layer].pop(expert)
            else:
                stats.misses += 1
                slot = self._copy_in(layer, expert)
            candidates = [e for e in main if e not in protect]
            if candidates:  # it takes the victim's place
                self._evict(layer, self.policies[layer].victim(candidates), self.host_of[layer].pop(expert))
                main[expert] = slot
            else:  # every resident is still needed by this call (k < experts needed): use it in place, once
                self.transient[layer][expert] = slot
        self.policies[layer].touch(expert)
        self._wait_ready(layer, slot)
        return self.slots[slot]

    def computed(self, layer: int, expert: int) -> None:
        """The kernels reading `expert` are queued: a later copy into or out of its slot must wait for them."""
        transient = self.transient[layer].pop(expert, None)
        slot = self.main[layer][expert] if transient is None else transient
        if self.cuda:
            self.freed[slot] = torch.cuda.Event()
            self.freed[slot].record()
        if transient is not None:  # its host copy never left: just give the slot back
            self.free_slots.append(slot)

    # ---- speculation ----
    def prefetch(self, layer: int, guesses: Sequence[int]) -> None:
        """Start copying the guessed experts of `layer` into spare slots; resident or staged ones cost nothing."""
        guesses = list(guesses)[: self.prefetch_count]
        self.pending_guess[layer] = guesses
        for expert in guesses:
            if expert in self.main[layer] or expert in self.staged[layer] or not self.free_slots:
                continue
            self.staged[layer][expert] = self._copy_in(layer, expert)
            self.stats[layer].prefetch_issued += 1

    def begin_layer(self, layer: int, needed: Sequence[int]) -> None:
        """Score the guess made for this layer against the experts it really needs."""
        guess = self.pending_guess[layer]
        if guess is not None:
            stats = self.stats[layer]
            stats.guessed += len(guess)
            stats.guessed_correct += len(set(guess) & set(needed))
            stats.needed_after_guess += len(set(needed))
            self.pending_guess[layer] = None

    def end_layer(self, layer: int) -> None:
        """Drop this layer's unused prefetches: their host copy is still in place, so nothing is written back."""
        for slot in self.staged[layer].values():
            self.free_slots.append(slot)
            self.stats[layer].prefetch_wasted += 1
        self.staged[layer].clear()

    # ---- copies ----
    def _copy_in(self, layer: int, expert: int) -> int:
        if not self.free_slots:  # only if a caller skipped end_layer: reclaim another layer's unused prefetches
            for other in range(self.num_layers):
                if other != layer:
                    self.end_layer(other)
        slot = self.free_slots.pop()
        self._copy(self.slots[slot], self.host[layer][self.host_of[layer][expert]], slot, into_slot=True)
        self.stats[layer].bytes_h2d += self.nbytes
        return slot

    def _evict(self, layer: int, victim: int, host_slot: int) -> None:
        """Move `victim` to `host_slot` (just vacated by the expert coming in) and free its device slot."""
        slot = self.main[layer].pop(victim)
        self._copy(self.host[layer][host_slot], self.slots[slot], slot, into_slot=False)
        self.host_of[layer][victim] = host_slot
        self.free_slots.append(slot)
        self.policies[layer].evicted(victim)
        self.stats[layer].evictions += 1
        self.stats[layer].bytes_d2h += self.nbytes

    def _copy(self, dst: torch.Tensor, src: torch.Tensor, slot: int, into_slot: bool) -> None:
        if not self.cuda:
            dst.copy_(src)
            return
        with torch.cuda.stream(self.copy_stream):
            if self.freed[slot] is not None:  # kernels still reading this slot must finish first
                self.copy_stream.wait_event(self.freed[slot])
            dst.copy_(src, non_blocking=True)
            if into_slot:
                self.ready[slot] = torch.cuda.Event()
                self.ready[slot].record(self.copy_stream)
            else:  # the slot is free once its contents are out
                self.freed[slot] = torch.cuda.Event()
                self.freed[slot].record(self.copy_stream)

    def _wait_ready(self, layer: int, slot: int) -> None:
        if not self.cuda or self.ready[slot] is None:
            return
        event = self.ready[slot]
        if not event.query():  # still in flight: this is the stall prefetching tries to avoid
            start = time.perf_counter()
            event.synchronize()
            self.stats[layer].wait_s += time.perf_counter() - start
        torch.cuda.current_stream(self.device).wait_event(event)
        self.ready[slot] = None

    # ---- statistics ----
    def reset_stats(self) -> None:
        self.stats = [LayerStats() for _ in range(self.num_layers)]

    def device_bytes(self) -> int:
        return self.slots.numel()

    def host_bytes(self) -> int:
        return sum(h.numel() for h in self.host)
