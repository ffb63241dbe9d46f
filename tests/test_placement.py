"""The placement policy (placement.py): which missed experts the CPU computes."""

from __future__ import annotations

import pytest

from offload_engine.placement import PlacementCosts, place_misses

# A T4 beside Colab's 2 vCPUs, roughly: a 66 MB expert copies in ~5.8 ms; the CPU kernel ~6 ms at one token.
COLAB = PlacementCosts(copy_ms=5.8, device_ms=0.3, cpu_ms=((1, 6.0), (2, 7.0), (4, 9.0)), round_trip_ms=0.2)
DESKTOP = PlacementCosts(copy_ms=2.6, device_ms=0.2, cpu_ms=((1, 1.2), (2, 1.5), (4, 2.2)), round_trip_ms=0.1)


def test_off_and_always_ignore_costs():
    misses = [(3, 1), (5, 1)]
    assert place_misses(misses, DESKTOP, "off") == set()
    assert place_misses(misses, None, "always") == {3, 5}
    assert place_misses(misses, None, "auto") == set()  # not calibrated: copy, as before
    assert place_misses([], DESKTOP, "always") == set()


def test_auto_balances_the_two_queues():
    # A fast CPU takes a decode miss; two misses on a weak CPU: one each, so both queues end about together.
    assert place_misses([(3, 1)], DESKTOP, "auto") == {3}
    assert len(place_misses([(3, 1), (5, 1)], COLAB, "auto")) == 1
    # The CPU is 1.2 ms per expert, the link 2.6 ms: of four misses the CPU takes most, never all when the
    # device would finish its share earlier.
    on_cpu = place_misses([(e, 1) for e in range(4)], DESKTOP, "auto")
    assert 2 <= len(on_cpu) <= 4


def test_prefill_sized_misses_go_to_the_device():
    assert place_misses([(1, 512), (2, 1)], DESKTOP, "auto") == {2}


def test_cpu_ms_interpolates_and_extrapolates():
    assert DESKTOP.cpu_expert_ms(1) == 1.2 and DESKTOP.cpu_expert_ms(3) == pytest.approx(1.85)
    assert DESKTOP.cpu_expert_ms(8) == pytest.approx(4.4)


def test_the_host_join_and_the_frozen_cache_keep_a_barely_faster_cpu_off_a_miss():
    barely = PlacementCosts(copy_ms=2.6, device_ms=0.2, cpu_ms=((1, 2.6),), round_trip_ms=0.1)
    assert place_misses([(3, 1)], barely, "auto") == set()  # 2.7 ms against 2.8: not clearly earlier
    clearly = PlacementCosts(copy_ms=2.6, device_ms=0.2, cpu_ms=((1, 1.6),), round_trip_ms=0.1)
    assert place_misses([(3, 1)], clearly, "auto") == {3}
    joined = PlacementCosts(copy_ms=2.6, device_ms=0.2, cpu_ms=((1, 1.6),), round_trip_ms=0.1, join_ms=1.0)
    assert place_misses([(3, 1)], joined, "auto") == set()  # the host's work after the join makes it 2.7 ms
