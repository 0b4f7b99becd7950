"""Tensor parallelism inside the model: which part of each weight a rank holds, and the all-reduce.

Megatron's split of a Llama block over N ranks, with one all-reduce per half block:
  qkv_proj      column-parallel: rank r holds query heads [r*H/N, (r+1)*H/N) and the KV heads
                their group uses, [r*Hkv/N, (r+1)*Hkv/N); attention runs on those heads alone
  o_proj        row-parallel: rank r holds the input columns of its heads; the partial outputs
                are summed by an all-reduce
  gate_up_proj  column-parallel: MLP columns [r*I/N, (r+1)*I/N) of gate and of up
  down_proj     row-parallel over the same columns, then an all-reduce
Embeddings, norms and lm_head are replicated; only rank 0 computes logits (it samples).

The process group is torch.distributed's default group (NCCL on CUDA, gloo on the CPU), set
up by runner/distributed.py; with size 1 nothing here touches torch.distributed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True, slots=True)
class TensorParallel:
    """This process's place in the tensor-parallel group."""

    rank: int = 0
    size: int = 1

    def __post_init__(self) -> None:
        assert 0 <= self.rank < self.size, f"rank {self.rank} outside a group of {self.size}"

    @property
    def is_driver(self) -> bool:
        """Rank 0: runs the scheduler, computes logits and samples."""
        return self.rank == 0

    def all_reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """Sum a row-parallel layer's partial outputs over the ranks, in place (captured inside
        CUDA graphs on GPUs: NCCL collectives are graph-capturable)."""
        if self.size > 1:
            dist.all_reduce(partial)
        return partial

    def min_over_ranks(self, value: int, device: torch.device) -> int:
        """The smallest of every rank's `value` (the KV block count all ranks can hold)."""
        if self.size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return int(tensor.item())


SINGLE = TensorParallel()


@dataclass(frozen=True, slots=True)
class TensorShard:
    """This rank's slice of a checkpoint tensor: `length` rows or columns from `start` along `dim`."""

    dim: int
    start: int
    length: int
