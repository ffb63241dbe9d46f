"""The expert cache's INVARIANT (expert_cache.py's module docstring), checked: at every moment no forward is running,
the tables say where every expert lives and every device slot is accounted for. `recover()` restores it."""

from __future__ import annotations


def check_invariant(cache) -> None:
    """Raise RuntimeError naming the first broken part of the invariant of `cache` (an ExpertCache)."""
    def fail(what: str) -> None:
        raise RuntimeError(f"expert cache inconsistent: {what}")

    E, off = cache.num_experts, cache.allocation.host_slots
    if cache.busy:
        fail("a forward did not finish (call recover())")
    if cache._journal is not None:
        fail(f"a swap did not finish: {cache._journal} (call recover())")
    if cache.cpu_jobs:
        fail(f"{len(cache.cpu_jobs)} CPU job(s) still pending (call recover())")
    seen: list[int] = []
    for layer in range(cache.num_layers):
        main, host_of = cache.main[layer], cache.host_of[layer]
        if not cache.write_back and off:
            if len(main) != cache.k or host_of != {e: e for e in range(E)}:
                fail(f"layer {layer}: resident {sorted(main)}, host copies {host_of}: every expert should keep "
                     f"its own host slot")
        elif len(main) != cache.k or set(main) | set(host_of) != set(range(E)) or set(main) & set(host_of):
            fail(f"layer {layer}: resident {sorted(main)} and host {sorted(host_of)} do not partition the experts")
        if sorted(host_of.values()) != list(range(off)):
            fail(f"layer {layer}: host slots {sorted(host_of.values())} are not 0..{off - 1}")
        for name in ("staged", "transient", "retiring", "lent", "cpu_reading"):
            if getattr(cache, name)[layer]:
                fail(f"layer {layer}: {name} {getattr(cache, name)[layer]} left over")
        if cache.pending_guess[layer] is not None:
            fail(f"layer {layer}: a guess is pending")
        seen += main.values()
    all_slots = list(range(len(cache.slots)))
    if sorted(seen + cache.free_slots) != all_slots or len(cache.free_slots) != cache.allocation.spare_slots:
        fail(f"device slots are lost or shared (free: {sorted(cache.free_slots)})")
