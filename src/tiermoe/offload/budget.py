"""Split the memory budgets between dense weights, KV cache, workspace and expert slots.

--gpu-budget covers everything we allocate on the GPU. What is left after the dense weights, the KV
cache reserve and the workspace becomes expert slots, shared evenly by the MoE layers; each layer needs
at least top-k slots (one token's working set) or the model cannot run at all."""

from __future__ import annotations

from dataclasses import dataclass

import psutil
import torch

from ..errors import BudgetError

GIB = 1 << 30


@dataclass(frozen=True)
class MemoryPlan:
    """Every byte the engine will allocate on its device, decided before any weight is loaded."""

    dense_bytes: int
    kv_bytes: int
    workspace_bytes: int
    expert_bytes: int  # one expert
    total_experts: int
    gpu_slots: int  # expert slots in the GPU pool; total_experts means everything is resident
    quotas: dict[int, int]  # MoE layer -> its slots
    host_slots: int  # experts the host cache holds
    kv_tokens: int = 0  # KV cache tokens kv_bytes holds over every running sequence (in whole blocks)
    budget_bytes: int | None = None  # the GPU budget the plan was fitted to; None: uncapped (CPU)

    @property
    def all_resident(self) -> bool:
        return self.gpu_slots >= self.total_experts

    def describe(self) -> str:
        """One line: dense / KV tokens / workspace / expert slots / host cache, in GiB."""
        budget = "uncapped" if self.budget_bytes is None else f"{self.budget_bytes / GIB:.2f} GiB"
        experts = (
            f"all {self.total_experts} experts resident {self.gpu_slots * self.expert_bytes / GIB:.2f} GiB"
            if self.all_resident
            else f"{self.gpu_slots} of {self.total_experts} expert slots "
            f"{self.gpu_slots * self.expert_bytes / GIB:.2f} GiB | host cache {self.host_slots} experts "
            f"{self.host_slots * self.expert_bytes / GIB:.2f} GiB"
        )
        return (
            f"memory plan (GPU budget {budget}): dense {self.dense_bytes / GIB:.2f} GiB | KV cache "
            f"{self.kv_tokens} tokens {self.kv_bytes / GIB:.2f} GiB | workspace "
            f"{self.workspace_bytes / GIB:.2f} GiB | {experts}"
        )


# The fewest GPU slots a MoE layer can run with: a step whose experts outnumber a layer's slots runs in
# waves (offload/gpu_pool.py), one wave computing while the next one's copies land. Fewer slots than
# top-k are slow (every token misses most of its experts) but let a model whose dense weights nearly fill
# the GPU run at all (DeepSeek-V3 at 24 GB: bench/NOTES.md section 27).
MIN_LAYER_SLOTS = 2


def plan_memory(
    *,
    moe_layers: list[int],
    num_experts: int,
    top_k: int,
    expert_bytes: int,
    dense_bytes: int,
    kv_bytes: int,
    workspace_bytes: int,
    device: torch.device,
    gpu_budget_gib: float | None,
    cpu_budget_gib: float | None,
    kv_tokens: int = 0,
) -> MemoryPlan:
    """The split of the budgets. Called before any weight is on the device, so the default budget (free
    memory now, minus a margin) does not already hold the dense weights it then subtracts."""
    total = len(moe_layers) * num_experts
    fixed = dense_bytes + kv_bytes + workspace_bytes
    budget = default_gpu_budget(device) if gpu_budget_gib is None else int(gpu_budget_gib * GIB)
    slots = total if budget is None else max(0, (budget - fixed) // expert_bytes)
    least = min(top_k, MIN_LAYER_SLOTS)
    minimum = fixed + len(moe_layers) * least * expert_bytes
    if budget is not None and slots < len(moe_layers) * least:
        raise BudgetError(
            f"GPU budget {size(budget)} is too small: dense weights {size(dense_bytes)} + KV cache "
            f"{size(kv_bytes)} + workspace {size(workspace_bytes)} + {least} experts for each of "
            f"{len(moe_layers)} MoE layers ({size(len(moe_layers) * least * expert_bytes)}) need at least "
            f"{minimum / GIB:.6g} GiB; raise --gpu-budget to that or more"
        )
    slots = min(slots, total)
    quotas = {
        layer: slots // len(moe_layers) + (i < slots % len(moe_layers)) for i, layer in enumerate(moe_layers)
    }
    host_budget = default_cpu_budget() if cpu_budget_gib is None else int(cpu_budget_gib * GIB)
    host_slots = 0 if slots >= total else min(total, max(0, host_budget // expert_bytes))
    return MemoryPlan(
        dense_bytes,
        kv_bytes,
        workspace_bytes,
        expert_bytes,
        total,
        slots,
        quotas,
        host_slots,
        kv_tokens,
        budget,
    )


def size(n: int) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def default_gpu_budget(device: torch.device) -> int | None:
    """Free GPU memory minus a margin for the CUDA context and fragmentation; None (no cap) on the CPU."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return max(0, free - GIB)


def default_cpu_budget() -> int:
    """About half the RAM: the rest stays for the OS, the page cache and the process itself."""
    return psutil.virtual_memory().total // 2
