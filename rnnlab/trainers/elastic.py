"""Elastic restarts (``accelerate launch --max_restarts N``, i.e. torchrun): a restarted group must meet afresh.

torchrun's agent hosts the rendezvous TCPStore and keeps it across restarts of the worker group (the static
rendezvous always; c10d unless ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``). The workers' ``env://`` process group
writes its keys there with no per-attempt prefix, so after a restart gloo read the dead attempt's peer addresses
and failed ("Gloo connectFullMesh failed ... Connection refused"): in 6 of 8 tries here a restart failed so.
On a restart this module joins the process group itself, through a store prefixed with the attempt number, before
Accelerate would; Accelerate then uses that group. The first attempt is left to Accelerate as usual.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta

log = logging.getLogger(__name__)


def restart_attempt() -> int:
    """How many times torchrun has restarted this worker group (0 on the first attempt or outside torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def join_restarted_group(backend: str, timeout: timedelta = timedelta(minutes=10)) -> bool:
    """After a torchrun restart with the agent's shared store, init the default process group on a store prefixed
    with the attempt; True when it did. ``backend``: "gloo" (CPU) or "nccl"."""
    import torch.distributed as dist

    attempt = restart_attempt()
    if attempt == 0 or dist.is_initialized() or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return False
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size=world,
                          is_master=False, timeout=timeout)
    dist.init_process_group(backend, store=dist.PrefixStore(f"rnnlab/attempt-{attempt}", store), rank=rank,
                            world_size=world, timeout=timeout)
    if rank == 0:
        log.info("worker group restarted by torchrun (attempt %d); resuming from the last checkpoint", attempt)
    return True
