"""Streams and events behind the expert cache: the mechanism that orders copies and kernels on a device.

The cache speaks only this small interface, so the same cache code runs with
  * `CudaStreams`: two side streams (host->device copy-ins, device->host write-backs, so both PCIe directions
    work at once) beside the compute stream, ordered by CUDA events recorded on the engine's own device;
  * `HostStreams`: CPU, where a copy is a plain synchronous copy and there is nothing to order;
  * `stream_check.RecordingStreams`: stand-ins that log every copy and compute read for a happens-before check.

The CPU (hybrid execution: an expert computed from its host slot by the CPU worker) is a third actor, named by
`cpu` like a stream: waiting "on" it for a device event blocks the host, and recording on it gives no event (the
cache records the CPU's reads once the host has taken the worker's result, so they are over).

Buffers are named for the log: ("slot", i) is device slot i, ("host", layer, j) host slot j of a layer.
"""

from __future__ import annotations

from typing import Any, Hashable

import torch

Event = Any  # torch.cuda.Event, a stand-in, or None (nothing to wait for)
Stream = Any


class HostStreams:
    """CPU: copies happen when they are issued, so every event is None and every wait is a no-op."""

    compute = h2d = d2h = cpu = None
    device = torch.device("cpu")

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream: Stream, dst_id: Hashable, src_id: Hashable) -> None:
        dst.copy_(src)

    def record(self, stream: Stream) -> Event:
        return None

    def wait(self, stream: Stream, event: Event) -> None:
        pass

    def read(self, stream: Stream, buffer_id: Hashable) -> None:
        pass

    def done(self, event: Event) -> bool:
        return True

    def host_wait(self, event: Event) -> None:
        pass

    def synchronize(self) -> None:
        pass


class CudaStreams:
    """One device's compute stream (whatever is current) plus a copy-in and a write-back stream."""

    cpu = "cpu"  # the host's CPU worker: not a CUDA stream

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.h2d = torch.cuda.Stream(self.device)
        self.d2h = torch.cuda.Stream(self.device)

    @property
    def compute(self) -> torch.cuda.Stream:
        return torch.cuda.current_stream(self.device)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream: Stream, dst_id: Hashable, src_id: Hashable) -> None:
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)

    def record(self, stream: Stream) -> Event:
        if stream is self.cpu:
            return None  # the CPU's work is over when the cache records it (see the module docstring)
        event = torch.cuda.Event()
        event.record(stream)  # the stream fixes the event's device: never the current device's stream
        return event

    def wait(self, stream: Stream, event: Event) -> None:
        if event is not None and stream is self.cpu:
            event.synchronize()  # the CPU waits for the device: the host blocks
        elif event is not None:
            stream.wait_event(event)  # device-side: the host does not block

    def read(self, stream: Stream, buffer_id: Hashable) -> None:
        pass  # the kernels themselves were queued by the caller

    def done(self, event: Event) -> bool:
        return event is None or event.query()

    def host_wait(self, event: Event) -> None:
        if event is not None:
            event.synchronize()

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)


def make_streams(device: torch.device) -> HostStreams | CudaStreams:
    return CudaStreams(device) if torch.device(device).type == "cuda" else HostStreams()


class HostLockError(MemoryError):
    """Page-locking the offloaded experts' host memory failed (nothing of the cache stays allocated)."""


def pin(buffer: torch.Tensor, what: str = "host memory") -> int:
    """Page-lock `buffer` in place at its exact size (torch's pinned allocator would round each allocation up to a
    power of two: 5.9 GiB asked becomes 8 GiB locked). Returns the bytes locked. On failure the CUDA runtime's
    error is cleared (else the next checked CUDA call, e.g. a kernel launch, would report it as its own) and
    HostLockError says how much was asked; the caller frees `buffer`."""
    nbytes = buffer.numel() * buffer.element_size()
    if nbytes:
        cudart = torch.cuda.cudart()
        # cudaHostRegisterPortable (1): pinned for every CUDA context, like torch's own pinned memory.
        error = cudart.cudaHostRegister(buffer.data_ptr(), nbytes, 1)
        if int(error):
            clear_cuda_error(cudart)
            raise HostLockError(f"could not page-lock {nbytes / 2**30:.2f} GiB of host memory for {what} "
                                f"(cudaHostRegister: {cudart.cudaGetErrorString(error)}, error {int(error)}); "
                                f"free host RAM or keep more experts on the GPU (offload.experts_on_device)")
    return nbytes


def unpin(buffer: torch.Tensor) -> None:
    if buffer.numel():
        torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())


def clear_cuda_error(cudart) -> None:
    """Reset the CUDA runtime's last error after a failure handled here. torch's cudart bindings have
    cudaGetLastError from torch 2.10 on; before, call it in the libcudart copies this process has loaded."""
    if hasattr(cudart, "cudaGetLastError"):
        cudart.cudaGetLastError()
        return
    import ctypes

    for path in _loaded_cudart_paths():
        ctypes.CDLL(path).cudaGetLastError()


def _loaded_cudart_paths() -> set[str]:
    """The libcudart copies this process has mapped (pip wheels name them libcudart-<hash>.so.N); Linux only."""
    try:
        with open("/proc/self/maps") as maps:
            return {line.split(maxsplit=5)[-1].strip().removesuffix(" (deleted)") for line in maps
                    if "libcudart" in line}
    except OSError:
        return set()
