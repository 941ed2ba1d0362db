"""One tensor-parallel rank in a process of its own: its model shard, its KV-cache heads, its steps.

Rank 0 takes commands from the engine over a pipe and hands each to the other ranks with a broadcast
on a gloo group (which reaches ranks on other hosts too), so every rank runs the same steps in the
same order; each then launches its forward pass, and the model's collectives (NCCL on GPUs, gloo on
CPUs) join them inside it. Every rank samples from the same gathered logits with the same seeds, so
each keeps the sampled tokens it needs for its next step on its own device; only rank 0 sends them back.

Commands: ("launch", StepInput), ("collect",) for the oldest launched step, ("stop",). A rank that
fails reports the error on its own pipe and exits non-zero; the engine's executor then stops the rest.
"""

from __future__ import annotations

import datetime
import logging
import signal
import sys
import traceback
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from qwen_serve.config import EngineConfig
from qwen_serve.distributed.parallel import ParallelContext
from qwen_serve.models.config import ModelConfig

log = logging.getLogger(__name__)

# How long a collective may wait for a rank that stopped answering (a rank on another host that
# died, where no process watcher sees it) before it fails instead of hanging.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)


@dataclass(slots=True)
class WorkerSpec:
    """What every rank needs to build its shard; rank 0 gets it from the engine and broadcasts it."""

    folder: Path | None  # None: random weights of model_config's shape
    model_config: ModelConfig
    config: EngineConfig
    dtype: torch.dtype
    max_model_len: int
    eos_token_ids: list[int]


@dataclass(slots=True)
class Rendezvous:
    """Where and how the ranks meet (torchrun's terms)."""

    world_size: int
    rank: int
    local_rank: int
    master_addr: str
    master_port: int
    device_type: str  # "cuda" or "cpu"


def run_worker(rendezvous: Rendezvous, conn: Connection, spec: WorkerSpec | None) -> None:
    """A worker process's main: `spec` is given to rank 0 only. Exits 1 after reporting a failure."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the engine stops us
    logging.basicConfig(level=logging.INFO, format=f"%(levelname)s rank{rendezvous.rank} %(name)s: %(message)s")
    try:
        _serve(rendezvous, conn, spec)
    except BaseException as err:  # noqa: BLE001 - reported to the engine, which stops every rank
        kind = "config" if isinstance(err, (ValueError, OSError)) else "error"
        try:
            conn.send((kind, f"rank {rendezvous.rank}: {err}", traceback.format_exc()))
        except OSError:
            pass  # the engine is gone
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _serve(rv: Rendezvous, conn: Connection, spec: WorkerSpec | None) -> None:
    from qwen_serve.worker.model_runner import ModelRunner

    if rv.device_type == "cuda":
        device = torch.device("cuda", rv.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend, init_method=f"tcp://{rv.master_addr}:{rv.master_port}", rank=rv.rank,
                                world_size=rv.world_size, timeout=COLLECTIVE_TIMEOUT)
    except Exception as err:
        if "address already in use" in str(err).lower():
            raise ValueError(f"--master-port {rv.master_port} on {rv.master_addr} is in use; choose another") from None
        raise
    group = dist.group.WORLD
    commands = group if backend == "gloo" else dist.new_group(backend="gloo")  # objects travel on the CPU
    box: list[Any] = [spec]
    dist.broadcast_object_list(box, src=0, group=commands)
    spec = box[0]
    parallel = ParallelContext(rv.rank, rv.world_size, group)
    runner = ModelRunner.load(spec.folder, spec.model_config, spec.config, device, spec.dtype, spec.max_model_len,
                              spec.eos_token_ids, parallel)
    blocks = torch.tensor([runner.num_blocks])
    dist.all_reduce(blocks, op=dist.ReduceOp.MIN, group=commands)  # every rank's cache holds this many
    conn.send(("ready", int(blocks)))
    handles: deque = deque()
    while True:
        box = [conn.recv() if rv.rank == 0 else None]
        dist.broadcast_object_list(box, src=0, group=commands)
        command = box[0]
        if command[0] == "launch":
            handles.append(runner.launch(command[1]))
        elif command[0] == "collect":
            output = runner.collect(handles.popleft())
            if rv.rank == 0:
                conn.send(("output", output))
        else:  # "stop"
            runner.close()
            dist.barrier(group=commands)  # no rank tears its group down while another still uses it
            return
