"""Data-parallel training over CPU cores from a plain ``python train.py hparams.yaml`` command.

:func:`spawn_cpu_workers` starts N worker processes the way ``torchrun`` would (``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``, the cores shared out as intra-op threads), so
speechbrain's own DDP support (gloo) takes over in each, and the user's command stays
``python train.py hparams.yaml``. Whether it pays depends on the machine: each step adds a gradient
all-reduce, and on 2 cores the workers compete with it (see the ASR recipe's README for a measurement).

The workers die with the launching process (Linux ``PR_SET_PDEATHSIG``), so ``kill -9`` of the command
stops the whole run and the next run resumes from the last checkpoint; if one worker fails, the others
are stopped and its exit status is returned.

Example
-------
>>> should_spawn(1, {"device": "cpu"})
False
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time

__all__ = ["should_spawn", "spawn_cpu_workers"]


def should_spawn(num_processes: int, run_opts: dict) -> bool:
    """True when this is a plain (not ``torchrun``) CPU launch asking for more than one process.

    A process is already launched (by ``torchrun`` or as one of our workers) when speechbrain sees a rank and
    a local rank, the condition under which its ``ddp_init_group`` starts DDP.
    """
    from speechbrain.utils.distributed import get_local_rank, get_rank

    if int(num_processes) < 1:
        raise ValueError(f"cpu_processes must be >= 1; got {num_processes}")
    already_launched = get_rank() is not None and get_local_rank() is not None
    device = str(run_opts.get("device") or "cpu")
    return (
        int(num_processes) > 1
        and not already_launched
        and device.startswith("cpu")
        and not run_opts.get("data_parallel_backend", False)
    )


def _die_with_parent() -> None:
    """Runs in each worker before exec: SIGKILL when the launching process goes away (Linux only)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn_cpu_workers(script: str, argv: list[str], num_processes: int, threads_per_process: int | None = None) -> int:
    """Run ``python script *argv`` as ``num_processes`` DDP workers (gloo) and wait for them.

    Arguments
    ---------
    script : str
        Path of the training script the workers run.
    argv : list of str
        Its arguments (the YAML file and overrides); ``--distributed_backend=gloo`` is added when absent.
    num_processes : int
        Number of worker processes (one per core is the usual choice).
    threads_per_process : int, optional
        Intra-op threads per worker; default: the machine's cores divided among the workers.

    Returns
    -------
    int
        0 when every worker succeeded, else the exit status of the first that failed.
    """
    if threads_per_process is None:
        threads_per_process = max(1, (os.cpu_count() or 1) // num_processes)
    argv = list(argv)
    if not any(a.startswith("--distributed_backend") for a in argv):
        argv.append("--distributed_backend=gloo")
    port = _free_port()
    workers = []
    for rank in range(num_processes):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(num_processes),
            LOCAL_WORLD_SIZE=str(num_processes),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS=str(threads_per_process),
            MKL_NUM_THREADS=str(threads_per_process),
        )
        workers.append(subprocess.Popen([sys.executable, script, *argv], env=env, preexec_fn=_die_with_parent))
    status = 0
    try:
        while True:
            codes = [w.poll() for w in workers]  # poll every worker, not just up to the first running one
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                status = failed[0]
                break
            if all(c == 0 for c in codes):
                break
            time.sleep(0.5)
    finally:
        for w in workers:
            if w.poll() is None:
                w.terminate()
        for w in workers:
            try:
                w.wait(timeout=30)
            except subprocess.TimeoutExpired:
                w.kill()
                w.wait()
    if status == 0:
        status = next((w.returncode for w in workers if w.returncode != 0), 0)
    return status
