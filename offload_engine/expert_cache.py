"""The expert cache (mechanism only): which expert lives in which buffer, the copies that move them, counters.

Memory model, per layer, for E experts and k = experts_on_device < E, in one of two modes:
  * swap (`write_back=True`): k experts live in device slots ("main"); the other E - k live in host slots
    (page-locked at their exact size when the device is CUDA). The host holds *only* the non-resident experts,
    which is what lets Mixtral's 2-bit experts fit beside Colab's 12.7 GB of RAM: a miss swaps, i.e. copies the
    wanted expert host->device into a spare slot and writes the evicted expert device->host into the host slot
    just vacated.
  * no write-backs (`write_back=False`, where host RAM allows): the host holds all E experts, each in its own
    host slot (`host_of[e] == e`) for good. Experts are read-only, so a host copy never goes stale: an evicted
    device copy is dropped, never written back, and only copy-ins use the link (half the PCIe traffic).
  * Spare device slots, shared by all layers (every expert has the same byte size): `prefetch` per layer for
    the two layers whose guesses can be in flight at once, plus one for a miss, plus (swap mode) one more so
    that a copy-in never takes the slot whose write-back was queued last (`_take_free_slot`).
  * Prefetch rule (the reference system's): a prefetched expert sits in a spare slot ("staged") and displaces
    nothing; when a lookup uses it, it takes the place of the policy's victim, like a miss that was already
    paid for. The victim is never an expert the current layer call still has to look up; if every resident is
    (fewer slots than experts per token), the newcomer is used in place ("transient"), its slot freed after.
    Staged experts that were not used are dropped when their layer finishes (counted as wasted); their host copy
    never left, so dropping costs nothing. Which guesses are worth a copy at all is the prefetch gate's call
    (prefetch.PrefetchGate: a layer whose measured precision makes prefetch a loss is not copied for).
With k >= E every expert is resident and there are no host slots and no copies.

A layer call: `acquire` each expert it needs (this queues every demand copy before any compute), `prefetch` the
next layer's guesses (queued behind the demand copies), then per expert `use` -> kernels -> `computed`
(`schedule.run_layer`, which the model and the timed replay share). An
acquired expert may be evicted before it computes (a later miss of the same call chose it): its slot is then
"retiring", kept until `computed` returns it.

Ordering (CUDA; the same calls are no-ops on CPU): copy-ins run on one side stream, write-backs on another, in
the other PCIe direction. Events order every pair of accesses to one buffer that could conflict:
  * a copy into a slot waits for the last kernels and the last write-back that read it;
  * a copy from a host slot waits for the last write-back into it;
  * a write-back waits for the copy-in that read its host slot (which, see `_write_back`, also orders it after
    the copy-in that filled its device slot);
  * kernels wait (`wait_event`, never the host) for the copy-in that filled their slot;
  * the CPU (hybrid execution: a missed expert computed from its host slot, the third actor beside the device's
    kernels and the copy streams) reads a host slot only after the last write-back into it (the host waits, on
    CUDA, if that write-back is still in flight), and a write-back into a host slot waits for the CPU's last
    read of it (the CPU's reads end before `cpu_computed`, which the host calls once the worker has returned).
A missed expert computed on the CPU (`lend_host` -> the CPU kernel reads its host slot -> `cpu_computed`) is a
lookup and a miss (and `cpu_computed`), but moves nothing: no copy, no eviction, its host slot stays its home.
While lent, it cannot be acquired (a swap must not move an expert the CPU computes) and its host slot cannot be
written back into.
The host blocks only in `recover`/`close`, and per copy only when `timing` is set (profiling).

INVARIANT (`check_invariant`), at every moment no forward is running:
  * per layer, |main| = k (`main`: expert -> device slot); swap mode: `main` and `host_of` (expert -> host slot)
    partition the E experts and `host_of`'s values are exactly the layer's E - k host slots; no-write-back mode:
    `host_of[e] == e` for all E experts. Every buffer holds the bytes of the expert mapped to it (the tests check
    this through exact tokens; `check_invariant` checks the rest);
  * no expert is staged, transient, retiring, lent or lent to the CPU (`cpu_reading`), no CPU job is pending, no
    guess is pending, no swap is half done, and every
    device slot is in exactly one of: some layer's main, the free list (which so holds one slot per spare);
  * every copy still in flight is ordered by events before any later access to its buffers (after `recover`,
    none is in flight).
Whatever a forward raises, `recover()` restores this: it waits for every copy and kernel, finishes a swap that
was interrupted between its write-back and its bookkeeping (the journal), drops staged/transient/retiring slots
and pending guesses, and rebuilds the free list.
"""

from __future__ import annotations

import time
import weakref
from typing import Callable, Sequence

import torch

from .cache_allocation import CacheAllocation  # noqa: F401 (re-exported: memory.py, tests)
from .cache_invariant import check_invariant
from .cache_stats import LayerStats
from .policy import make_policy
from .prefetch import PrefetchGate
from .streams import make_streams, pin, unpin


# The protocol's ordering steps (the `step` names `_after` is called with); tests remove each in turn.
ORDERING_STEPS = ("copy_in_after_compute", "copy_in_after_write_back", "copy_in_after_host_write",
                  "write_back_after_host_read", "compute_after_copy_in", "cpu_read_after_write_back",
                  "write_back_after_cpu_read")


class ExpertCache:
    def __init__(self, num_layers: int, num_experts: int, expert_nbytes: int, experts_on_device: int,
                 prefetch: int, device: torch.device, policy: str = "lru", streams=None, write_back: bool = True,
                 prefetch_min_precision: float = 0.0):
        self.num_layers, self.num_experts, self.nbytes = num_layers, num_experts, expert_nbytes
        self.k = min(experts_on_device, num_experts)
        self.prefetch_count = prefetch if self.k < num_experts else 0
        self.write_back = bool(write_back)  # False: the host keeps every expert and evictions are dropped
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.streams = streams if streams is not None else make_streams(self.device)
        self.allocation = CacheAllocation.build(num_layers, num_experts, expert_nbytes, self.k, self.prefetch_count,
                                                self.cuda, self.write_back)
        offloaded, spares = self.allocation.host_slots, self.allocation.spare_slots
        # [L, E - k or E, nbytes] in one exact-size buffer, page-locked on CUDA so that copies are truly asynchronous.
        # Locked before the device slots exist, so that a failed lock leaves nothing allocated.
        host_buffer = torch.empty(num_layers if offloaded else 0, offloaded, expert_nbytes, dtype=torch.uint8)
        self.locked_bytes = 0
        try:
            if self.cuda:
                self.locked_bytes = pin(host_buffer, f"the offloaded experts ({num_layers} layers x {offloaded} "
                                                     f"experts x {expert_nbytes / 2**20:.1f} MiB)")
            # [L*k + spares, nbytes]: main slots of layer l start at l*k; slots change layers as experts swap.
            self.slots = torch.empty(self.allocation.device_slots, expert_nbytes, dtype=torch.uint8,
                                     device=self.device)
        except BaseException:
            if self.locked_bytes:
                unpin(host_buffer)
            host_buffer = None  # freed now: the traceback keeps this frame alive (in a notebook, for long)
            raise
        self._host_buffer = host_buffer
        self.free_slots = list(range(num_layers * self.k, num_layers * self.k + spares))
        if self.cuda:
            for stream in (self.streams.h2d, self.streams.d2h):
                self.slots.record_stream(stream)  # freeing the slots must wait for copies queued on the side streams
            self._release = weakref.finalize(self, _release, self.streams, self._host_buffer)
        self.host = list(self._host_buffer)  # per layer: [E - k, nbytes]
        self.main: list[dict[int, int]] = []  # layer -> {expert: device slot}
        self.host_of: list[dict[int, int]] = []  # layer -> {expert: host slot}
        self.staged = [{} for _ in range(num_layers)]  # layer -> {expert: spare slot holding a prefetched copy}
        self.transient = [{} for _ in range(num_layers)]  # layer -> {expert: slot}, used in place (see above)
        self.retiring = [{} for _ in range(num_layers)]  # layer -> {expert: slot}, evicted but not yet computed
        self.lent = [set() for _ in range(num_layers)]  # acquired by the running layer call, not yet computed
        self.cpu_reading = [{} for _ in range(num_layers)]  # layer -> {expert: host slot the CPU computes it from}
        self.cpu_jobs: list = []  # the CPU work of the running layer call (cpu_worker.CpuJob), settled by recover
        self.policies = []
        for layer in range(num_layers):
            self.main.append({e: layer * self.k + e for e in range(self.k)})
            first_on_host = self.k if self.write_back else 0
            self.host_of.append({e: e - first_on_host for e in range(first_on_host, num_experts)} if offloaded else {})
            layer_policy = make_policy(policy, num_experts)
            for e in range(self.k):  # initial residents, expert k-1 most recent
                layer_policy.touch(e)
            self.policies.append(layer_policy)
        self.pending_guess: list[list[int] | None] = [None] * num_layers
        self.gate = PrefetchGate(num_layers, prefetch_min_precision)  # which layers' guesses are copied
        self.stats = [LayerStats() for _ in range(num_layers)]
        self._journal: tuple | None = None  # a swap whose write-back is queued but whose bookkeeping may not be
        self.busy = False  # a forward is running (or was interrupted before `recover` finished)
        self.timing = False  # profiling: block the host on in-flight copies to measure wait_s
        self.host_waits = 0  # host-blocking waits (syncs) made by the cache
        n = len(self.slots)
        self.slot_written = [None] * n  # event: the last copy into the slot finished
        self.slot_computed = [None] * n  # event: the last kernels reading the slot finished
        self.slot_written_back = [None] * n  # event: the last write-back reading the slot finished
        self.host_read = [[None] * offloaded for _ in range(num_layers)]  # event: last copy-in from the host slot
        self.host_written = [[None] * offloaded for _ in range(num_layers)]  # event: last write-back into it
        self.host_cpu_read = [[None] * offloaded for _ in range(num_layers)]  # event: the CPU's last read of it

    # ---- loading: every expert is written once into its initial home ----
    def fill(self, layer: int, expert: int, write: Callable[[torch.Tensor], None]) -> None:
        """Call `write(buffer)` with the expert's initial home: its host slot (copied on to its device slot too if
        it is also resident), or a CPU scratch copied to its device slot."""
        if expert in self.host_of[layer]:
            write(self.host[layer][self.host_of[layer][expert]])
            if expert in self.main[layer]:  # no-write-back mode: the host keeps a copy of every expert
                self.slots[self.main[layer][expert]].copy_(self.host[layer][self.host_of[layer][expert]])
        elif self.device.type == "cpu":
            write(self.slots[self.main[layer][expert]])
        else:
            scratch = torch.empty(self.nbytes, dtype=torch.uint8)
            write(scratch)
            self.slots[self.main[layer][expert]].copy_(scratch)

    # ---- a layer call: acquire all, then use/computed each ----
    def can_acquire(self, layer: int, expert: int) -> bool:
        """Whether `acquire` finds `expert` without needing a free slot (or a free slot exists)."""
        return expert in self.main[layer] or expert in self.staged[layer] or bool(self.free_slots)

    def acquire(self, layer: int, expert: int, protect: Sequence[int] = (), lend: bool = True) -> None:
        """Make `expert` resident (or transient) for this layer call, queuing its copy; never evicts `protect`.
        `lend`: the expert stays lent until `computed` (its slot survives a later eviction in this call)."""
        if expert in self.cpu_reading[layer]:
            raise RuntimeError(f"expert {expert} of layer {layer} is being computed on the CPU: it cannot move")
        stats = self.stats[layer]
        stats.lookups += 1
        main = self.main[layer]
        if expert in main:
            stats.hits += 1
        else:
            slot = self.staged[layer].get(expert)
            if slot is not None:
                stats.hits += 1
                stats.prefetch_used += 1
            else:
                stats.misses += 1
                slot = self._copy_in(layer, expert)
            candidates = [e for e in main if e not in protect]
            if candidates:  # it takes the victim's place
                victim = self.policies[layer].victim(candidates)
                self._journal = (layer, expert, slot, victim, main[victim], self.host_of[layer][expert])
                self._finish_swap()
            else:  # every resident is still needed by this call (k < experts needed): use it in place, once
                self.transient[layer][expert] = slot
                self.staged[layer].pop(expert, None)
        if lend:
            self.lent[layer].add(expert)
        self.policies[layer].touch(expert)

    def use(self, layer: int, expert: int) -> torch.Tensor:
        """The device buffer of an acquired expert; the compute stream waits for its copy (the host does not)."""
        slot = self._slot_of(layer, expert)
        event = self.slot_written[slot]
        if self.timing and not self.streams.done(event):  # profiling: measure the stall prefetching tries to avoid
            start = time.perf_counter()
            self.streams.host_wait(event)
            self.host_waits += 1
            self.stats[layer].wait_s += time.perf_counter() - start
        self._after(self.streams.compute, event, "compute_after_copy_in")
        return self.slots[slot]

    def computed(self, layer: int, expert: int) -> None:
        """The kernels reading `expert` are queued: later copies into or out of its slot must wait for them."""
        slot = self._slot_of(layer, expert)
        self.streams.read(self.streams.compute, ("slot", slot))
        self.slot_computed[slot] = self.streams.record(self.streams.compute)
        self.lent[layer].discard(expert)
        # Used in place, or evicted while still needed: its host copy is current, so the slot is simply freed.
        if self.transient[layer].pop(expert, None) is not None or self.retiring[layer].pop(expert, None) is not None:
            self.free_slots.append(slot)

    def get(self, layer: int, expert: int, protect: Sequence[int] = ()) -> torch.Tensor:
        """acquire + use, one expert at a time: the device buffer holding `expert`, valid until the layer's next
        lookup (call `computed` once its kernels are queued)."""
        self.acquire(layer, expert, protect, lend=False)
        return self.use(layer, expert)

    # ---- hybrid execution: a miss computed on the CPU from its host slot ----
    def is_miss(self, layer: int, expert: int) -> bool:
        """Whether `expert` is neither resident nor staged: acquiring it would copy it."""
        return expert not in self.main[layer] and expert not in self.staged[layer]

    def lend_host(self, layer: int, expert: int) -> torch.Tensor:
        """The host slot of missed `expert`, lent to the CPU for reading until `cpu_computed`. Counted as a lookup
        and a miss; nothing is copied or evicted."""
        if not self.is_miss(layer, expert) or expert not in self.host_of[layer]:
            raise ValueError(f"expert {expert} of layer {layer} is on the device: only a miss is computed on the CPU")
        host = self.host_of[layer][expert]
        event = self.host_written[layer][host]
        if not self.streams.done(event):  # CUDA: the write-back into it is still in flight (rare: an old one)
            self.host_waits += 1
        self._after(self.streams.cpu, event, "cpu_read_after_write_back")
        self.streams.read(self.streams.cpu, ("host", layer, host))
        self.cpu_reading[layer][expert] = host
        stats = self.stats[layer]
        stats.lookups += 1
        stats.misses += 1
        stats.cpu_computed += 1
        self.policies[layer].touch(expert)
        return self.host[layer][host]

    def cpu_computed(self, layer: int, expert: int) -> None:
        """The CPU has finished reading `expert`'s host slot (the host has taken the worker's result)."""
        host = self.cpu_reading[layer].pop(expert)
        self.host_cpu_read[layer][host] = self.streams.record(self.streams.cpu)

    def _slot_of(self, layer: int, expert: int) -> int:
        for where in (self.transient[layer], self.retiring[layer], self.main[layer]):
            if expert in where:
                return where[expert]
        raise KeyError(f"expert {expert} of layer {layer} was not acquired")

    # ---- speculation ----
    def prefetch(self, layer: int, guesses: Sequence[int]) -> None:
        """Start copying the guessed experts of `layer` into spare slots; resident or staged ones cost nothing."""
        guesses = list(guesses)[: self.prefetch_count]
        self.pending_guess[layer] = guesses
        if not self.gate.open(layer):  # scored all the same, so that the layer can earn its prefetch back
            return
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
            self.gate.score(layer, len(guess), len(set(guess) & set(needed)))
            self.pending_guess[layer] = None

    def end_layer(self, layer: int) -> None:
        """Drop this layer's unused prefetches: their host copy is still in place, so nothing is written back."""
        staged = self.staged[layer]
        while staged:
            self.free_slots.append(staged.popitem()[1])
            self.stats[layer].prefetch_wasted += 1

    # ---- copies ----
    def _after(self, stream, event, step: str) -> None:
        """`stream` waits for `event`: one ordering step of the protocol (named, so a test can remove it)."""
        self.streams.wait(stream, event)

    def _copy(self, dst: torch.Tensor, src: torch.Tensor, stream, dst_id, src_id) -> None:
        self.streams.copy(dst, src, stream, dst_id, src_id)

    def _copy_in(self, layer: int, expert: int) -> int:
        """Queue host slot -> a free device slot on the copy-in stream; returns the slot."""
        if not self.free_slots:  # only if a caller skipped end_layer: reclaim another layer's unused prefetches
            for other in range(self.num_layers):
                if other != layer:
                    self.end_layer(other)
        slot, host, s = self._take_free_slot(), self.host_of[layer][expert], self.streams
        try:
            self._after(s.h2d, self.slot_computed[slot], "copy_in_after_compute")
            self._after(s.h2d, self.slot_written_back[slot], "copy_in_after_write_back")
            self._after(s.h2d, self.host_written[layer][host], "copy_in_after_host_write")
            self._copy(self.slots[slot], self.host[layer][host], s.h2d, ("slot", slot), ("host", layer, host))
            self.slot_written[slot] = self.host_read[layer][host] = s.record(s.h2d)
        except BaseException:
            self.free_slots.append(slot)  # the expert's host copy is untouched: nothing else to undo
            raise
        self.stats[layer].bytes_h2d += self.nbytes
        return slot

    def _take_free_slot(self) -> int:
        """The free slot freed longest ago. A victim's slot is freed when its write-back is queued, and the
        write-back stream runs in queue order, so this is the slot whose write-back ends first: a copy-in into
        the slot freed last would wait for that write-back, which itself waits for the copy-in before it."""
        return self.free_slots.pop(0)

    def _write_back(self, layer: int, slot: int, host: int) -> None:
        """Queue device slot -> host slot on the write-back stream."""
        s = self.streams
        if host in self.cpu_reading[layer].values():  # cannot happen: a lent expert is never acquired (see acquire)
            raise RuntimeError(f"host slot {host} of layer {layer} is being read by the CPU: no write-back into it")
        self._after(s.d2h, self.host_cpu_read[layer][host], "write_back_after_cpu_read")
        # This also orders it after the copy that filled `slot`: that expert entered `main` by a swap whose
        # write-back waited for its copy-in (the read of the host slot it vacated), earlier on this same stream.
        self._after(s.d2h, self.host_read[layer][host], "write_back_after_host_read")
        self._copy(self.host[layer][host], self.slots[slot], s.d2h, ("host", layer, host), ("slot", slot))
        self.slot_written_back[slot] = self.host_written[layer][host] = s.record(s.d2h)

    def _finish_swap(self) -> None:
        """Apply the journalled swap: `expert` (now in `slot`) takes `victim`'s place, `victim` goes to the host
        slot `expert` vacates (no-write-back mode: `victim`'s device copy is dropped; its host copy is current).
        Every step is idempotent, so `recover` can redo it after an interruption anywhere: the victim's slot still
        holds its bytes until the journal is cleared."""
        layer, expert, slot, victim, victim_slot, host = self._journal
        main, host_of = self.main[layer], self.host_of[layer]
        if self.write_back:
            self._write_back(layer, victim_slot, host)
            host_of[victim] = host
            host_of.pop(expert, None)
            self.stats[layer].bytes_d2h += self.nbytes
        main.pop(victim, None)
        main[expert] = slot
        self.staged[layer].pop(expert, None)
        if victim in self.lent[layer]:  # acquired earlier in this call and not yet computed: keep its slot
            self.retiring[layer][victim] = victim_slot
        elif victim_slot not in self.free_slots:
            self.free_slots.append(victim_slot)
        self.policies[layer].evicted(victim)
        self.stats[layer].evictions += 1
        self._journal = None

    # ---- failure and shutdown ----
    def recover(self) -> None:
        """Back to the idle state after an interrupted forward (see INVARIANT); safe to call again if interrupted."""
        while self.cpu_jobs:  # the CPU's reads end first: its host slots go back below
            self.cpu_jobs[-1].settle()
            self.cpu_jobs.pop()
        for layer in range(self.num_layers):
            for expert in list(self.cpu_reading[layer]):
                self.cpu_computed(layer, expert)
        self.streams.synchronize()  # nothing in flight may read or write a slot that changes hands below
        if self._journal is not None:
            self._finish_swap()
            self.streams.synchronize()
        for layer in range(self.num_layers):
            self.stats[layer].prefetch_wasted += len(self.staged[layer])
            for table in (self.staged, self.transient, self.retiring, self.lent):
                table[layer].clear()
        self.pending_guess = [None] * self.num_layers
        resident = {slot for main in self.main for slot in main.values()}
        self.free_slots = [slot for slot in range(len(self.slots)) if slot not in resident]
        self.busy = False
        self.check_invariant()

    def check_invariant(self) -> None:
        """Raise RuntimeError naming the first broken part of the INVARIANT in the module docstring."""
        check_invariant(self)

    def close(self) -> None:
        """Wait for every copy, then release the device slots and unlock and free the host slots."""
        if self.cuda:
            self._release()
        self.slots = self._host_buffer = torch.empty(0, dtype=torch.uint8)
        self.host, self.locked_bytes = [], 0

    # ---- statistics ----
    def reset_stats(self) -> None:
        self.stats = [LayerStats() for _ in range(self.num_layers)]
        self.host_waits = 0

    def device_bytes(self) -> int:
        return self.slots.numel()

    def host_bytes(self) -> int:
        return self._host_buffer.numel()


def _release(streams, host_buffer: torch.Tensor) -> None:
    """Finalizer (close, or the cache garbage-collected): no copy may still read or write the host slots."""
    streams.synchronize()
    unpin(host_buffer)
