"""Tensor-parallel processes: rank 0 lives in the server process; it starts one worker process
per other GPU (torch.multiprocessing, spawn), hands each step's plan to them, watches them,
and stops them.

    rank 0 (server process)                        rank r (worker process, r = 1..N-1)
      scheduler -> SchedulerOutput
      TorchModelRunner.execute:
        WorkerGroup.send_step  --- pipe: bytes -->   recv -> TorchModelRunner.forward_only
        forward (all-reduces) <====== NCCL/gloo ======> forward (all-reduces)
        logits, sampling (rank 0 only)               synchronize, wait for the next step

The step message is the SchedulerOutput minus what workers never read (request ids and
sampling settings): per scheduled request its fed token ids, `num_computed_tokens`, block
table and `samples`, plus the finished ids, pickled once and written to one pipe per worker.
For a 256-request decode step that is about 34 kB, pickled in 0.08 ms and read back in
0.15 ms on the CPU machine (the whole SchedulerOutput pickles in 0.44 ms and reads back in
0.59 ms); a torch.distributed object broadcast would pickle the same bytes and add a
collective (on NCCL, a device copy and a synchronization) per step.

Failure and shutdown: a worker that dies is seen at once by a watcher thread (the process
sentinel); rank 0's next step raises TensorParallelError (a broken pipe or the recorded
failure), and a collective already waiting for the dead rank is aborted (gloo raises by
itself when the peer's socket closes). Workers exit when rank 0 sends STOP, when their pipe
closes, or when the parent process disappears (a watcher thread on the parent's sentinel),
so no worker outlives the server.
"""

from __future__ import annotations

import logging
import multiprocessing.connection
import os
import pickle
import shutil
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fitserve.config import ConfigError
from fitserve.core.outputs import ScheduledRequest, SchedulerOutput
from fitserve.layers.parallel import TensorParallel
from fitserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

STOP = b""  # the message that ends a worker's step loop
# Rendezvous and collectives: a rank that waits longer than this for the others raises (a
# step's collective never waits long; loading happens before the first collective).
DIST_TIMEOUT_S = 600.0
STARTUP_POLL_S = 0.2  # how often rank 0 checks that workers are alive while it waits for them
STOP_TIMEOUT_S = 10.0  # a worker that has not exited this long after STOP is terminated
_WORKER_PARAMS = SamplingParams()  # workers never sample; ScheduledRequest needs some settings


class TensorParallelError(RuntimeError):
    """A worker rank failed or vanished: the engine cannot step any more."""


# -- the step message ---------------------------------------------------------------------------


def encode_step(scheduler_output: SchedulerOutput) -> bytes:
    rows = tuple((r.token_ids, r.num_computed_tokens, r.block_table, r.samples, r.group_block_tables)
                 for r in scheduler_output.scheduled)
    return pickle.dumps((rows, tuple(scheduler_output.finished_request_ids)), protocol=pickle.HIGHEST_PROTOCOL)


def decode_step(payload: bytes) -> SchedulerOutput:
    rows, finished = pickle.loads(payload)
    scheduled = tuple(ScheduledRequest("", ids, num_computed, table, samples, _WORKER_PARAMS,
                                       group_block_tables=group_tables)
                      for ids, num_computed, table, samples, group_tables in rows)
    return SchedulerOutput(scheduled, frozenset(finished))


# -- process group ------------------------------------------------------------------------------


def init_group(tp: TensorParallel, init_file: str, device: torch.device) -> None:
    """Join the default process group: NCCL between GPUs, gloo on the CPU."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{init_file}",
                            rank=tp.rank, world_size=tp.size, timeout=timedelta(seconds=DIST_TIMEOUT_S))


def leave_group(abort: bool = False) -> None:
    if not dist.is_initialized():
        return
    if abort:
        try:
            dist.distributed_c10d._abort_process_group()  # unblocks a collective waiting for a dead rank
            return
        except Exception:  # noqa: BLE001 - best effort: an abort that cannot run leaves the destroy below
            logger.debug("aborting the process group failed", exc_info=True)
    dist.destroy_process_group()


def worker_device(device: torch.device, rank: int) -> torch.device:
    """Rank r uses the r-th GPU after rank 0's (CUDA_VISIBLE_DEVICES picks which GPUs these are)."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", (device.index or 0) + rank)


# -- rank 0's side ------------------------------------------------------------------------------


class WorkerGroup:
    """The worker ranks as rank 0 sees them: their processes and one pipe each."""

    def __init__(self, processes: list[Any], conns: list[multiprocessing.connection.Connection],
                 rendezvous_dir: str) -> None:
        self.processes, self.conns = processes, conns
        self._rendezvous_dir = rendezvous_dir
        self._failure: str | None = None
        self._closing = False
        self._watcher = threading.Thread(target=self._watch, name="fitserve-tp-watch", daemon=True)
        self._watcher.start()

    @property
    def failure(self) -> str | None:
        return self._failure

    def _watch(self) -> None:
        by_sentinel = {p.sentinel: p for p in self.processes}
        ready = multiprocessing.connection.wait(list(by_sentinel))
        if self._closing:
            return
        dead = by_sentinel[ready[0]]
        dead.join(STARTUP_POLL_S)  # the sentinel can fire before the exit code is collected
        self._failure = f"tensor-parallel worker {dead.name} exited with code {dead.exitcode}"
        logger.error("%s; the engine stops (restart the server).", self._failure)
        leave_group(abort=True)

    def wait_for(self, phase: str, timeout_s: float = DIST_TIMEOUT_S) -> None:
        """Block until every worker reports `phase`; a worker's ConfigError is re-raised as one."""
        deadline = time.monotonic() + timeout_s
        for rank, (process, conn) in enumerate(zip(self.processes, self.conns), start=1):
            while not conn.poll(STARTUP_POLL_S):
                if not process.is_alive():
                    raise TensorParallelError(f"tensor-parallel rank {rank} exited with code {process.exitcode} "
                                              f"before it was {phase}")
                if time.monotonic() > deadline:
                    raise TensorParallelError(f"tensor-parallel rank {rank} was not {phase} after {timeout_s:.0f} s")
            kind, detail = conn.recv()
            if kind == "config_error":
                raise ConfigError(f"On tensor-parallel rank {rank}: {detail}")
            if kind == "error":
                raise TensorParallelError(f"tensor-parallel rank {rank} failed before it was {phase}:\n{detail}")
            assert kind == phase, f"rank {rank} reported {kind!r}, expected {phase!r}"

    def send_step(self, scheduler_output: SchedulerOutput) -> None:
        """Hand one step to every worker (before rank 0 runs its own forward)."""
        if self._failure is not None:
            raise TensorParallelError(self._failure)
        payload = encode_step(scheduler_output)
        try:
            for conn in self.conns:
                conn.send_bytes(payload)
        except OSError as error:  # a worker's end of the pipe closed: it is gone
            raise TensorParallelError(self._failure or f"a tensor-parallel worker is gone ({error})") from None

    def shutdown(self) -> None:
        """Stop every worker (STOP, then terminate, then kill) and leave the process group; idempotent."""
        if self._closing:
            return
        self._closing = True
        for conn in self.conns:
            try:
                conn.send_bytes(STOP)
            except OSError:
                pass
        leave_group(abort=self._failure is not None)
        for process in self.processes:
            process.join(STOP_TIMEOUT_S)
            if process.is_alive():
                process.terminate()
                process.join(STOP_TIMEOUT_S)
            if process.is_alive():
                process.kill()
                process.join()
        for conn in self.conns:
            conn.close()
        shutil.rmtree(self._rendezvous_dir, ignore_errors=True)


WorkerBuild = Callable[..., Any]  # build(tp, device, report, *args) -> a TorchModelRunner


def start_workers(size: int, device: torch.device, build: WorkerBuild, build_args: tuple[Any, ...]) -> WorkerGroup:
    """Start ranks 1..size-1 and join the process group as rank 0; `build` (a module-level
    function, pickled by name) makes each worker's runner and calls report(phase) on the way."""
    context = mp.get_context("spawn")
    rendezvous_dir = tempfile.mkdtemp(prefix="fitserve-tp-")
    init_file = os.path.join(rendezvous_dir, "rendezvous")
    processes, conns = [], []
    for rank in range(1, size):
        parent_end, child_end = context.Pipe(duplex=True)
        process = context.Process(
            target=worker_main, name=f"fitserve-tp{rank}", daemon=True,
            args=(TensorParallel(rank, size), init_file, str(worker_device(device, rank)), child_end, build, build_args),
        )
        process.start()
        child_end.close()
        processes.append(process)
        conns.append(parent_end)
    group = WorkerGroup(processes, conns, rendezvous_dir)
    try:
        group.wait_for("started")
        init_group(TensorParallel(0, size), init_file, device)
    except BaseException:
        group.shutdown()
        raise
    return group


# -- a worker's side ----------------------------------------------------------------------------


def _exit_with_parent() -> None:
    """A worker never outlives rank 0's process, even when that one is killed."""
    parent = mp.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="fitserve-tp-parent", daemon=True).start()


def worker_main(tp: TensorParallel, init_file: str, device_name: str, conn: multiprocessing.connection.Connection,
                build: WorkerBuild, build_args: tuple[Any, ...]) -> None:
    """A worker process: join the group, build this rank's runner, then run steps until STOP."""
    _exit_with_parent()
    device = torch.device(device_name)
    if device.type == "cpu":  # the ranks share the machine's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp.size))
    try:
        conn.send(("started", None))
        init_group(tp, init_file, device)
        runner = build(tp, device, lambda phase: conn.send((phase, None)), *build_args)
    except ConfigError as error:
        conn.send(("config_error", str(error)))
        return
    except BaseException:  # noqa: BLE001 - reported to rank 0, which raises it
        conn.send(("error", traceback.format_exc()))
        return
    try:
        while True:
            try:
                payload = conn.recv_bytes()
            except EOFError:  # rank 0 closed its end without STOP: it is gone
                return
            if payload == STOP:
                return
            runner.forward_only(decode_step(payload))
    finally:
        leave_group()
