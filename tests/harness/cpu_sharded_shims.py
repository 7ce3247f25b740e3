"""TEST HARNESS ONLY: what Axolotl 0.19 / accelerate 1.13 lack to run FSDP2 and DeepSpeed ZeRO on
CPU processes over gloo (see README, "Multi-process training on CPU").

Each shim replaces a decision those libraries make only because no accelerator is present; on a
machine with one, `install` does nothing. DeepSpeed itself is not patched.

1. accelerate's `PartialState` counts one process when it is not built with `cpu=True` and no
   accelerator exists (Transformers builds it so under DeepSpeed and FSDP): join the ranks with
   gloo as `MULTI_CPU` instead. Under DeepSpeed, accelerate then lets DeepSpeed join them (gloo)
   and reports `DEEPSPEED`, as on GPUs.
2. accelerate's `AcceleratorState` enables FSDP only for accelerator process types: on
   `MULTI_CPU` with an FSDP plugin, enable it the same way (else the run trains as DDP).
3. Axolotl builds its FSDP2 device mesh on "cuda": build it on "cpu".
4. ZeRO-2's flat buffers require grad and gloo's all-gather writes into them in place, which
   autograd refuses in the first step (`Output 0 of Split is a view and is being modified
   inplace`): run accelerate's DeepSpeed preparation under `torch.no_grad()` (NCCL's all-gather
   takes another path on GPUs).
5. A CUDA build of torch on a machine without a GPU (the only torch for Python 3.12 reachable
   here, so the Axolotl 0.21 test venv has one): Axolotl's peer-to-peer check, run on every rank
   of a multi-process launch, asks CUDA and fails for want of a driver, where a CPU build raises
   the AssertionError Axolotl catches: raise that one (`install_peer_check`).
"""

import functools

import torch


def install() -> None:
    if torch.accelerator.is_available():
        return
    from accelerate import accelerator, parallelism_config, state
    from accelerate.utils import DistributedType

    prepare_backend = state.PartialState._prepare_backend

    @functools.wraps(prepare_backend)
    def gloo_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        found, distributed_type = prepare_backend(self, True, sagemaker_dp, backend)
        return found, distributed_type

    state.PartialState._prepare_backend = gloo_backend

    init_state = state.AcceleratorState.__init__

    @functools.wraps(init_state)
    def fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
        init_state(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            self.distributed_type = DistributedType.FSDP
            state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    state.AcceleratorState.__init__ = fsdp_on_cpu

    build_mesh = parallelism_config.ParallelismConfig.build_device_mesh

    @functools.wraps(build_mesh)
    def mesh_on_cpu(self, device_type):
        return build_mesh(self, "cpu")

    parallelism_config.ParallelismConfig.build_device_mesh = mesh_on_cpu

    prepare_deepspeed = accelerator.Accelerator._prepare_deepspeed

    @functools.wraps(prepare_deepspeed)
    def prepare_without_grad(self, *args):
        with torch.no_grad():
            return prepare_deepspeed(self, *args)

    accelerator.Accelerator._prepare_deepspeed = prepare_without_grad


def install_peer_check() -> None:
    """Shim 5 alone: every multi-process launch needs it, DDP included (1-4 are the engines')."""
    if torch.version.cuda is None or torch.accelerator.is_available():
        return

    def no_peer_access(device: int, peer: int) -> bool:
        raise AssertionError("no CUDA device: peer access does not apply")

    torch.cuda.can_device_access_peer = no_peer_access
