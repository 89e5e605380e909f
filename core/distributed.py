"""Several processes, one run: DistributedDataParallel under torchrun, and nothing at all without it.

torchrun starts one process per GPU (or per CPU slot with gloo) and tells each who it is through RANK,
LOCAL_RANK and WORLD_SIZE. Without those variables every helper here is a no-op, so the single-process
path stays exactly as it was. Every collective has a timeout (LOUPE_DIST_TIMEOUT seconds, default 300):
a rank that dies makes the others fail rather than wait forever.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

TIMEOUT_ENV = "LOUPE_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 300


@dataclass(frozen=True)
class DistInfo:
    """Who this process is in the group: rank among all processes, rank on this machine, group size."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls) -> DistInfo:
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1)))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def timeout_s() -> float:
    value = os.environ.get(TIMEOUT_ENV, "").strip()
    try:
        return float(value) if value else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds, not {value!r}.") from None


def setup(device: torch.device) -> torch.device:
    """Join the process group when launched by torchrun with several processes (idempotent); returns the
    device this rank trains on: cuda:LOCAL_RANK on CUDA, else `device` unchanged."""
    info = DistInfo.from_env()
    if not info.enabled:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s()))
    return device


def active() -> bool:
    """True inside an initialised group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main() -> bool:
    """Rank 0, the one process that writes events, checkpoints, the bundle and status (always true alone)."""
    return DistInfo.from_env().rank == 0


def _comm_device() -> torch.device:
    # gloo works on CPU tensors, nccl on the rank's GPU
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce(values: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """A small float tensor reduced over the group (sum or max); returned as is when alone."""
    if not active():
        return values
    t = values.detach().to(_comm_device(), dtype=torch.float64).clone()
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.to(values.device)


def all_gather_varlen(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's tensor along dim 0 (rank order); lengths may differ: padded to the longest,
    gathered, then trimmed. On the CPU on return."""
    if not active():
        return t
    device, world = _comm_device(), dist.get_world_size()
    t = t.detach().to(device).contiguous()
    n = torch.tensor([t.shape[0]], device=device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=device)
    padded[: t.shape[0]] = t
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)]).cpu()


def broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank: each rank's last forward updated its
    own copy from its own batch, so without this the ranks would evaluate and save different models."""
    if not active():
        return
    for buf in model.buffers():
        dist.broadcast(buf.data, src=0)


def fingerprint(model: nn.Module) -> str:
    """sha256 of the model's state_dict (parameters and buffers), to check that the ranks agree."""
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """A DistributedDataParallel wrapper for the training forward (the plain module when alone). Built anew
    per phase, after freeze/unfreeze, because DDP registers the parameters that require grad when built."""
    if not active():
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
