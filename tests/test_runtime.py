"""The ground floor's runtime: one --device meaning for every command."""

import pytest
import torch

from cache.core.errors import CaerError, first_line
from cache.core.runtime import Distributed, autocast, resolve_device


def test_auto_and_cpu_resolve_to_the_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_is_one_line(monkeypatch, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(CaerError, match=f"--device {device}: no CUDA device is available"):
        resolve_device(device)


def test_cuda_means_this_processs_gpu_and_cuda_n_is_checked(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert resolve_device("cuda") == torch.device("cuda", 2)
    assert resolve_device("auto") == torch.device("cuda", 2)
    assert resolve_device("cuda:3") == torch.device("cuda", 3)
    with pytest.raises(CaerError, match="4 visible GPU"):
        resolve_device("cuda:4")


def test_an_unknown_device_names_the_choices():
    with pytest.raises(CaerError, match="--device tpu: expected auto, cpu, cuda or cuda:N"):
        resolve_device("tpu")


def test_a_single_process_needs_no_process_group(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    d = Distributed.from_env()
    assert (d.rank, d.world) == (0, 1)
    d.init()
    assert not torch.distributed.is_initialized()
    assert d.share({"a": 1}) == {"a": 1} and d.sum(3) == 3
    d.barrier()
    d.close()


def test_autocast_fp32_changes_nothing_and_bf16_computes_in_bf16():
    x = torch.ones(2, 2)
    with autocast("cpu", "fp32"):
        assert (x @ x).dtype == torch.float32
    with autocast(torch.device("cpu"), "bf16"):
        assert (x @ x).dtype == torch.bfloat16


def test_first_line_of_an_error():
    assert first_line(ValueError("\n  bad thing\nmore detail")) == "bad thing"
    assert first_line(KeyError()) == "KeyError"
