"""Between the engine and the model: one runner in this process, or N tensor-parallel worker processes.

Both take the same plain `StepInput` and give back the same `RunnerOutput`, and both can hold a launched
step while the engine schedules the next (overlapped steps). `UniprocExecutor` (N = 1) calls the runner
directly, with nothing pickled. `MultiprocExecutor` (N > 1) starts one process per local rank
(worker/worker.py) and talks to rank 0; a watcher thread notices a rank that exits and stops the
others, so a dead rank makes the next step fail at once (`ExecutorDeadError`) instead of hanging in a
collective. On several hosts, each host runs its own ranks (`run_node_workers`); they meet at
`--master-addr:--master-port` the way torchrun's ranks do.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import socket
import threading
from multiprocessing.connection import Connection, wait
from typing import Any

import torch

from qwen_serve.config import EngineConfig
from qwen_serve.distributed.parallel import check_tensor_parallel
from qwen_serve.models.config import ModelConfig
from qwen_serve.worker.step_input import RunnerOutput, StepInput
from qwen_serve.worker.worker import Rendezvous, WorkerSpec, run_worker

log = logging.getLogger(__name__)

# How long close() lets workers stop by themselves before they are killed.
STOP_GRACE_S = 10.0


class ExecutorDeadError(RuntimeError):
    """A worker process failed or exited: the model is gone and the engine cannot step any more."""


class UniprocExecutor:
    def __init__(self, spec: WorkerSpec, device: torch.device) -> None:
        from qwen_serve.worker.model_runner import ModelRunner

        self.runner = ModelRunner.load(spec.folder, spec.model_config, spec.config, device, spec.dtype,
                                       spec.max_model_len, spec.eos_token_ids)
        self.num_blocks = self.runner.num_blocks

    def launch(self, step: StepInput) -> Any:
        return self.runner.launch(step)

    def collect(self, handle: Any) -> RunnerOutput:
        return self.runner.collect(handle)

    def close(self) -> None:
        self.runner.close()


class MultiprocExecutor:
    def __init__(self, spec: WorkerSpec, device: torch.device) -> None:
        config = spec.config
        self.procs, conns = _start_ranks(config, device.type, spec)
        self.conn = conns[0]  # rank 0's pipe: commands out, outputs back
        self._closing = False
        self.dead: str | None = None
        try:
            self.num_blocks = _wait_ready(self.procs, conns)
        except BaseException:
            self._stop_all(graceful=False)
            raise
        self._conns = conns
        self._watcher = threading.Thread(target=self._watch, name="qwen-serve-tp-watch", daemon=True)
        self._watcher.start()

    def launch(self, step: StepInput) -> None:
        self._send(("launch", step))

    def collect(self, handle: None) -> RunnerOutput:
        """The oldest launched step's output (the workers keep launched steps in order)."""
        self._send(("collect",))
        while not self.conn.poll(0.2):
            if self.dead:
                raise ExecutorDeadError(self.dead)
        try:
            kind, *payload = self.conn.recv()
        except (EOFError, OSError):
            raise ExecutorDeadError(self.dead or "tensor-parallel rank 0 exited") from None
        if kind != "output":
            self.dead = payload[0]
            raise ExecutorDeadError(payload[0])
        return payload[0]

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self.dead is None:
            try:
                self.conn.send(("stop",))
            except OSError:
                pass
        self._stop_all(graceful=self.dead is None)

    def _send(self, command: tuple) -> None:
        if self.dead:
            raise ExecutorDeadError(self.dead)
        try:
            self.conn.send(command)
        except OSError:
            raise ExecutorDeadError(self.dead or "tensor-parallel rank 0 exited") from None

    def _watch(self) -> None:
        """Waits for any rank to exit; unless the engine is closing, stops the others (a collective
        would wait for the dead rank forever) and records why."""
        alive = {p.sentinel: p for p in self.procs}
        while alive and not self._closing:
            for sentinel in wait(list(alive), timeout=0.5):
                proc = alive.pop(sentinel)
                if self._closing:
                    return
                if self.dead is None:
                    index = self.procs.index(proc)
                    # Rank 0's pipe is the engine's to read (its error arrives in place of an output).
                    reason = _reported_error(self._conns[index]) if index else None
                    self.dead = reason or f"tensor-parallel worker {proc.name} exited with code {proc.exitcode}"
                    log.error("%s; stopping the other ranks", self.dead)
                # No is_alive() here: it reaps, and a reap racing close()'s join in the engine's thread makes
                # one of them see the process alive after all (ECHILD). kill() of an exited rank is a no-op.
                for p in self.procs:
                    p.kill()

    def _stop_all(self, graceful: bool) -> None:
        for p in self.procs:
            p.join(STOP_GRACE_S if graceful else 0.1)
            if p.is_alive():
                p.kill()
                p.join(5)


def _reported_error(conn: Connection) -> str | None:
    """The error message a rank sent before it exited, if any (rank 0's pipe may hold outputs first)."""
    try:
        while conn.poll(0):
            message = conn.recv()
            if message[0] in ("config", "error"):
                return message[1]
    except (EOFError, OSError):
        pass
    return None


def make_executor(spec: WorkerSpec, device: torch.device) -> UniprocExecutor | MultiprocExecutor:
    """Checks the parallel layout against the model before anything is loaded, then starts the ranks."""
    config, cfg = spec.config, spec.model_config
    check_parallel_config(config, cfg, device.type)
    if config.tensor_parallel_size == 1:
        return UniprocExecutor(spec, device)
    return MultiprocExecutor(spec, device)


def check_parallel_config(config: EngineConfig, cfg: ModelConfig, device_type: str) -> None:
    size = config.tensor_parallel_size
    check_tensor_parallel(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size, size)
    if size == 1:
        return
    quant = (cfg.raw.get("quantization_config") or {}).get("quant_method") or config.quantization
    if quant == "gguf":
        raise ValueError("a GGUF model cannot be split by --tensor-parallel-size yet: its blocks run along the inputs "
                         "of every row linear; serve it on one device, or an AWQ / GPTQ / bf16 checkpoint")
    local = size // config.nnodes
    if device_type == "cuda" and local > torch.cuda.device_count():
        raise ValueError(f"--tensor-parallel-size {size} over {config.nnodes} host(s) needs {local} GPUs here; "
                         f"this host has {torch.cuda.device_count()}")


def run_node_workers(config: EngineConfig) -> int:
    """A host other than the first: starts its ranks and waits for them (the first host's engine drives
    them). Returns the exit status: 0 when they were stopped cleanly, 1 when one failed."""
    device_type = config.device.split(":")[0]
    if device_type == "auto":
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    procs, conns = _start_ranks(config, device_type, None)
    status = 0
    for proc, conn in zip(procs, conns):
        proc.join()
        if proc.exitcode:
            status = 1
            log.error("%s", _reported_error(conn) or f"{proc.name} exited with code {proc.exitcode}")
    return status


def _start_ranks(config: EngineConfig, device_type: str, spec: WorkerSpec | None
                 ) -> tuple[list[mp.process.BaseProcess], list[Connection]]:
    """Starts this host's ranks: node_rank * local .. (node_rank + 1) * local - 1; rank 0 gets `spec`."""
    size, nodes = config.tensor_parallel_size, config.nnodes
    local = size // nodes
    addr = config.master_addr or os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = config.master_port or int(os.environ.get("MASTER_PORT", 0)) or _free_port()
    ctx = mp.get_context("spawn")  # CUDA cannot be forked; a clean interpreter per rank
    procs, conns = [], []
    for local_rank in range(local):
        rank = config.node_rank * local + local_rank
        parent, child = ctx.Pipe()
        rv = Rendezvous(size, rank, local_rank, addr, port, device_type)
        proc = ctx.Process(target=run_worker, args=(rv, child, spec if rank == 0 else None),
                           name=f"qwen-serve-tp{rank}", daemon=True)
        proc.start()
        child.close()  # the parent keeps one end, so a rank's exit closes the pipe
        procs.append(proc)
        conns.append(parent)
    return procs, conns


def _wait_ready(procs: list[mp.process.BaseProcess], conns: list[Connection]) -> int:
    """Waits until every local rank has loaded its shard; returns the KV blocks every rank holds."""
    waiting = dict(zip(conns, procs))
    num_blocks = 0
    while waiting:
        for conn in wait(list(waiting)):
            try:
                kind, *payload = conn.recv()
            except (EOFError, OSError):
                proc = waiting[conn]
                proc.join(5)
                raise ExecutorDeadError(f"tensor-parallel worker {proc.name} exited with code {proc.exitcode} "
                                        "while loading") from None
            if kind == "config":
                raise ValueError(payload[0])
            if kind == "error":
                log.error("%s", payload[1])
                raise ExecutorDeadError(payload[0])
            num_blocks = payload[0]
            del waiting[conn]
    return num_blocks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
