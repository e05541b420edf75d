"""Routing traces: every routed token's expert ids per MoE layer, written to and read from a file.

One row per (token, MoE layer), the table of ROUTING.md: `seq_id token_idx layer is_prefill e1 ... ek`.
Two encodings of the same table:
  - `.npz` (numpy, compressed), which also keeps the engine step each token was routed in, so an offline
    replay admits a step's tokens together exactly as the engine did;
  - text (`.txt`, or `.txt.gz` / `.gz` compressed), one line per row, the format other offload projects
    record; read back, each decode token is its own step and a sequence's prefill one step.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InvalidRequestError


@dataclass(frozen=True)
class Trace:
    """Rows sorted by (step, layer, seq); arrays of length N, experts [N, k]."""

    seq: np.ndarray  # int64: document (request) id
    token: np.ndarray  # int64: position of the token in its document
    layer: np.ndarray  # int64: the model's layer index (MoE layers only)
    prefill: np.ndarray  # bool
    step: np.ndarray  # int64: engine step; the tokens of one step are admitted to a cache together
    experts: np.ndarray  # int64 [N, k]
    num_experts: int

    @property
    def top_k(self) -> int:
        return self.experts.shape[1]

    @property
    def layers(self) -> list[int]:
        return sorted(set(self.layer.tolist()))

    def __len__(self) -> int:
        return len(self.seq)

    @staticmethod
    def build(seq, token, layer, prefill, step, experts, num_experts: int) -> Trace:
        """A trace from unsorted columns (anything numpy turns into arrays)."""
        cols = [np.asarray(c, dtype=np.int64) for c in (seq, token, layer, step)]
        seq_, token_, layer_, step_ = cols
        prefill_ = np.asarray(prefill, dtype=bool)
        experts_ = np.asarray(experts, dtype=np.int64)
        if experts_.ndim != 2:  # [N, k] already, even when N is 0 (reshape(0, -1) cannot infer k)
            experts_ = experts_.reshape(len(seq_), -1)
        order = np.lexsort((token_, seq_, layer_, step_))
        return Trace(
            seq_[order], token_[order], layer_[order], prefill_[order], step_[order], experts_[order],
            int(num_experts),
        )  # fmt: skip

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".npz":
            np.savez_compressed(
                path, seq=self.seq, token=self.token, layer=self.layer, prefill=self.prefill,
                step=self.step, experts=self.experts, num_experts=np.int64(self.num_experts),
            )  # fmt: skip
            return path
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "wt") as f:
            f.write(f"# tiermoe routing trace: seq_id token_idx layer is_prefill e1..e{self.top_k}; "
                    f"num_experts {self.num_experts}\n")  # fmt: skip
            for s, t, ly, p, ex in zip(
                self.seq, self.token, self.layer, self.prefill, self.experts, strict=True
            ):
                f.write(f"{s} {t} {ly} {int(p)} {' '.join(map(str, ex))}\n")
        return path

    def as_decode(self) -> Trace:
        """The same routing with every token its own decode step, sequence after sequence. Exact for a
        trace of teacher-forced text (tiermoe eval records its windows as prefills): causal attention
        routes each token of a prefill as decoding it one at a time would."""
        positions = sorted(set(zip(self.seq.tolist(), self.token.tolist(), strict=True)))
        step_of = {key: i for i, key in enumerate(positions)}
        steps = [step_of[key] for key in zip(self.seq.tolist(), self.token.tolist(), strict=True)]
        return Trace.build(
            self.seq, self.token, self.layer, np.zeros(len(self), bool), steps, self.experts, self.num_experts
        )

    def sequences(self) -> list[int]:
        return sorted(set(self.seq.tolist()))

    def table(self, seq: int, layers: list[int]) -> np.ndarray:
        """Expert ids of one sequence as [positions, len(layers), k], -1 where the trace has no row."""
        rows = self.seq == seq
        length = int(self.token[rows].max()) + 1 if rows.any() else 0
        out = np.full((length, len(layers), self.top_k), -1, dtype=np.int64)
        index = {ly: i for i, ly in enumerate(layers)}
        for t, ly, ex in zip(self.token[rows], self.layer[rows], self.experts[rows], strict=True):
            if ly in index:
                out[t, index[ly]] = ex
        return out


def load_trace(path: str | Path) -> Trace:
    """Read a trace; a missing, unreadable or malformed file is one clear error naming it."""
    path = Path(path)
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise InvalidRequestError(f"routing trace {path} {what}", "routing")
    try:
        if path.suffix == ".npz":
            with np.load(path) as z:
                trace = Trace.build(
                    z["seq"], z["token"], z["layer"], z["prefill"], z["step"], z["experts"],
                    int(z["num_experts"]),
                )  # fmt: skip
        else:
            trace = _load_text(path)
        return _checked(trace, path)
    except InvalidRequestError:
        raise
    except Exception as e:  # numpy, gzip and int() raise many kinds for a damaged file
        raise InvalidRequestError(
            f"routing trace {path} is unreadable: {type(e).__name__}: {e}", "routing"
        ) from None


def _checked(trace: Trace, path: Path) -> Trace:
    """Ids outside 0..num_experts-1 would index past a layer's experts wherever the trace is used."""
    if len(trace) == 0:
        raise InvalidRequestError(f"routing trace {path} has no rows", "routing")
    low, high = int(trace.experts.min()), int(trace.experts.max())
    if low < 0 or high >= trace.num_experts:
        raise InvalidRequestError(
            f"routing trace {path} names expert {low if low < 0 else high}, outside 0..{trace.num_experts - 1}",
            "routing",
        )
    return trace


def _load_text(path: Path) -> Trace:
    opener = gzip.open if path.suffix == ".gz" else open
    rows, num_experts = [], None
    with opener(path, "rt") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            if line.startswith("#"):
                if "num_experts" in line:
                    num_experts = int(line.rsplit("num_experts", 1)[1].split()[0])
                continue
            fields = line.split()
            if len(fields) < 5:
                raise InvalidRequestError(
                    f"routing trace {path} line {n}: want 'seq_id token_idx layer is_prefill e1 ... ek'",
                    "routing",
                )
            # `e:gate` entries carry a routing weight the replay does not need
            rows.append([int(x.split(":")[0]) for x in fields])
    if not rows:
        raise InvalidRequestError(f"routing trace {path} has no rows", "routing")
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise InvalidRequestError(f"routing trace {path}: rows name different numbers of experts", "routing")
    a = np.asarray(rows, dtype=np.int64)
    seq, token, layer, prefill, experts = a[:, 0], a[:, 1], a[:, 2], a[:, 3].astype(bool), a[:, 4:]
    # Text has no step column: a sequence's prefill is one step, each decode token one step.
    keys = sorted({(int(s), int(t), bool(p)) for s, t, p in zip(seq, token, prefill, strict=True)},
                  key=lambda k: (k[0], not k[2], k[1]))  # fmt: skip
    step_of, step = {}, -1
    last_prefill_seq = None
    for s, t, p in keys:
        if not (p and last_prefill_seq == s):
            step += 1
        last_prefill_seq = s if p else None
        step_of[(s, t, p)] = step
    steps = [step_of[(int(s), int(t), bool(p))] for s, t, p in zip(seq, token, prefill, strict=True)]
    return Trace.build(seq, token, layer, prefill, steps, experts, num_experts or int(experts.max()) + 1)
