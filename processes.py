"""
Processes and devices for audiotx: the one device decision, torchrun's ranks, and the few
collectives training needs (a barrier, a broadcast, sums, gathering predictions, random states).

A leaf: it imports nothing of audiotx's. Without torchrun this process is rank 0 of 1 and every
collective returns what it is given. Not run on its own.
"""

import contextlib
import ctypes
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


class DeviceError(Exception):
    """A device or a process setting that cannot work here; the text is the whole message."""


@dataclass
class Worker:
    """This process's place among torchrun's (rank 0 of 1 without torchrun) and its device."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


WORKER = Worker()  # filled in by start_processes(); what shards, gathers or writes files reads it


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """--device auto -> cuda, else mps, else cpu. Asking is safe on any machine: nothing CUDA
    initialises unless a GPU is there."""
    cuda = torch.cuda.is_available()
    mps = torch.backends.mps.is_available()
    name = ("cuda" if cuda else "mps" if mps else "cpu") if name == "auto" else name
    if (name == "cuda" and not cuda) or (name == "mps" and not mps):
        raise DeviceError(f"--device {name}: no such device on this machine "
                          f"(torch {torch.__version__})")
    return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)


def keep_freed_memory():
    """glibc hands each freed block over 128 KiB back to the kernel, which zero-fills fresh pages
    when the next step's tensors touch them: a page fault per 4 KiB of every activation, every
    step. Blocks up to 32 MiB (a batch's activations) stay in the heap instead, and up to 1 GiB of
    freed heap is kept: the same numbers, fewer faults. glibc only; the user's MALLOC_ settings
    (glibc's environment variables) win."""
    if not sys.platform.startswith("linux") or any(k.startswith("MALLOC_") for k in os.environ):
        return
    with contextlib.suppress(OSError, AttributeError):  # not glibc: no mallopt
        mallopt = ctypes.CDLL(None).mallopt
        mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD (glibc's largest)
        mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
        mallopt(-2, 256 << 20)  # M_TOP_PAD: the heap grows in large steps


def start_processes(device: str):
    """One process on the device, or under torchrun (WORLD_SIZE > 1) one of many: GPU
    LOCAL_RANK of this machine with NCCL, or a CPU share with gloo. Only rank 0 prints."""
    keep_freed_memory()
    rank, world, local_rank = (int(os.environ.get(v, d)) for v, d in
                               (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    WORKER.rank, WORKER.world, WORKER.local_rank = rank, world, local_rank
    WORKER.device = pick_device(device, local_rank)
    if world == 1:
        return
    if WORKER.device.type == "mps":
        raise DeviceError("torchrun with --device mps: torch has no process group for MPS; use cpu")
    if WORKER.device.type == "cuda":
        torch.cuda.set_device(WORKER.device)
    dist.init_process_group("nccl" if WORKER.device.type == "cuda" else "gloo")
    if not WORKER.main:
        sys.stdout = open(os.devnull, "w")  # one copy of the progress lines; errors reach stderr


def stop_processes():
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier():
    if WORKER.world > 1:
        dist.barrier()


def broadcast_from_rank0(obj):
    """Rank 0's obj on every process."""
    if WORKER.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(*values) -> list:
    """Each value summed over the processes."""
    if WORKER.world == 1:
        return list(values)
    device = WORKER.device if WORKER.device.type == "cuda" else "cpu"  # NCCL reduces on the GPU
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def gather_rows(part):
    """Process r holds rows r, r + world, ... of a tensor (None when it holds none): the whole
    tensor, in order, on every process."""
    if WORKER.world == 1:
        return part
    parts = [None] * WORKER.world
    dist.all_gather_object(parts, None if part is None else part.cpu())
    held = [p for p in parts if p is not None]
    out = torch.empty(sum(len(p) for p in held), *held[0].shape[1:], dtype=held[0].dtype)
    for r, p in enumerate(parts):
        if p is not None:
            out[r::WORKER.world] = p
    return out


def to_device(t):
    """t on the device when it fits in half the free memory, else left on the CPU and moved a
    batch at a time (UrbanSound8K at 16 kHz is 2.2 GB)."""
    if t is None or WORKER.device.type == "cpu":
        return t
    cuda = WORKER.device.type == "cuda"
    free = torch.cuda.mem_get_info(WORKER.device)[0] if cuda else 2 * t.nbytes + 1
    return t.to(WORKER.device) if t.nbytes < free / 2 else t


def rng_states() -> list:
    """Every process's random state (the CPU's, and the GPU's where one is used), in rank order."""
    own = {"cpu": torch.get_rng_state()}
    if WORKER.device.type == "cuda":
        own["cuda"] = torch.cuda.get_rng_state(WORKER.device)
    if WORKER.world == 1:
        return [own]
    states = [None] * WORKER.world
    dist.all_gather_object(states, own)
    return states


def set_rng_states(saved: list, where: str):
    """This process's random state from rng_states()'s list; where names the file it came from."""
    if len(saved) != WORKER.world:
        raise DeviceError(f"{where}: saved by {len(saved)} process(es), resumed by "
                          f"{WORKER.world}; resume with the same number, or rerun with --restart")
    torch.set_rng_state(saved[WORKER.rank]["cpu"])
    if "cuda" in saved[WORKER.rank] and WORKER.device.type == "cuda":
        torch.cuda.set_rng_state(saved[WORKER.rank]["cuda"], WORKER.device)
