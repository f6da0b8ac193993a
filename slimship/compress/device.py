"""Where training runs: the device, the module inside a DDP wrapper, the process group of a torchrun job.

Every data-dependent decision of a sparsifier goes through :func:`mean_across_ranks` before use, and every
random draw comes from a generator made by :func:`decision_generator`, so all ranks of a torchrun job
take the same decisions. Without an initialised process group these are no-ops.

Device handling lives here only: :func:`resolve_device` turns ``auto | cpu | cuda | cuda:N | mps`` into a
device, :func:`torchrun_env` reads the launcher's variables, :func:`process_group` opens and always closes
the group, :func:`wrap_for_training` puts a model under DistributedDataParallel when there is a group (or,
inside ``training_strategy("fsdp")``, trains an FSDP2-sharded copy of it).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import datetime
import os
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from slimship.errors import CompressionError, ConfigError

#: device names a config may give (``cuda:N`` too); ``auto`` picks cuda, then mps, then cpu
DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
DEVICE_RULE = "auto, cpu, cuda, cuda:N or mps"
#: how long ranks wait in one collective, e.g. the other ranks for rank 0's export and benchmark
GROUP_TIMEOUT = datetime.timedelta(hours=4)
#: how training spreads over the ranks of a torchrun job: replicas (DDP) or parameter shards (FSDP2)
STRATEGIES = ("ddp", "fsdp")
_STRATEGY: contextvars.ContextVar[str] = contextvars.ContextVar("slimship_strategy", default="ddp")


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DistributedDataParallel / DataParallel (or `model` itself)."""
    while isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
        model = model.module
    return model


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    first = next(unwrap(model).parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def score_dtype(device: torch.device) -> torch.dtype:
    """float64 for scores and norms where the device has it (MPS has no float64)."""
    return torch.float32 if device.type == "mps" else torch.float64


def world_size() -> int:
    """Processes in the default group (1 without torch.distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without torch.distributed): only rank 0 writes files."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def mean_across_ranks(values: torch.Tensor) -> torch.Tensor:
    """`values` averaged over all ranks (in place when distributed; returned unchanged otherwise)."""
    size = world_size()
    if size > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= size
    return values


def decision_generator(device: torch.device, seed: int) -> torch.Generator:
    """A generator on `device` seeded with `seed`: the same stream on every rank."""
    return torch.Generator(device=device).manual_seed(int(seed))


def broadcast_from_rank0(values: torch.Tensor) -> torch.Tensor:
    """`values` as rank 0 holds them (in place when distributed)."""
    if world_size() > 1:
        dist.broadcast(values, src=0)
    return values


def distributed() -> bool:
    """True inside an initialised process group (even of one process)."""
    return dist.is_available() and dist.is_initialized()


def broadcast_object_from_rank0(value: Any) -> Any:
    """Rank 0's `value` (any picklable object) on every rank; `value` itself without a process group.

    Other ranks may pass None: they wait here until rank 0 has computed its value (e.g. a measurement).
    """
    if not distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@torch.no_grad()
def broadcast_module_from_rank0(model: nn.Module) -> nn.Module:
    """Every parameter and buffer of `model` as rank 0 holds them (in place; a no-op without a group)."""
    if distributed():
        for tensor in unwrap(model).state_dict().values():
            dist.broadcast(tensor, src=0)
    return model


def gather_object(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order (``[value]`` without a process group)."""
    if world_size() <= 1:
        return [value]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def rank_processes() -> list[tuple[str, int]]:
    """(host, pid) of every rank's process, in rank order (this process alone without a group)."""
    return gather_object((socket.gethostname(), os.getpid()))


def wait_for_exit(processes: list[tuple[str, int]], timeout_s: float = 10.0) -> None:
    """Wait until the other ranks' processes on this host have exited (at most `timeout_s`): a rank that
    fails exits after the ranks it stopped, so torchrun's summary names it alone."""
    here = socket.gethostname()
    others = [pid for host, pid in processes if host == here and pid != os.getpid()]
    deadline = time.monotonic() + timeout_s
    while others and time.monotonic() < deadline:
        others = [pid for pid in others if _alive(pid)]
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # an exited child of ours is a zombie until reaped: not alive
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as handle:
        return handle.read().rsplit(")", 1)[-1].split()[0] != "Z"
    return True


# ---- devices -----------------------------------------------------------------------------------------
def available_devices() -> list[str]:
    """The devices this machine has: cpu, then cuda:0..N-1, then mps."""
    found = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return found + (["mps"] if torch.backends.mps.is_available() else [])


def device_problem(spec: str) -> str | None:
    """Why `spec` cannot be used on this machine (None when it can)."""
    if not DEVICE_RE.match(spec):
        return f"{spec!r} is not a device name; expected {DEVICE_RULE}"
    if spec in ("auto", "cpu"):
        return None
    kind, _, index = spec.partition(":")
    if kind == "mps" and not torch.backends.mps.is_available():
        return f"this machine has no mps (available: {', '.join(available_devices())})"
    if kind == "cuda":
        count = torch.cuda.device_count()
        if count == 0 or (index and int(index) >= count):
            return f"this machine has no {spec} (available: {', '.join(available_devices())})"
    return None


def resolve_device(spec: str = "auto", local_rank: int | None = None) -> torch.device:
    """The device of `spec`: ``auto`` is cuda:LOCAL_RANK under torchrun (cuda:0 alone) when cuda exists,
    else mps, else cpu; plain ``cuda`` under torchrun is cuda:LOCAL_RANK too. Unusable -> ConfigError."""
    problem = device_problem(spec)
    if problem is not None:
        raise ConfigError(f"device {spec!r}: {problem}")
    env = torchrun_env()
    local = local_rank if local_rank is not None else (env.local_rank if env else 0)
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local % torch.cuda.device_count())
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    if spec == "cuda":
        return torch.device("cuda", local % torch.cuda.device_count())
    return torch.device(spec)


# ---- torchrun ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TorchrunEnv:
    """What torchrun tells each process: its rank, the number of processes, its rank on this node."""

    rank: int
    world_size: int
    local_rank: int


def torchrun_env(environ: dict[str, str] | None = None) -> TorchrunEnv | None:
    """The torchrun variables (WORLD_SIZE, RANK, LOCAL_RANK) when all three are set, else None."""
    env = os.environ if environ is None else environ
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    if not all(env.get(n, "").isdigit() for n in names):
        return None
    rank_, world, local = (int(env[n]) for n in names)
    return TorchrunEnv(rank_, world, local)


def backend_for(device: torch.device) -> str:
    """nccl for cuda, gloo for everything else."""
    return "nccl" if device.type == "cuda" else "gloo"


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[TorchrunEnv | None]:
    """Under torchrun: the default process group for `device` (destroyed on leaving, errors included).

    Without torchrun variables, or with a group already open (the caller's), nothing is done."""
    env = torchrun_env()
    if env is None or not dist.is_available() or dist.is_initialized():
        yield env
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend_for(device), timeout=GROUP_TIMEOUT)
    try:
        yield env
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def training_strategy(name: str) -> Iterator[None]:
    """Training loops inside spread over the ranks as `name` says (one of :data:`STRATEGIES`)."""
    if name not in STRATEGIES:
        raise ConfigError(f"training strategy {name!r} is not one of {', '.join(STRATEGIES)}")
    token = _STRATEGY.set(name)
    try:
        yield
    finally:
        _STRATEGY.reset(token)


def strategy() -> str:
    """The training strategy in force (``ddp`` unless inside ``training_strategy``)."""
    return _STRATEGY.get()


def wrap_for_training(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> nn.Module:
    """`model` under DistributedDataParallel when a process group has several ranks (as it is otherwise,
    or when already wrapped). Its parameters are synchronised from rank 0 when wrapped. Under the ``fsdp``
    strategy: an FSDP2-sharded copy (see :func:`shard_copy`) instead."""
    if world_size() <= 1 or isinstance(model, nn.parallel.DistributedDataParallel):
        return model
    if not any(p.requires_grad for p in model.parameters()):
        return model
    if strategy() == "fsdp":
        return shard_copy(model, optimizer)
    device = device_of(model)
    ids = [device] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


@torch.no_grad()
def shard_copy(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> nn.Module:
    """A copy of `model` sharded with FSDP2 over the default group (rank 0's values): every module holding
    parameters of its own is one unit, then the root. `optimizer`'s parameter groups are pointed at the
    copy's parameters (by name); it must not hold state yet."""
    from torch.distributed.fsdp import fully_shard  # seconds to import: only when sharding

    if optimizer is not None and optimizer.state:
        raise CompressionError(
            "training strategy fsdp: the optimizer already holds state (a resumed run?); resuming under "
            "fsdp is not supported: train without a checkpoint or with strategy ddp"
        )
    broadcast_module_from_rank0(model)
    net = copy.deepcopy(model)
    for module in list(net.modules())[1:]:
        if any(True for _ in module.parameters(recurse=False)):
            fully_shard(module)
    fully_shard(net)
    net.slimship_shard_copy = True  # type: ignore[assignment]
    if optimizer is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        sharded = dict(net.named_parameters())
        for group in optimizer.param_groups:
            group["params"] = [sharded[names[id(p)]] for p in group["params"]]
    return net


def is_shard_copy(net: nn.Module) -> bool:
    """True for what :func:`shard_copy` returned (hooks then get it, not the plain model)."""
    return bool(getattr(net, "slimship_shard_copy", False))


def unshard_into(net: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Copy the trained shards of `net` into the plain `model` on every rank (the gathered full state
    dict) and point `optimizer` back at `model`'s parameters; nothing for a model that was not copied."""
    if not is_shard_copy(net):
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(net, options=StateDictOptions(full_state_dict=True))
    model.load_state_dict(full)
    if optimizer is not None:
        names = {id(p): n for n, p in net.named_parameters()}
        plain = dict(model.named_parameters())
        for group in optimizer.param_groups:
            group["params"] = [plain[names[id(p)]] for p in group["params"]]
        optimizer.state.clear()  # the sharded moments belong to the copy


def to_device(value: Any, device: torch.device) -> Any:
    """Tensors in `value` (a tensor, or tuples / lists / dicts of them) on `device` (others unchanged)."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=device.type == "cuda")
    if isinstance(value, tuple | list):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value
