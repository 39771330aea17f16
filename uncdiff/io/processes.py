"""Which process this is: the rank and the number of processes of torch.distributed's group, for
code that shards work or lets one process write a shared file."""

import torch


def rank_and_world() -> tuple[int, int]:
    """`(rank, world size)` of the initialised process group; `(0, 1)` without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1
