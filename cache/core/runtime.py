"""Where and how a command computes: the one device resolver, the one precision resolver
and the one distributed helper of extract, train-head, finetune, evaluate, predict, explain
and ablate.

torch is imported inside the functions: this module is imported by code that extract's
torch-free workers load too.
"""

from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from cache.core.errors import CaerError

log = logging.getLogger("caer")

DEVICES = ("auto", "cpu", "cuda")  # and cuda:N
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


# ------------------------------------------------------------------------------------- device

def resolve_device(device: str):
    """``--device`` as a torch.device, with one meaning everywhere: ``auto`` is this process's
    GPU when CUDA is present, else the CPU; ``cuda`` this process's GPU (cuda:LOCAL_RANK
    under torchrun); ``cuda:N`` that GPU; ``cpu`` the CPU."""
    import torch

    device = str(device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return torch.device("cpu")
    if device != "cuda" and not device.startswith("cuda:"):
        raise CaerError(f"--device {device}: expected auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise CaerError(f"--device {device}: no CUDA device is available (use --device cpu)")
    if device == "cuda":
        return local_cuda_device()
    index, count = device.split(":", 1)[1], torch.cuda.device_count()
    if not index.isdigit() or int(index) >= count:
        raise CaerError(f"--device {device}: there are {count} visible GPU(s), cuda:0 to "
                        f"cuda:{count - 1}")
    return torch.device("cuda", int(index))


def check_device(device: str) -> None:
    """Raise the one-line CaerError of ``resolve_device`` now, before anything is read."""
    resolve_device(device)


def local_cuda_device():
    """This process's GPU: cuda:LOCAL_RANK under torchrun, cuda:0 when the launcher gives each
    process one GPU of its own (CUDA_VISIBLE_DEVICES per rank, as Slurm does)."""
    import torch

    local, count = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # torchrun's processes on this node
    if count == 1 and per_node == 1:
        return torch.device("cuda", 0)
    if local >= count or per_node > count:
        raise CaerError(f"LOCAL_RANK {local} of {per_node} process(es) on this node, but {count} "
                        f"visible GPU(s): start at most {count} per node (torchrun "
                        f"--nproc-per-node {count})")
    return torch.device("cuda", local)


# ---------------------------------------------------------------------------------- precision

def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        import torch

        return torch.backends.cpu.get_cpu_capability() in ("AVX512_BF16", "AMX")
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _cuda_has_native_bf16() -> bool:
    import torch

    # torch's default also says yes where bf16 is only emulated (before Ampere: V100, T4).
    return torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_precision(precision: str, device_type: str) -> str:
    """The precision CLIP runs at: ``auto`` is bf16 on CUDA when the GPU has it (else fp16),
    bf16 on a CPU with native bf16, else fp32."""
    if precision == "auto":
        if device_type == "cuda":
            return "bf16" if _cuda_has_native_bf16() else "fp16"
        return "bf16" if cpu_has_native_bf16() else "fp32"
    if precision == "bf16" and device_type == "cuda" and not _cuda_has_native_bf16():
        raise CaerError("--precision bf16: this GPU has no bf16; use fp16 or fp32")
    if precision == "bf16" and device_type == "cpu" and not cpu_has_native_bf16():
        # Without AVX512-BF16/AMX torch falls back to a slow bf16 matmul, worst in backward.
        log.warning("--precision bf16: this CPU has no native bf16 (AVX512-BF16/AMX), so torch "
                    "emulates it: a finetune step measured 34x slower than fp32 on such a CPU "
                    "(docs/benchmarks.md); --precision auto picks fp32 here")
    return precision


def autocast(device, precision: str):
    """The autocast context of a resolved precision on ``device`` (none for fp32)."""
    if precision == "fp32":
        return nullcontext()
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


# -------------------------------------------------------------------------------- distributed

@dataclass
class Distributed:
    """This process's place in a torchrun launch (rank 0 of 1 without one), and the few
    collective steps the commands need. Every method is a no-op in a single process."""

    rank: int = 0
    world: int = 1

    @classmethod
    def from_env(cls) -> "Distributed":
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))

    def init(self, cuda: bool = False, timeout: timedelta | None = None) -> None:
        """Join the process group: nccl for CUDA work (each rank on its own GPU), else gloo."""
        if self.world == 1:
            return
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            if cuda:
                torch.cuda.set_device(local_cuda_device())
            kwargs = {} if timeout is None else {"timeout": timeout}
            dist.init_process_group("nccl" if cuda else "gloo", **kwargs)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def share(self, value):
        """Rank 0's value, on every rank."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, value: int) -> int:
        if self.world == 1:
            return value
        import torch
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t)
        return int(t.item())

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
