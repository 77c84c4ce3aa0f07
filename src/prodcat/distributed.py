"""torch.distributed plumbing shared by extraction and training.

The same command runs as one process here and as N processes under `torchrun` (one per GPU, any number of nodes):
torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR, and we pick NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_distributed", "barrier", "cleanup", "launched_by_torchrun", "is_main_process"]


@dataclasses.dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main_process() -> bool:
    """Rank 0 under torchrun, or a plain process: the one that writes (and draws) what a run made."""
    return int(os.environ.get("RANK", "0")) == 0


def _default_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(requested: bool = False) -> DistInfo:
    """Join the process group when launched by torchrun (or asked to); otherwise a single-process DistInfo."""
    if not (requested or launched_by_torchrun()):
        return DistInfo(device=_default_device(0))
    if "RANK" not in os.environ:
        raise RuntimeError(
            "--distributed needs torchrun (RANK/WORLD_SIZE/MASTER_ADDR unset); e.g. "
            "`torchrun --nproc-per-node 2 -m prodcat ...`"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _default_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device)


def barrier(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
