"""The rank-aware Device: one process by default, torchrun's variables, torch.distributed."""

from __future__ import annotations

import socket

import pytest
import torch.distributed as dist

from common.device.select import Device, select_device


def test_one_process_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert select_device("cpu") == Device("cpu", rank=0, world_size=1)


def test_rank_from_torchrun_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    d = select_device("cpu")
    assert (d.rank, d.world_size, d.group) == (1, 2, None)


def test_rank_and_group_from_an_initialized_process_group() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        d = select_device("cpu")
        assert (d.rank, d.world_size, d.group) == (0, 1, dist.group.WORLD)
    finally:
        dist.destroy_process_group()
