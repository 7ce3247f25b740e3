"""TEST HARNESS ONLY: how many bytes of parameter values a process holds at its peak.

With COFITUNE_PARAMETER_PROBE=DIR (set by tests/test_sharded.py), an Axolotl process writes
DIR/rank-<RANK>.json when it exits: `whole`, the bytes of every parameter it saw at full size
(a DeepSpeed ZeRO-3 parameter's `ds_numel`), and `peak`, the most bytes of parameter values it
held at once: each parameter's materialised data (empty while ZeRO-3 has it released) plus, under
ZeRO-3, the rank's own partition of it (`ds_tensor`). Sampled after every module's forward
(global forward hooks run before the module's own, so before ZeRO-3 releases its weights) and on
entering `deepspeed.zero.GatheredParameters`. Backward passes are not sampled. Measures only:
nothing is changed.
"""

import atexit
import functools
import json
import os
import sys
from pathlib import Path

import torch
from torch import Tensor, nn


class _Probe:
    def __init__(self) -> None:
        self.params: dict[int, Tensor] = {}
        self.peak = 0
        self.gather_sampled = False

    def see(self, module: nn.Module) -> None:
        for param in module.parameters(recurse=False):
            self.params.setdefault(id(param), param)
        self.sample()

    def sample(self) -> None:
        held = 0
        for param in self.params.values():
            held += param.data.numel() * param.element_size()
            if hasattr(param, "ds_tensor"):
                held += param.ds_tensor.numel() * param.ds_tensor.element_size()
        self.peak = max(self.peak, held)

    def whole(self) -> int:
        return sum(
            getattr(p, "ds_numel", p.numel()) * p.element_size() for p in self.params.values()
        )


def install(directory: str) -> None:
    probe = _Probe()

    def on_forward(module: nn.Module, args: tuple, output: object) -> None:
        probe.see(module)
        if not probe.gather_sampled:  # DeepSpeed is imported by now if the run uses it
            probe.gather_sampled = True
            partition_parameters = sys.modules.get("deepspeed.runtime.zero.partition_parameters")
            if partition_parameters is not None:
                _sample_on_gather(partition_parameters.GatheredParameters, probe)

    torch.nn.modules.module.register_module_forward_hook(on_forward)

    def write() -> None:
        if probe.params:  # only the process that ran a model
            path = Path(directory) / f"rank-{os.environ.get('RANK', '0')}.json"
            path.write_text(json.dumps({"whole": probe.whole(), "peak": probe.peak}))

    atexit.register(write)


def _sample_on_gather(gathered: type, probe: _Probe) -> None:
    """Sample once `gathered` (deepspeed.zero.GatheredParameters) has gathered its parameters."""
    enter = gathered.__enter__

    @functools.wraps(enter)
    def sampled_enter(self):
        result = enter(self)
        probe.sample()
        return result

    gathered.__enter__ = sampled_enter
