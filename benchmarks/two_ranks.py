"""Two CPU ranks over gloo, for the benchmarks that drive the engines directly rather than
through a launcher (the scripts in this folder share it)."""

import json
import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def on_two_ranks(work: Callable[..., Any], *args: Any) -> list[Any]:
    """`work(rank, *args)` on 2 spawned processes joined over gloo, one thread each (the two
    share the cores); each rank's JSON-able result, in rank order. `work` must be a module-level
    function (it is pickled by name)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ranks.json"
        mp.spawn(_rank, args=(work, args, port, out), nprocs=2)
        return json.loads(out.read_text())


def _rank(rank: int, work: Callable[..., Any], args: tuple, port: int, out: Path) -> None:
    # The launcher's variables: DeepSpeed reads them, not only torch.distributed.
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        result = work(rank, *args)
        results: list[Any] = [None, None]
        dist.all_gather_object(results, result)
        if rank == 0:
            out.write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()
