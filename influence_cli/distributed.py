"""Under `torchrun`: the process group, this rank's training rows, and the collectives of the reductions.

`torchrun --nproc-per-node K --no-python infl selfcheck -c CFG` starts K copies of the command with
WORLD_SIZE, RANK, LOCAL_RANK and MASTER_ADDR/PORT set. `start` (called by `Run.open` for the split
commands: selfcheck, rank, verify) joins the group: gloo on CPU, NCCL on CUDA (`device: auto` or `cuda`
takes cuda:LOCAL_RANK), with a timeout of INFL_DIST_TIMEOUT seconds (default 1800) on every collective.

Rows. The training rows split into contiguous, unpadded, batch-aligned ranges, one per rank: rank r holds
the cache shards `resume.job_of(k, K, W) == r`. The Problem's train loader stays the full loader (every
consumer that needs all rows still sees them); it carries this rank's `local` loader beside it
(`SplitLoader`), and the reduction points (`GradientSource.hvp`, `linear_head_hessian`,
`objective_gradient`, EK-FAC's fit) iterate `part(loader)` and `all_sum` their partial sums, so every rank
ends with the same statistics of all n rows, each counted once. A loader that is not split (a test loader,
a relabelled copy) is neither split nor reduced.

Lifetime. The fit runs on all ranks together (statistics reduced; eigendecompositions and Cholesky
factorizations then run identically on every rank, which all hold the same reduced matrix). The scoring
pass (`Run.shards` -> resume.split_shards) runs each rank `alone()`: its shards need no other rank's
data, and solves inside them (cg/lissa per-row self-influence, rank's test-side solve) use full-data
HVPs on that rank, identical on every rank, so no collective can be left unmatched. Then a barrier, and
the group is left (`leave`; also `Run.end_split` for verify, the kNN pass, and `Run.finish` as a net):
ranks other than 0 raise `RankDone` (a SystemExit(0): the CLI exits 0 printing nothing), rank 0 merges
and continues alone, every reduction point then single-process on the full loader.

Failures. A collective that fails (a peer died: gloo sees the closed connection; or INFL_DIST_TIMEOUT
passed) raises DistributedError, exit 4, naming the rank; finished shards stay in the cache.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .errors import InflError

DEFAULT_TIMEOUT_S = 1800.0
SPLIT_COMMANDS = ("selfcheck", "rank", "verify")  # the others run on rank 0 only (`rank_zero_only`)
FAULT_ENV = "INFL_FAULT"  # tests: "rank=R,after_shards=S": rank R SIGKILLs itself after committing S shards


class DistributedError(InflError):
    """A peer rank died, or a collective timed out: the whole job stops. Exit code 4."""

    exit_code = 4


class RankDone(SystemExit):  # noqa: N818 - not an error: the normal end of a rank other than 0
    """Raised on ranks other than 0 once their share is done and committed: exit 0, nothing printed."""

    def __init__(self) -> None:
        super().__init__(0)


@dataclass
class World:
    rank: int
    size: int
    local_rank: int
    backend: str
    device: torch.device
    live: bool = True


_world: World | None = None


def environment() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when started by torchrun with more than one process, else None."""
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if size <= 1 or "RANK" not in os.environ or "MASTER_ADDR" not in os.environ:
        return None
    return int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0") or 0)


def device_for(setting: str, default: torch.device) -> torch.device:
    """The device of this rank: `auto` (with CUDA) and `cuda` mean cuda:LOCAL_RANK; else `default`."""
    env = environment()
    if env is None or default.type != "cuda" or setting not in ("auto", "cuda"):
        return default
    return torch.device("cuda", env[2] % max(torch.cuda.device_count(), 1))


def timeout_seconds() -> float:
    text = os.environ.get("INFL_DIST_TIMEOUT", "")
    try:
        value = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        value = -1.0
    if value <= 0:
        from .errors import ConfigError

        raise ConfigError(f"INFL_DIST_TIMEOUT: {text!r} is not a positive number of seconds",
                          hint="unset it (default 1800) or give seconds, e.g. INFL_DIST_TIMEOUT=600")
    return value


def start(device: torch.device) -> World:
    """Join torchrun's process group (gloo on CPU, NCCL on CUDA); the World of this process."""
    global _world
    env = environment()
    if env is None:  # an internal invariant (callers check environment() first): exit 4, not a silent pass
        raise RuntimeError("internal: distributed.start() outside a torchrun process")
    if _world is not None and _world.live:
        return _world
    import torch.distributed as dist

    rank, size, local = env
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_seconds()))
    except (RuntimeError, ValueError) as e:
        raise DistributedError(f"torchrun: rank {rank} of {size} could not join the process group ({e})",
                               hint="check MASTER_ADDR/MASTER_PORT and that every rank started; raise"
                                    " INFL_DIST_TIMEOUT if the ranks start far apart") from None
    _world = World(rank, size, local, backend, device)
    return _world


def joined() -> bool:
    """Whether this process joined a process group (live or since left)."""
    return _world is not None


def world() -> World | None:
    """The live World (None when not under torchrun, or after `leave`)."""
    return _world if _world is not None and _world.live else None


def active() -> bool:
    return world() is not None


def rank_zero_only(command: str) -> str | None:
    """Under torchrun, for a command that is not split over ranks: None on rank 0 (it runs alone),
    else the line this rank says before exiting 0."""
    env = environment()
    if env is None or command in SPLIT_COMMANDS or env[0] == 0:
        return None
    return f"infl {command}: runs on rank 0 only under torchrun; rank {env[0]} of {env[1]} exits"


def exit_unless_rank_zero(command: str) -> None:
    """Under torchrun, for a command not split over ranks (train, check, explain): rank 0 runs it alone;
    the other ranks say so in one line on stderr (the library's one print: there is no UI on these
    ranks to hand it to) and exit 0."""
    note = rank_zero_only(command)
    if note is not None:
        import sys

        sys.stderr.write(note + "\n")
        raise RankDone()


class SplitLoader:
    """The full training loader (what iterating yields) with this rank's contiguous `local` part."""

    def __init__(self, full: Iterable[Any], local: Iterable[Any], rows: range) -> None:
        self.full, self.local, self.rows = full, local, rows

    def __iter__(self) -> Iterator[Any]:
        return iter(self.full)


def part(loader: Iterable[Any]) -> tuple[Iterable[Any], bool]:
    """(what a reduction point iterates, whether it must `all_sum` the result): this rank's rows of a
    split loader while the group is live, else the loader itself and no reduction."""
    if active() and isinstance(loader, SplitLoader):
        return loader.local, True
    return loader, False


def _guard(what: str) -> DistributedError:
    w = _world
    where = f"rank {w.rank} of {w.size}" if w is not None else "this rank"
    return DistributedError(f"torchrun: {what} failed on {where}: another rank died or the collective timed out"
                            f" (INFL_DIST_TIMEOUT={timeout_seconds():g} s)",
                            hint="finished shards are kept in the cache: rerun the same command to resume;"
                                 " the failed rank's own error, if any, is above")


def _reason(e: Exception) -> str:
    """The gist of a backend error: 'Connection reset by peer', not gloo's file:line prefix and advice."""
    import re

    text = re.sub(r"\[[^\]]*\]:?\d*:?", "", str(e).splitlines()[0] if str(e) else "").strip(" :")
    return (re.sub(r"\s+", " ", text.split(". ")[0]) or type(e).__name__)[:120]


def all_sum(t: Tensor) -> Tensor:
    """Sum `t` over the ranks, in place (no-op when not live); returns t."""
    w = world()
    if w is None:
        return t
    import torch.distributed as dist

    moved = t if t.device == w.device or w.backend == "gloo" and t.device.type == "cpu" else t.to(w.device)
    try:
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
    except Exception as e:  # gloo: RuntimeError (peer closed), NCCL: DistBackendError / timeout
        raise _guard(f"all_reduce ({_reason(e)})") from None
    if moved is not t:
        t.copy_(moved)
    return t


def sum_numbers(*values: float) -> list[float]:
    """Python numbers summed over the ranks, in float64."""
    w = world()
    if w is None:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=w.device if w.backend == "nccl" else "cpu")
    return [float(v) for v in all_sum(t).cpu()]


def sum_attributes(objects: Iterable[Any], *names: str) -> None:
    """Sum the named attributes (tensors in place, ints) of every object over the ranks (EK-FAC's layer
    factors: covariances, positions, eigenvalue corrections). No-op when not live."""
    if not active():
        return
    objects = list(objects)
    for obj in objects:
        for name in names:
            value = getattr(obj, name)
            if isinstance(value, Tensor):
                all_sum(value)
    ints = [(obj, name) for obj in objects for name in names if isinstance(getattr(obj, name), int)]
    if ints:
        totals = sum_numbers(*(float(getattr(obj, name)) for obj, name in ints))
        for (obj, name), total in zip(ints, totals, strict=True):
            setattr(obj, name, int(round(total)))


def broadcast(t: Tensor, src: int = 0) -> Tensor:
    """Rank `src`'s `t` on every rank, in place (no-op when not live)."""
    w = world()
    if w is None:
        return t
    import torch.distributed as dist

    moved = t if w.backend == "gloo" and t.device.type == "cpu" or t.device == w.device else t.to(w.device)
    try:
        dist.broadcast(moved, src)
    except Exception as e:  # noqa: BLE001
        raise _guard(f"broadcast ({_reason(e)})") from None
    if moved is not t:
        t.copy_(moved)
    return t


def agree(flag: bool) -> bool:
    """Rank 0's `flag` on every rank."""
    w = world()
    if w is None:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64, device=w.device if w.backend == "nccl" else "cpu")
    return bool(broadcast(t)[0] > 0)


def leave() -> World | None:
    """Leave the process group (after the barrier of the scoring pass): rank 0 returns its World (now
    not live; it continues alone), other ranks raise RankDone."""
    global _world
    w = world()
    if w is None:
        return None
    import torch.distributed as dist

    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001, S110 - best effort: the group is of no further use
        pass
    w.live = False
    _world = w
    if w.rank != 0:
        raise RankDone()
    return w


@contextmanager
def alone() -> Iterator[None]:
    """Within the block this rank works by itself: reduction points see the full loader and no collective
    runs (the scoring pass: each rank's rows need no other rank's data)."""
    w = world()
    if w is None:
        yield
        return
    w.live = False
    try:
        yield
    finally:
        w.live = True


def fault_hook(rank: int, shards_done: int) -> None:
    """Tests: INFL_FAULT=rank=R,after_shards=S makes rank R kill itself (SIGKILL) after S committed shards."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    fields = dict(item.split("=", 1) for item in spec.split(",") if "=" in item)
    if int(fields.get("rank", -1)) == rank and shards_done >= int(fields.get("after_shards", 0)):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def reset() -> None:
    """Forget the World (tests that run several commands in one process)."""
    global _world
    _world = None
