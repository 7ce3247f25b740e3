"""A CPU run with one process uses every core; the launcher's one thread is undone only when
it was the launcher's (cofitune_plugin/cpu_threads.py)."""

import os

import pytest

from cofitune_plugin.cpu_threads import THREADS_VARIABLE, launcher_threads, parent_environment
from helpers import recipe, run_axolotl, write_recipe

# what `accelerate launch` exports to its processes
LAUNCHED = {THREADS_VARIABLE: "1", "ACCELERATE_DYNAMO_BACKEND": "NO"}


@pytest.mark.parametrize(
    ("environment", "parent", "cores", "expected"),
    [
        (LAUNCHED, {}, 2, 2),  # one process: every core
        ({**LAUNCHED, "LOCAL_WORLD_SIZE": "2"}, {}, 2, 1),  # 2 processes on 2 cores: 1 each
        ({**LAUNCHED, "LOCAL_WORLD_SIZE": "2"}, {}, 16, 8),  # cores // local processes
        ({**LAUNCHED, "LOCAL_WORLD_SIZE": "4"}, {}, 2, 1),  # never fewer than 1
        (LAUNCHED, LAUNCHED, 2, None),  # the user exported it: theirs
        ({**LAUNCHED, THREADS_VARIABLE: "3"}, {THREADS_VARIABLE: "3"}, 2, None),
        ({THREADS_VARIABLE: "1"}, {}, 2, None),  # no launcher (`env OMP_NUM_THREADS=1 python`)
        ({THREADS_VARIABLE: "1", "TORCHELASTIC_RUN_ID": "x"}, {}, 2, 2),  # torchrun
        ({}, {}, 2, None),  # no launcher: torch already uses every core
        (LAUNCHED, None, 2, None),  # the parent's environment cannot be read: keep it
    ],
)
def test_threads_replace_only_the_launchers_setting(environment, parent, cores, expected):
    assert launcher_threads(environment, parent, cores) == expected


def test_the_parent_environment_is_what_our_parent_started_with():
    parent = parent_environment()
    assert parent is not None and "PATH" in parent


@pytest.mark.axolotl
def test_a_single_process_axolotl_train_uses_every_core(tmp_path, tiny_models):
    cfg = recipe(tmp_path, tiny_models["llama"], max_steps=1)
    result = run_axolotl(
        "train", str(write_recipe(tmp_path, cfg)), cwd=tmp_path, env={"OMP_NUM_THREADS": None}
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"cofitune: no accelerator: {len(os.sched_getaffinity(0))} CPU threads" in (
        result.stdout + result.stderr
    )
