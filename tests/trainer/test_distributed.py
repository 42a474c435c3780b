"""Rank, backend, device and case-sharding rules of a DDP distillation (no process group needed), and the
CLI's refusals of launches that cannot work."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from nnunet_distill import distributed
from nnunet_distill.cli import train

TORCHRUN_ENV = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}
RENDEZVOUS = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def test_a_plain_process_is_rank_0_of_1() -> None:
    ranks = distributed.ranks_from_env({})
    assert ranks == distributed.Ranks(0, 0, 1, 1)
    assert ranks.is_main and not ranks.distributed


def test_ranks_come_from_torchruns_env() -> None:
    ranks = distributed.ranks_from_env({**TORCHRUN_ENV, **RENDEZVOUS})
    assert (ranks.rank, ranks.local_rank, ranks.world_size, ranks.local_world_size) == (1, 1, 4, 2)
    assert ranks.distributed and not ranks.is_main


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"RANK": "4", "WORLD_SIZE": "4", **RENDEZVOUS}, "RANK=4"),
        ({"RANK": "x", "WORLD_SIZE": "2", **RENDEZVOUS}, "RANK='x'"),
        (
            {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "2", **RENDEZVOUS},
            "LOCAL_RANK=3",
        ),
        ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR"),
    ],
)
def test_inconsistent_launch_env_is_refused_naming_the_variable(env: dict, names: str) -> None:
    with pytest.raises(distributed.DistributedError, match=names):
        distributed.ranks_from_env(env)


def test_backend_is_nccl_on_cuda_gloo_elsewhere_and_can_be_forced() -> None:
    assert distributed.backend_for("cuda", {}) == "nccl"
    assert distributed.backend_for("cpu", {}) == "gloo"
    assert distributed.backend_for("cuda", {distributed.ENV_BACKEND: "gloo"}) == "gloo"
    with pytest.raises(distributed.DistributedError, match="nccl needs CUDA"):
        distributed.backend_for("cpu", {distributed.ENV_BACKEND: "nccl"})
    with pytest.raises(distributed.DistributedError, match=distributed.ENV_BACKEND):
        distributed.backend_for("cpu", {distributed.ENV_BACKEND: "mpi"})


def test_cpu_ranks_stay_on_the_cpu_and_a_single_process_keeps_its_device() -> None:
    ranks = distributed.Ranks(1, 1, 2, 2)
    assert distributed.rank_device(torch.device("cpu"), ranks) == torch.device("cpu")
    assert distributed.rank_device(torch.device("cuda", 3), distributed.Ranks()) == torch.device("cuda", 3)


@pytest.mark.skipif(torch.cuda.device_count() > 7, reason="needs fewer than 8 visible GPUs")
def test_a_cuda_rank_past_the_visible_gpus_is_refused() -> None:
    ranks = distributed.Ranks(9, 7, 16, 8)
    with pytest.raises(distributed.DistributedError, match="LOCAL_RANK=7"):
        distributed.rank_device(torch.device("cuda"), ranks)


def test_shards_are_disjoint_cover_the_split_and_are_balanced() -> None:
    keys = [f"case_{i:04d}" for i in range(11)]
    shards = [distributed.shard(list(reversed(keys)), r, 3) for r in range(3)]
    assert sorted(k for s in shards for k in s) == keys
    assert all(not set(a) & set(b) for i, a in enumerate(shards) for b in shards[i + 1 :])
    assert sorted(len(s) for s in shards) == [3, 4, 4]


def test_more_ranks_than_training_cases_is_refused() -> None:
    with pytest.raises(distributed.DistributedError, match="3 ranks but only 2 training case"):
        distributed.shard(["a", "b"], 0, 3)


def test_threads_are_split_between_a_nodes_ranks() -> None:
    assert distributed.threads_per_rank(16, 2) == 8
    assert distributed.threads_per_rank(2, 4) == 1
    assert distributed.threads_per_rank(8, 1) == 8


def test_num_gpus_is_nnunets_flag_and_defaults_to_one_process() -> None:
    parser = train.build_parser_standard()
    assert parser.parse_args(["-d", "1", "-f", "0"]).num_gpus == 1
    assert parser.parse_args(["-d", "1", "-f", "0", "-num_gpus", "2"]).num_gpus == 2
    resenc = train.build_parser_resenc().parse_args(["-d", "1", "-f", "0", "-num_gpus", "4"])
    assert resenc.num_gpus == 4


def _cli(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, "-m", "nnunet_distill.cli.train", *argv],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_num_gpus_under_torchrun_is_a_usage_error() -> None:
    proc = _cli(["-d", "1", "-f", "0", "-num_gpus", "2"], {"RANK": "0", "WORLD_SIZE": "2", **RENDEZVOUS})
    assert proc.returncode == 2
    assert "-num_gpus 2 under torchrun (WORLD_SIZE=2)" in proc.stderr


def test_num_gpus_zero_is_refused_by_the_parser() -> None:
    proc = _cli(["-d", "1", "-f", "0", "-num_gpus", "0"], {})
    assert proc.returncode == 2 and "-num_gpus" in proc.stderr
