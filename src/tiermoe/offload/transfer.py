"""Host-to-GPU copies on a side CUDA stream, ordered by events; plain synchronous copies on the CPU.

A copy into a slot first waits for the event that marks the slot's last use on the compute stream,
so a prefetch never overwrites weights a running kernel still reads."""

from __future__ import annotations

import torch


class CopyStream:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        # Higher priority than the compute stream: a waiting layer needs its weights before more compute.
        self.stream = torch.cuda.Stream(device, priority=-1) if self.cuda else None

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: torch.cuda.Event | None = None):
        """Copy src into dst; returns an event that completes with the copy (None on the CPU)."""
        if not self.cuda:
            dst.copy_(src)
            return None
        with torch.cuda.stream(self.stream):
            if after is not None:
                self.stream.wait_event(after)
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        return event

    def wait(self, event: torch.cuda.Event | None) -> None:
        """Order the compute stream's next work after `event` (a copy), on the GPU: the host goes on."""
        if event is not None:
            torch.cuda.current_stream().wait_event(event)

    def to_device(self, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A host tensor on `device` without blocking the host: staged in pinned memory, which the
        caching allocator keeps until the copy has read it (a pageable copy would wait for the stream,
        and so for every copy it waits on)."""
        return t.pin_memory().to(device, non_blocking=True) if self.cuda else t

    def mark_used(self) -> torch.cuda.Event | None:
        """An event on the compute stream after the work enqueued so far (None on the CPU)."""
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream())
        return event
