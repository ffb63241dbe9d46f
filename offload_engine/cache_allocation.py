"""What an expert cache allocates, computed from shapes alone, so that the memory plan (memory.py) can size it
before anything is allocated and the cache (expert_cache.py) allocates exactly that."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CacheAllocation:
    """What an ExpertCache allocates, computed from shapes alone (the memory plan uses it before allocating)."""
    device_slots: int  # main + spare
    spare_slots: int
    host_slots: int  # per layer
    num_layers: int
    expert_bytes: int
    locked: bool  # host slots page-locked (CUDA)

    @staticmethod
    def build(num_layers: int, num_experts: int, expert_bytes: int, experts_on_device: int, prefetch: int,
              cuda: bool, write_back: bool = True) -> "CacheAllocation":
        k = min(experts_on_device, num_experts)
        if k == num_experts:  # everything resident: no host slots, no spares, no copies
            return CacheAllocation(num_layers * k, 0, 0, num_layers, expert_bytes, cuda)
        # Per layer in flight at once (the running one, the next one's guesses): `prefetch` staged; one for a
        # miss; swap mode: one more, so that a copy-in never needs the slot whose write-back is still queued.
        spares = (2 if write_back else 1) + 2 * prefetch
        host = num_experts - k if write_back else num_experts
        return CacheAllocation(num_layers * k + spares, spares, host, num_layers, expert_bytes, cuda)

    @property
    def device_bytes(self) -> int:
        return self.device_slots * self.expert_bytes

    @property
    def host_bytes(self) -> int:
        return self.num_layers * self.host_slots * self.expert_bytes

    @property
    def locked_host_bytes(self) -> int:
        return self.host_bytes if self.locked else 0  # one exact-size registration: nothing rounded up
