"""The ranks of one peer that trains on several devices (``distributed``): what the training
loop itself calls, so that one process is simply a group of one."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

BUCKET_ELEMENTS = 1 << 25
"""Gradients are summed in flat fp32 buckets of this many elements: few collective calls,
bounded extra memory."""


class PeerGroup:
    """The ranks of one peer. A single process is a group of one and every call is a no-op."""

    def __init__(self, rank: int = 0, world: int = 1,
                 device: torch.device | None = None) -> None:
        self.rank, self.world = rank, world
        self.device = device or torch.device("cpu")
        """Where collective tensors live: NCCL moves only CUDA tensors."""

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def reduce_gradients(self, params: list[torch.nn.Parameter], samples: int,
                         loss_sum: float) -> tuple[int, float]:
        """Sum the parameters' gradients, the sample counts and the loss sums over the ranks;
        returns (samples, loss sum) of the whole peer."""
        if self.world == 1:
            return samples, loss_sum
        meta = torch.tensor([float(samples), loss_sum]
                            + [float(p.grad is not None) for p in params],
                            dtype=torch.float64, device=self.device)
        dist.all_reduce(meta)
        with torch.no_grad():
            present = []
            for param, has in zip(params, meta[2:].tolist(), strict=True):
                # A parameter no rank gave a gradient keeps none, as in one process; one that
                # only some ranks reached gets zeros from the others.
                if has and param.grad is None:
                    param.grad = torch.zeros_like(param)
                if has:
                    present.append(param)
            bucket: list[torch.nn.Parameter] = []
            size = 0
            for param in present:
                bucket.append(param)
                size += param.numel()
                if size >= BUCKET_ELEMENTS:
                    self._sum_grads(bucket)
                    bucket, size = [], 0
            if bucket:
                self._sum_grads(bucket)
        return round(float(meta[0])), float(meta[1])

    def _sum_grads(self, params: list[torch.nn.Parameter]) -> None:
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.reshape(-1).to(self.device, torch.float32) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for grad in grads:
            n = grad.numel()
            grad.copy_(flat[offset:offset + n].view_as(grad))
            offset += n

    def share(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (picklable values only)."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def broadcast_(self, tensor: torch.Tensor) -> None:
        """Overwrite ``tensor`` on every rank with rank 0's."""
        if self.world == 1:
            return
        if tensor.device == self.device:
            dist.broadcast(tensor, src=0)
            return
        moved = tensor.to(self.device)
        dist.broadcast(moved, src=0)
        tensor.copy_(moved)


SOLO = PeerGroup()
