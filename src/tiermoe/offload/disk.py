"""Read experts from checkpoint files into host memory with large aligned reads.

O_DIRECT bypasses the page cache, so the pinned host cache is the only copy in RAM; where the file
system refuses O_DIRECT (tmpfs, some overlays) reads fall back to buffered I/O and drop the pages
afterwards with posix_fadvise. The host cache's reader threads call `read_into` at once: each thread
reads through its own staging buffer.
"""

from __future__ import annotations

import mmap
import os
import threading

import torch

from ..errors import CheckpointError
from ..formats.base import ExpertFormat
from ..models.names import ExpertNames
from ..weights.checkpoint import ByteRange, Checkpoint

ALIGN = 4096


class ExpertReader:
    """An ExpertSource over the checkpoint's safetensors files."""

    def __init__(
        self,
        ckpt: Checkpoint,
        fmt: ExpertFormat,
        names: ExpertNames,
        layers: list[int],
        num_experts: int,
        direct: bool = True,
    ):
        # Computing every range up front validates every expert tensor's name, shape and dtype at load time.
        self.format = fmt
        self.spans = {
            (layer, e): _spans(ckpt.expert_ranges(fmt, names, layer, e))
            for layer in layers
            for e in range(num_experts)
        }
        self._staging_bytes = (
            max(span.nbytes for spans in self.spans.values() for span, _ in spans) + 2 * ALIGN
        )
        self._local = threading.local()  # each reader thread's staging buffer
        self._lock = threading.Lock()  # the open files and the byte count
        self._fds: dict[tuple, int] = {}
        self.direct = direct and hasattr(os, "O_DIRECT")
        self.description = f"checkpoint {ckpt.path}"
        self.bytes_read = 0

    def read_into(self, layer: int, expert: int, out: torch.Tensor) -> int:
        """Fill out (uint8 [format.nbytes]) with the expert in its format. Returns the bytes read."""
        views = self.format.views(out[None])
        total = 0
        for span, members in self.spans[(layer, expert)]:
            data = self._read(span)
            for piece, r in members:
                start = r.offset - span.offset
                values = data[start : start + r.nbytes].view(r.dtype).view(piece.shape)
                self.format.put(views, piece, values)
            total += span.nbytes
        with self._lock:
            self.bytes_read += total
        return total

    def _read(self, r: ByteRange) -> torch.Tensor:
        begin = r.offset - r.offset % ALIGN
        length = -(-(r.offset + r.nbytes - begin) // ALIGN) * ALIGN
        with self._lock:
            fd = self._fd(r.path)
        staging, staging_tensor = self._staging()
        view = memoryview(staging)[:length]
        try:
            got = os.preadv(fd, [view], begin)
        except OSError as e:
            raise CheckpointError(f"cannot read {r.path} at byte {begin}: {e}") from None
        finally:
            view.release()
        if not self.direct:
            os.posix_fadvise(fd, begin, length, os.POSIX_FADV_DONTNEED)
        if got < r.offset - begin + r.nbytes:
            raise CheckpointError(
                f"{r.path} is truncated: expert bytes end at {r.offset + r.nbytes}, file ends at {begin + got}"
            )
        return staging_tensor[r.offset - begin : r.offset - begin + r.nbytes]

    def _staging(self) -> tuple[mmap.mmap, torch.Tensor]:
        """This thread's staging buffer (page-aligned, as O_DIRECT needs) and a tensor over it."""
        if not hasattr(self._local, "buffer"):
            self._local.buffer = mmap.mmap(-1, self._staging_bytes)
            self._local.tensor = torch.frombuffer(self._local.buffer, dtype=torch.uint8)
        return self._local.buffer, self._local.tensor

    def _fd(self, path) -> int:
        key = (path, self.direct)
        if key not in self._fds:
            try:
                self._fds[key] = os.open(path, os.O_RDONLY | (os.O_DIRECT if self.direct else 0))
            except OSError as e:
                if self.direct and e.errno == 22:  # EINVAL: this file system has no O_DIRECT
                    self.direct = False
                    return self._fd(path)
                raise CheckpointError(f"cannot open {path}: {e}") from None
        return self._fds[key]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _spans(ranges: list[tuple]) -> list[tuple[ByteRange, list[tuple]]]:
    """Merge an expert's (piece, range) list into reads: ranges of one file less than a page apart become
    one read (a converted checkpoint stores each expert's tensors side by side: one read an expert)."""
    spans: list[tuple[ByteRange, list[tuple]]] = []
    for piece, r in sorted(ranges, key=lambda pr: (str(pr[1].path), pr[1].offset)):
        if spans:
            span, members = spans[-1]
            end = span.offset + span.nbytes
            if span.path == r.path and 0 <= r.offset - end < ALIGN:
                grown = ByteRange(
                    span.path, span.offset, max(end, r.offset + r.nbytes) - span.offset, torch.uint8
                )
                spans[-1] = (grown, [*members, (piece, r)])
                continue
        spans.append((ByteRange(r.path, r.offset, r.nbytes, torch.uint8), [(piece, r)]))
    return spans
