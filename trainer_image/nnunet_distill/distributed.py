"""Several processes, one student: rank, device and backend of a DDP distillation, and the local launcher.

The engine is PyTorch's: ``torchrun`` (or its library form, ``torch.distributed.launcher``) starts the ranks
and sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``;
the process group comes from that env (``env://``). nnU-Net's trainer does the rest once a group exists: each
rank's share of the global batch and of the foreground oversampling, the DistributedDataParallel wrapper
(gradients all-reduced), losses and pseudo Dice gathered across ranks, checkpoints and logs by rank 0 only.

What nnU-Net leaves out, and this module adds:

* nnU-Net's ``-num_gpus N`` spawns its stock trainer with ``nccl`` hard-wired; :func:`launch_local` starts N
  ranks of *our* command through torch's elastic launcher, the code path of ``torchrun --standalone``.
* nnU-Net puts rank r on ``cuda:r`` with ``device_ids=[r]``: right on one node only (on a second node the
  global rank is past the GPUs) and wrong on a CPU (gloo), where DDP takes no device ids.
  :func:`rank_device` uses ``LOCAL_RANK``; :func:`wrap_ddp` passes device ids only for CUDA.
* nnU-Net lets every rank draw random cases from the whole training split ("we always draw random
  samples"), so ranks train on the same cases. :func:`shard` gives each rank its own cases, like a
  ``DistributedSampler``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

#: Forces the process-group backend (e.g. gloo on CUDA machines for a test); default: nccl on CUDA, else gloo.
ENV_BACKEND = "NNUNET_DISTILL_DIST_BACKEND"
BACKENDS = ("nccl", "gloo")


class DistributedError(RuntimeError):
    """The launch env or the split cannot make a process group; the message names the variable or flag."""


@dataclass(frozen=True)
class Ranks:
    """Where this process sits in the job (torchrun's env); one process without a launcher is rank 0 of 1."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes checkpoints, logs, progress, summaries and the termination message."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    text = env.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise DistributedError(
            f"{name}={text!r} is not an integer (set by torchrun; do not set it by hand)"
        ) from None


def ranks_from_env(env: Mapping[str, str] = os.environ) -> Ranks:
    """The ranks torchrun (or :func:`launch_local`) set; consistent values or a :class:`DistributedError`."""
    world = _env_int(env, "WORLD_SIZE", 1)
    rank = _env_int(env, "RANK", 0)
    local_rank = _env_int(env, "LOCAL_RANK", rank if world > 1 else 0)
    local_world = _env_int(env, "LOCAL_WORLD_SIZE", world)
    if world < 1 or not 0 <= rank < world:
        raise DistributedError(f"RANK={rank} is outside WORLD_SIZE={world}")
    if not 0 <= local_rank < max(local_world, 1):
        raise DistributedError(f"LOCAL_RANK={local_rank} is outside LOCAL_WORLD_SIZE={local_world}")
    if world > 1 and not (env.get("MASTER_ADDR") and env.get("MASTER_PORT")):
        raise DistributedError(
            f"WORLD_SIZE={world} without MASTER_ADDR/MASTER_PORT: start the ranks with torchrun or -num_gpus"
        )
    return Ranks(rank, local_rank, world, local_world)


def backend_for(device_type: str, env: Mapping[str, str] = os.environ) -> str:
    """nccl for CUDA, gloo otherwise, unless $NNUNET_DISTILL_DIST_BACKEND names one (e.g. gloo on GPUs)."""
    forced = env.get(ENV_BACKEND)
    if forced:
        if forced not in BACKENDS:
            raise DistributedError(f"{ENV_BACKEND}={forced!r}: must be one of {', '.join(BACKENDS)}")
        if forced == "nccl" and device_type != "cuda":
            raise DistributedError(f"{ENV_BACKEND}=nccl needs CUDA; this run uses {device_type} (use gloo)")
        return forced
    return "nccl" if device_type == "cuda" else "gloo"


def rank_device(requested, ranks: Ranks):
    """This rank's device: ``cuda:LOCAL_RANK`` for CUDA (one GPU per rank), else the requested one."""
    import torch

    if not ranks.distributed or requested.type != "cuda":
        return requested
    if ranks.local_rank >= torch.cuda.device_count():
        raise DistributedError(
            f"LOCAL_RANK={ranks.local_rank} but only {torch.cuda.device_count()} CUDA device(s) are visible: "
            "start at most one rank per GPU (--nproc_per_node / -num_gpus)"
        )
    return torch.device("cuda", ranks.local_rank)


def init_process_group(device, ranks: Ranks, env: Mapping[str, str] = os.environ) -> bool:
    """Join the job's process group (env:// rendezvous); False when this is a single-process run."""
    import torch
    import torch.distributed as dist

    if not ranks.distributed or dist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend_for(device.type, env), init_method="env://")
    return True


def destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool, device) -> bool:
    """True on every rank when ``flag`` is true on any (a collective: every rank must call it)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def shard(keys: Sequence[str], rank: int, world_size: int) -> list[str]:
    """Rank ``rank``'s disjoint share of the training cases (sorted, then every ``world_size``-th)."""
    ordered = sorted(keys)
    if world_size > len(ordered):
        raise DistributedError(
            f"{world_size} ranks but only {len(ordered)} training case(s) in this fold: every rank needs "
            "cases of its own; use fewer ranks (--nproc_per_node / -num_gpus / nodes)"
        )
    return ordered[rank::world_size]


def threads_per_rank(cpu_count: int, local_world_size: int) -> int:
    """The node's cores split between its ranks (nnU-Net uses all of them for a single CPU process)."""
    return max(1, cpu_count // max(1, local_world_size))


def wrap_ddp(network, device):
    """DistributedDataParallel over ``network`` with device ids for CUDA only (gloo on CPU takes none)."""
    import torch
    from torch.nn.parallel import DistributedDataParallel

    network = torch.nn.SyncBatchNorm.convert_sync_batchnorm(
        network
    )  # as nnU-Net does; InstanceNorm is untouched
    if device.type == "cuda":
        return DistributedDataParallel(network, device_ids=[device.index])
    return DistributedDataParallel(network)


def launch_local(
    nproc: int, entrypoint: Callable[..., Any], *args: Any, log_dir: str | None = None
) -> dict[int, Any]:
    """Run ``entrypoint(*args)`` in ``nproc`` ranks here, as ``torchrun --standalone --nproc_per_node``.

    Returns each rank's return value; a failing rank raises torch's ``ChildFailedError`` naming the rank
    and its error after the other ranks were stopped. With ``log_dir`` the ranks' output goes to files
    there (torch's per-rank layout) instead of this process's terminal.
    """
    from torch.distributed.elastic.multiprocessing.api import DefaultLogsSpecs, Std
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        logs_specs=DefaultLogsSpecs(log_dir=log_dir, redirects=Std.ALL) if log_dir else None,
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",  # a free port, as torchrun --standalone
        max_restarts=0,
        start_method="spawn",
    )
    return elastic_launch(config, entrypoint)(*args)
