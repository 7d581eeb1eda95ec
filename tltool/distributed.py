"""Data-parallel training under torchrun: torch.distributed and DistributedDataParallel, nothing home-made.

`torchrun --nproc_per_node N -m tltool finetune CONFIG` starts N processes with RANK, WORLD_SIZE,
LOCAL_RANK and the rendezvous in their environment; `setup()` joins them into one process group (gloo on
CPU, nccl on CUDA, one GPU per local rank). Everything else here is a thin helper over torch.distributed
that is a no-op in a single process, so the training loop has one code path:

- the samplers shard each epoch's order across ranks (data.py), so every rank sees batch_size images per step
  and the global batch is batch_size x world size;
- evaluation sums its counts over ranks (`all_reduce_sum`), so the val metrics are those of the whole set;
- per-step flags (a stop request, a non-finite loss, a batch that failed to decode) are reduced with `any_rank`,
  so every rank takes the same branch and none waits alone in a collective;
- only rank 0 writes files and prints; every rank enters the barrier after a save.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from tltool.device import resolve_device
from tltool.errors import ConfigError, DataError, TltoolError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place in the job (rank 0 of 1 outside torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def shard(self) -> tuple[int, int]:
        return self.rank, self.world_size


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher that sets the env:// variables)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def env_rank() -> int:
    """This process's rank from torchrun's environment, before the process group exists (0 outside torchrun)."""
    return _env_int("RANK") if launched() else 0


def restart_count() -> int:
    """How many times torchrun restarted the workers (`--max-restarts`): 0 on the first attempt."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def current() -> World:
    """The world of the initialized process group, or rank 0 of 1."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return World()


def _env_int(name: str) -> int:
    value = os.environ.get(name, "")
    if not value.isdigit():
        raise ConfigError(f"{name}={value!r} in the environment is not a number", "launch with torchrun")
    return int(value)


def setup(device_name: str, timeout_s: float) -> tuple[World, torch.device]:
    """Join the torchrun job (if launched by one) and pick this rank's device.

    CUDA: one device per local rank (cuda:LOCAL_RANK), backend nccl; CPU: backend gloo. The process-group
    timeout bounds how long a rank waits in a collective for one that died or hangs.
    """
    if not launched() or _env_int("WORLD_SIZE") <= 1:
        return World(), resolve_device(device_name)
    rank, world_size, local_rank = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    device = resolve_device(device_name)
    if device.type == "mps":
        raise ConfigError("torchrun with run.device=mps: DDP does not run on MPS", "set run.device=cpu")
    if device.type == "cuda":
        if device_name not in ("auto", "cuda") and device.index != local_rank:
            raise ConfigError(
                f"run.device={device_name} under torchrun: each process uses the GPU of its local rank",
                "set run.device=cuda (or auto); choose GPUs with CUDA_VISIBLE_DEVICES",
            )
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise ConfigError(
                f"local rank {local_rank} has no GPU: this machine has {count}",
                f"start at most {count} processes per node (torchrun --nproc_per_node {count})",
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = timedelta(seconds=timeout_s)
        kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
        # torchrun's store outlives a restart (--max-restarts): the keys of each attempt get their own
        # prefix, or a restarted rank can read the address a dead one published and fail to connect.
        store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
        store = dist.PrefixStore(f"tltool/attempt_{restart_count()}", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout, **kwargs)
    return World(rank, world_size, local_rank), device


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    # nccl reduces CUDA tensors only; gloo CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over ranks (itself in a single process), on the device it came from."""
    if not current().enabled:
        return tensor
    reduced = tensor.to(_comm_device(), copy=True)
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced.to(tensor.device)


def all_reduce_max(values: list[float]) -> list[float]:
    if not current().enabled:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def any_rank(*flags: bool) -> tuple[bool, ...]:
    """Each flag OR-ed over ranks: every rank then takes the same branch."""
    return tuple(value > 0 for value in all_reduce_max([float(bool(f)) for f in flags]))


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """The rows of `tensor` of every rank, in rank order, differentiable (itself in a single process).

    For a loss computed over the global batch (MCC's class confusion): every rank computes it on the
    gathered rows, and the backward sends each rank the gradient of its own rows summed over ranks, which
    DDP's average turns into the single-process gradient. Ranks whose row counts differ (an image that
    failed to decode) each keep their own rows.
    """
    if not current().enabled:
        return tensor
    counts = all_reduce_max([float(tensor.shape[0]), -float(tensor.shape[0])])
    if counts[0] != -counts[1]:
        return tensor
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor.contiguous()))


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order; `[obj]` in a single process."""
    if not current().enabled:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def main_computes(compute: Callable[[], T]) -> T:
    """`compute()` run by rank 0 only and its result sent to every rank (`broadcast_object_list`); in a single
    process, `compute()`. A TltoolError rank 0 raises is raised on every rank (the same one line), so no rank
    waits for a result that never comes; any other exception of rank 0 ends the other ranks with a one-line
    DataError naming it (rank 0 shows its traceback)."""
    world = current()
    if not world.enabled:
        return compute()
    message: list[Any] = [None]
    failure: BaseException | None = None
    if world.is_main:
        try:
            message[0] = ("ok", compute())
        except TltoolError as exc:
            failure = exc
            message[0] = ("error", type(exc), exc.what, exc.fix, exc.details)
        except BaseException as exc:  # (a bug, or Ctrl-C: the others must not wait for the result)
            failure = exc
            message[0] = ("crash", f"{type(exc).__name__}: {exc}")
    dist.broadcast_object_list(message, src=0)
    if failure is not None:
        raise failure
    kind, *payload = message[0]
    if kind == "ok":
        return payload[0]
    if kind == "error":
        error_type, what, fix, details = payload
        raise error_type(what, fix, details)
    raise DataError(f"rank 0 failed while computing what every rank needs ({payload[0]})", "see rank 0's error")


def barrier() -> None:
    if current().enabled:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def wrap(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`module` in DistributedDataParallel under torchrun (itself otherwise).

    DDP registers its gradient hooks on the parameters that require grad when it is built: a plan that opens
    more of the backbone wraps the model again.
    """
    if not current().enabled or not any(p.requires_grad for p in module.parameters()):
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def no_sync(module: torch.nn.Module, sync: bool) -> Any:
    """DDP's no_sync() for a micro-batch whose gradients are only accumulated (no all-reduce yet)."""
    if sync or not hasattr(module, "no_sync"):
        return contextlib.nullcontext()
    return module.no_sync()


def shard_bounds(size: int, world: World) -> tuple[int, int]:
    """Rank's contiguous slice [start, stop) of `size` items (sizes differ by at most one)."""
    per, extra = divmod(size, world.world_size)
    start = world.rank * per + min(world.rank, extra)
    return start, start + per + (1 if world.rank < extra else 0)


def launch(nproc: int, tltool_args: list[str]) -> int:
    """`tltool finetune --nproc N ...`: what `torchrun --standalone --nproc_per_node N -m tltool ...` does.

    Returns the job's exit code: 0, or the exit code of the first process that failed (2 for a bad input,
    130 for Ctrl-C, 128+N for a process killed by signal N, 75 for run.time_limit). A stop signal reaching
    this launcher (FORWARDED_SIGNALS) is forwarded by torchrun's agent to the workers, which save and stop;
    the agent gives them SHUTDOWN_TIMEOUT_S seconds before SIGKILL, and the launcher exits 128 + N.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", f"--signals-to-handle={FORWARDED_SIGNALS}",
         f"--shutdown-timeout={SHUTDOWN_TIMEOUT_S}", "-m", "tltool", *tltool_args]
    )  # fmt: skip
    try:
        run(args)
    except ChildFailedError as exc:
        _, failure = exc.get_first_failure()
        code = failure.exitcode
        return code if code > 0 else 128 - code
    except SignalException as exc:
        return 128 + int(exc.sigval)
    return 0


# The signals torchrun's agent forwards to the workers (its default list plus SIGUSR1, Slurm's warning
# signal), and how long it waits for them to save and exit before it SIGKILLs them.
FORWARDED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
SHUTDOWN_TIMEOUT_S = 60
