"""The `ray` backend of launched trials (`cofitune.search.backend: ray`): Ray Tune runs each
trial, the launch and scorer `trial_launch.run_trial` runs on local device groups, on a
placement group of `gpus_per_trial` GPUs (on a CPU cluster, `cpu_processes_per_trial` CPUs) of
one node, anywhere in the cluster, as many at once as the cluster holds. Ray schedules; nothing
here does.

The driver still owns trials.jsonl: Ray gives back each trial's exit status, and the driver
reads the scores file the trial wrote into the search directory, so the records are those of
the local backend. Every node must see the search directory, and the directory the search was
started in (the recipe's relative paths), under the same path. A restarted driver collects the
scores files a killed one's trials left (`LaunchedTrials.run`), so no finished trial runs
again; Tune's own experiment state (`ray/` in the search directory) is not resumed.
"""

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cofitune_plugin.args import SearchConfig
from cofitune_plugin.cpu_threads import THREADS_VARIABLE
from cofitune_plugin.eval_schema import RecipeError
from cofitune_plugin.trial_launch import (
    LOG,
    LOG_FILE,
    DeviceGroup,
    TrialJob,
    run_trial,
    threads_per_process,
    visible_gpus,
)

INSTALL = "pip install cofitune-plugin[ray]"
RAY_DIR = "ray"
"""Tune's experiment state, in the search directory."""


def connect(spec: SearchConfig) -> None:
    """Join the cluster `cofitune.search.ray_address` names (see its description); a Ray
    instance of the search's own gets the visible GPUs, or on a CPU the cores of
    `cpu_trials_at_once` trials, as the local backend would use."""
    try:
        import ray
    except ImportError as error:
        raise RecipeError(
            f"cofitune.search.backend: ray, but Ray is not installed ({error}); install it with "
            f"`{INSTALL}` (every node of the cluster needs it), or set `backend: local`"
        ) from error
    common: dict[str, Any] = {"log_to_driver": False}  # each trial has its own log
    address = spec.ray_address
    if address is None:
        try:
            ray.init(address="auto", **common)
            return
        except ConnectionError:
            address = "local"
    if address == "local":
        cores = None if visible_gpus() else spec.cpu_trials_at_once * spec.cpu_processes_per_trial
        ray.init(address="local", num_cpus=cores, include_dashboard=False, **common)
    else:
        ray.init(address=address, **common)


class RayTrials:
    """Trials as Ray Tune trials, one placement group each (see the module docstring)."""

    def __init__(self, spec: SearchConfig, directory: Path) -> None:
        import ray

        connect(spec)
        nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
        most_gpus = int(max(node.get("GPU", 0) for node in nodes))
        self.on_gpu = most_gpus > 0
        if self.on_gpu:
            key, size, most = "gpus_per_trial", spec.gpus_per_trial or most_gpus, most_gpus
            self.bundle = {"CPU": size, "GPU": size}  # a CPU per rank
        else:
            key, size = "cpu_processes_per_trial", spec.cpu_processes_per_trial
            most = int(max(node.get("CPU", 0) for node in nodes))
            self.bundle = {"CPU": size}
        if size > most:
            raise RecipeError(
                f"cofitune.search.{key}: {size}, but no node of the Ray cluster has more than "
                f"{most} {'GPU' if self.on_gpu else 'CPU'}(s), and a trial runs on one node; set "
                f"it to at most {most}"
            )
        self.groups = [DeviceGroup((), size)]
        self.storage = directory.resolve() / RAY_DIR
        self.threads = os.environ.get(THREADS_VARIABLE)  # an export of the user's, kept
        LOG.info(
            "cofitune-search: Ray cluster %s: trials on placement groups of %s",
            ray.get_runtime_context().gcs_address,
            self.bundle,
        )

    def start(self, jobs: list[TrialJob]) -> Iterator[int | None]:
        """Run `jobs` as one Tune experiment (Tune schedules them as placement groups free
        up); each one's `run_trial` result, in their order, once all have ended. A trial Ray
        itself lost (its node gone, its worker killed) gets -1, its error in its log."""
        from ray import tune

        if not jobs:
            return iter(())
        trainable = tune.with_parameters(
            ray_trial, jobs=jobs, threads=self.threads, processes=self.groups[0].processes
        )
        tuner = tune.Tuner(
            tune.with_resources(trainable, tune.PlacementGroupFactory([self.bundle])),
            param_space={"trial": tune.grid_search(list(range(len(jobs))))},
            run_config=tune.RunConfig(
                storage_path=str(self.storage),
                verbose=0,
                failure_config=tune.FailureConfig(max_failures=0),
            ),
        )
        statuses: list[int | None] = [-1] * len(jobs)
        for result in tuner.fit():
            index = result.config["trial"]
            if result.error is not None:
                name = jobs[index].trial_dir.name
                LOG.warning("cofitune-search: Ray lost trial %s: %s", name, result.error)
                jobs[index].trial_dir.mkdir(parents=True, exist_ok=True)  # lost before it began
                with (jobs[index].trial_dir / LOG_FILE).open("a") as log:
                    log.write(f"\n# Ray: {result.error!r}\n")
            elif not result.metrics["scores_found"]:
                statuses[index] = result.metrics["exit_status"]
            else:
                statuses[index] = None
        return iter(statuses)


def ray_trial(config: dict, jobs: list[TrialJob], threads: str | None, processes: int) -> dict:
    """One Tune trial, in the Ray worker that holds its placement group: `run_trial` on the
    GPUs Ray gave it (or `processes` CPU processes sharing the CPUs it holds)."""
    import ray

    gpus = tuple(str(gpu) for gpu in ray.get_gpu_ids())
    cores = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))
    group = DeviceGroup(gpus, len(gpus) or processes)
    status = run_trial(
        jobs[config["trial"]], group, threads_per_process(threads, cores, group.processes)
    )
    return {"exit_status": 0 if status is None else status, "scores_found": status is None}
