"""Every core for a CPU run: undo the one thread per process a launcher chose for us.

`axolotl train` runs the trainer under `accelerate launch`, which exports
`OMP_NUM_THREADS=<--num_cpu_threads_per_process>` to the processes it starts; accelerate 1.13
defaults that to 1 unless the launch has `--cpu` (and then to physical cores / local processes).
torchrun (`--launcher torchrun`) sets 1 for more than one process per node. Their reason is GPU
training, where a process's CPU threads only feed its GPU and many processes share the cores.
Without an accelerator that leaves one core doing all the work: on a 2-core machine a plain
`axolotl train` ran at about 94% CPU. So the plugin's first hook (`register`, before any model
loads) gives a CPU-only process cores // local processes threads (all cores for one process,
1 each for 2 processes on 2 cores: what the launcher would do for `--cpu`).

An `OMP_NUM_THREADS` the user exported is theirs and is kept: the launcher's parent process
(`accelerate launch`, torchrun) still holds the user's environment, so a value absent there was
the launcher's. GPU runs are left alone.
"""

import os
from collections.abc import Mapping
from pathlib import Path

import torch

THREADS_VARIABLE = "OMP_NUM_THREADS"
# Set in the processes `accelerate launch` (either launcher) and torchrun start.
LAUNCHER_VARIABLES = ("ACCELERATE_DYNAMO_BACKEND", "TORCHELASTIC_RUN_ID")


def parent_environment() -> dict[str, str] | None:
    """The environment our parent process started with (Linux `/proc`), or None if unreadable."""
    try:
        raw = Path(f"/proc/{os.getppid()}/environ").read_bytes()
    except OSError:
        return None
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {key.decode(errors="replace"): value.decode(errors="replace") for key, value in pairs}


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask where the platform has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def launcher_threads(
    environment: Mapping[str, str], parent: Mapping[str, str] | None, cores: int
) -> int | None:
    """The threads this process should use instead of the launcher's `OMP_NUM_THREADS`, or None
    to keep the current setting: when the variable is unset (torch already uses every core),
    when no launcher started us, when the user set it (it is in the parent's environment too),
    or when the parent cannot be read."""
    launched = any(variable in environment for variable in LAUNCHER_VARIABLES)
    if THREADS_VARIABLE not in environment or not launched:
        return None
    if parent is None or THREADS_VARIABLE in parent:
        return None
    local_processes = int(environment.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, cores // max(1, local_processes))


def use_every_core() -> int | None:
    """On a machine without an accelerator, give torch every core this process's share of the
    machine has (see the module docstring). Returns the thread count set, or None if unchanged."""
    if torch.accelerator.is_available():
        return None
    threads = launcher_threads(os.environ, parent_environment(), usable_cores())
    if threads is None or threads == torch.get_num_threads():
        return None
    torch.set_num_threads(threads)
    return threads
