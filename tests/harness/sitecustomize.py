"""TEST HARNESS ONLY: lets `axolotl train` launch FSDP2 and DeepSpeed ZeRO on CPU processes.

Python imports `sitecustomize` at start-up from PYTHONPATH; the sharded-launcher tests put this
directory there for their `axolotl` subprocesses, and nothing else does: the plugin never imports
it, so a GPU user's run is untouched. It acts only in a rank process of a multi-process launch
(WORLD_SIZE > 1) running Axolotl (`python -m axolotl...`; not in their helper processes, such as
the data set's worker pool) on a machine without an accelerator. What it changes, and why, is in
`cpu_sharded_shims.py`. With COFITUNE_PARAMETER_PROBE set, any Axolotl process (one or several)
also records the parameter bytes it held at its peak (`parameter_probe.py`; measures only).
"""

import os
import sys

_module = sys.orig_argv[sys.orig_argv.index("-m") + 1] if "-m" in sys.orig_argv else ""
if int(os.environ.get("WORLD_SIZE", "1")) > 1 and _module.startswith("axolotl."):
    import cpu_sharded_shims

    cpu_sharded_shims.install_peer_check()
    if os.environ.get("COFITUNE_HARNESS_ENGINES") != "0":  # DDP tests run without them
        cpu_sharded_shims.install()

_script = os.path.basename(sys.orig_argv[1]) if len(sys.orig_argv) > 1 else ""
if os.environ.get("COFITUNE_PARAMETER_PROBE") and (
    _module.startswith("axolotl.") or _script == "axolotl"
):
    import parameter_probe

    parameter_probe.install(os.environ["COFITUNE_PARAMETER_PROBE"])
