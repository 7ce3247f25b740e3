"""Search trials as their own launches (`cofitune.search.trials: launch`): device groups, the
in-process/launch choice, and, through the real `axolotl cofitune-search`, trials launched as
2-process ZeRO-3 and FSDP2 jobs on CPU, two trials at once (on local device groups and as Ray
Tune trials), a killed rank and a killed driver.

Every search here trains the same two candidates (`ffn` in layers 0-3 and in 4-7) with plain
SGD on equal-length texts, so one process of micro batch 2 and two of micro batch 1 take the
same steps (tests/test_launchers.py) and every way of running the trials must record the same
scores: the in-process search is the reference.
"""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
import yaml
from test_sharded import engine_settings

from cofitune_plugin.args import SearchConfig
from cofitune_plugin.search import Candidate
from cofitune_plugin.trial_launch import (
    LOG_FILE,
    SCORES_FILE,
    TRIALS_DIR,
    DeviceGroup,
    device_groups,
    trial_config,
    trial_mode,
    trial_name,
)
from helpers import (
    OFFLINE_ENV,
    harness_env,
    recipe,
    search_block,
    write_equal_length_dataset,
    write_recipe,
)

WINDOWS = ["0-3", "4-7"]
MEASURES = ("speciality", "retention_nll", "agreement", "tasks", "failed")


def spec(**keys) -> SearchConfig:
    return SearchConfig.model_validate(
        {"speciality": {"data": "d"}, "versatility": {"prompts": "p"}, **keys}
    )


def test_visible_gpus_split_into_groups_and_a_cpu_into_process_groups():
    gpus = [str(i) for i in range(8)]
    assert device_groups(spec(), gpus) == [DeviceGroup(tuple(gpus), 8)]
    assert device_groups(spec(gpus_per_trial=2), gpus)[3] == DeviceGroup(("6", "7"), 2)
    assert len(device_groups(spec(gpus_per_trial=3), gpus)) == 2  # 2 GPUs left idle
    assert len(device_groups(spec(gpus_per_trial=1), gpus)) == 8
    cpu = spec(cpu_processes_per_trial=2, cpu_trials_at_once=3)
    assert device_groups(cpu, []) == [DeviceGroup((), 2)] * 3
    with pytest.raises(ValueError, match=r"gpus_per_trial: 9, but 8 GPU\(s\) are visible"):
        device_groups(spec(gpus_per_trial=9), gpus)


def test_trials_run_in_process_only_on_one_process_one_at_a_time_without_an_engine():
    one, two = [DeviceGroup((), 1)], [DeviceGroup((), 1)] * 2
    assert trial_mode({}, spec(), one) == (
        False,
        "auto: one process per trial, one trial at a time: model and data load once",
    )
    assert trial_mode({}, spec(), two)[0]
    assert trial_mode({"deepspeed": "zero3.json"}, spec(), one) == (
        True,
        "auto: the recipe's `deepspeed` launcher needs a launch per trial",
    )
    assert trial_mode({}, spec(trials="launch"), one)[0]
    with pytest.raises(ValueError, match=r"trials: in_process .* \['fsdp_version'\]"):
        trial_mode({"fsdp_version": 2}, spec(trials="in_process"), one)


def test_the_ray_backend_launches_every_trial_and_says_how_to_install_ray(monkeypatch):
    from cofitune_plugin.ray_trials import connect

    assert trial_mode({}, spec(backend="ray"), [DeviceGroup((), 1)]) == (
        True,
        "cofitune.search.backend: ray: each trial a launch on a Ray placement group",
    )
    with pytest.raises(ValueError, match=r"`backend: ray` .* set `trials: launch`"):
        spec(backend="ray", trials="in_process")
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    with pytest.raises(
        ValueError, match=r"backend: ray, but Ray is not installed .* cofitune-plugin\[ray\]"
    ):
        connect(spec(backend="ray"))


@pytest.mark.parametrize(
    ("keys", "node", "refusal"),
    [
        ({"gpus_per_trial": 9}, {"CPU": 64, "GPU": 8}, r"gpus_per_trial: 9, .* more than 8 GPU"),
        ({"cpu_processes_per_trial": 4}, {"CPU": 2}, r"cpu_processes_per_trial: 4, .* 2 CPU"),
    ],
)
def test_a_ray_trial_must_fit_one_node_of_the_cluster(monkeypatch, tmp_path, keys, node, refusal):
    """A placement group is one node's: a trial larger than every node would wait forever."""
    ray = pytest.importorskip("ray", reason="the `ray` extra (scripts/test.sh installs it)")
    from cofitune_plugin import ray_trials

    monkeypatch.setattr(ray_trials, "connect", lambda spec: None)
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": node}])
    with pytest.raises(ValueError, match=refusal):
        ray_trials.RayTrials(spec(backend="ray", **keys), tmp_path)


def test_a_trial_config_is_the_recipe_with_the_candidates_selection_and_no_soft_mask(tmp_path):
    raw = {
        "learning_rate": 1e-4,
        "output_dir": "./out",
        "cofitune": {
            "from_search": "s",
            "soft_mask": {"importance": "i"},
            "search": {"trial": {"max_steps": 5}, "speciality": {"data": "d"}},
        },
    }
    candidate = Candidate("25%-50%", "ffn", (2, 3), 10)
    search = spec(trial={"max_steps": 5}, output_dir=str(tmp_path / "s"))
    cfg = trial_config(raw, search, candidate, tmp_path / "t")
    assert cfg["max_steps"] == 5 and cfg["learning_rate"] == 1e-4
    assert cfg["output_dir"] == str(tmp_path / "t" / "out") and cfg["save_strategy"] == "no"
    assert cfg["cofitune"]["layers"] == "25%-50%" and cfg["cofitune"]["modules"] == "ffn"
    assert "soft_mask" not in cfg["cofitune"] and "from_search" not in cfg["cofitune"]
    assert cfg["cofitune"]["search"]["output_dir"] == str(tmp_path / "s")
    assert trial_name(candidate) == "layers_2-3_modules_ffn"


def search_recipe(run_dir: Path, model_dir: Path, engine: str | None = None, **search) -> Path:
    """The two-candidate search over `model_dir` (see the module docstring) with `search` keys,
    on 2 processes of micro batch 1 under `engine`, else one of micro batch 2."""
    run_dir.mkdir()
    search.setdefault("levels", [{"windows": WINDOWS, "modules": ["ffn"]}])
    micro_batch = 2 if engine is None else 1
    if engine:
        search.setdefault("cpu_processes_per_trial", 2)
    search["trial"] = {"max_steps": 2, "micro_batch_size": micro_batch}
    cfg = recipe(
        run_dir,
        model_dir,
        **(engine_settings(run_dir, engine) if engine else {}),
        cofitune=search_block(run_dir, **search),
        optimizer="sgd",
        learning_rate=1.0,
        weight_decay=0.0,
        max_grad_norm=0.0,
        max_memory={"cpu": "64GiB"},
    )
    write_equal_length_dataset(Path(cfg["datasets"][0]["path"]), model_dir)
    return write_recipe(run_dir, cfg)


def start_search(config: Path, engine: str | None = None) -> subprocess.Popen:
    """`axolotl cofitune-search CONFIG` in its own process group (so a test can kill the driver
    and its trials together, as a crash of the machine would), one thread per process as
    `helpers.run_axolotl` runs Axolotl (a user's choice, which trials keep)."""
    bin_dir = Path(sys.executable).parent
    path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    env = {**os.environ, **OFFLINE_ENV, "PATH": path, "OMP_NUM_THREADS": "1"}
    if engine:  # FSDP2 and DeepSpeed on CPU processes need the test harness's shims
        env.update(harness_env())
    with (config.parent / "driver.log").open("w") as log:  # a file: no pipe to fill up
        return subprocess.Popen(
            [str(bin_dir / "axolotl"), "cofitune-search", str(config)],
            cwd=config.parent,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def finish(driver: subprocess.Popen, config: Path) -> str:
    """Wait for the search started on `config`; its output."""
    driver.wait(timeout=1500)
    output = (config.parent / "driver.log").read_text()
    assert driver.returncode == 0, output[-6000:]
    return output


def records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "search" / "trials.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def chosen(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / "search" / "chosen.yml").read_text())


def same_records(found: list[dict], expected: list[dict], rtol: float = 0.0) -> None:
    """The same trials in the same order with the same measures (within `rtol`); only the
    seconds may differ."""
    assert [r["key"] for r in found] == [r["key"] for r in expected]
    for got, want in zip(found, expected):
        for measure in MEASURES:
            expected = want[measure]  # None where a trial has no such measure (`failed`)
            close = expected if expected is None else pytest.approx(expected, rel=rtol)
            assert got[measure] == close, (got["key"], measure)


@pytest.fixture(scope="module")
def in_process(tmp_path_factory, tiny_models) -> Path:
    """The reference: the search with its trials in one process, a third candidate (`ffn` in
    every layer) estimated over a memory limit set between it and the other two."""
    from cofitune_plugin.memory_plan import GIB, model_shape, plan_memory, recipe_setup
    from cofitune_plugin.plugin import meta_model_of
    from cofitune_plugin.selection import select

    run_dir = tmp_path_factory.mktemp("search") / "in-process"
    levels = [{"windows": [*WINDOWS, "0-7"], "modules": ["ffn"]}]
    config = search_recipe(run_dir, tiny_models["llama"], levels=levels)
    raw = yaml.safe_load(config.read_text())
    _, model = meta_model_of(raw)
    setup = replace(recipe_setup(raw, 1), on_gpu=False)  # as the search estimates on a CPU
    peaks = {
        window: plan_memory(model_shape(model, select(model, window, "ffn")), setup).total
        for window in levels[0]["windows"]
    }
    limit = (peaks["0-7"] + max(peaks[w] for w in WINDOWS)) / 2 / GIB
    raw["cofitune"]["search"]["device_memory_gib"] = limit
    config.write_text(yaml.safe_dump(raw))
    output = finish(start_search(config), config)
    assert "Skipped before starting: layers=0-7|modules=ffn: estimated" in output, output[-3000:]
    assert not (run_dir / "search" / TRIALS_DIR).exists()  # nothing launched, nothing skipped ran
    return run_dir


@pytest.mark.axolotl
@pytest.mark.parametrize("engine", ["zero3", "fsdp2"])
def test_trials_launched_on_two_processes_record_the_in_process_scores(
    engine, tmp_path, tiny_models, in_process
):
    """Each trial a 2-process gloo launch under ZeRO-3 or FSDP2: the same trials in the same
    order, scores within float rounding of the in-process ones, the same chosen selection."""
    config = search_recipe(tmp_path / engine, tiny_models["llama"], engine, trials="auto")
    output = finish(start_search(config, engine), config)
    launcher = "deepspeed" if engine == "zero3" else "fsdp_config"
    assert f"auto: the recipe's `{launcher}` launcher needs a launch per trial" in output
    for window in WINDOWS:
        log = tmp_path / engine / "search" / TRIALS_DIR / f"layers_{window}_modules_ffn" / LOG_FILE
        assert "--num_processes 2 --multi_gpu" in log.read_text()
    same_records(records(tmp_path / engine), records(in_process), rtol=1e-5)
    assert chosen(tmp_path / engine) == chosen(in_process)


@pytest.mark.axolotl
def test_two_trials_at_once_record_what_one_at_a_time_records(tmp_path, tiny_models, in_process):
    """Two groups of one process, both trials at once: the records, in candidate order, and
    the choice are the serial search's."""
    config = search_recipe(tmp_path / "at-once", tiny_models["llama"], cpu_trials_at_once=2)
    output = finish(start_search(config), config)
    assert "auto: 2 group(s) of 1 process(es), one trial each" in output
    same_records(records(tmp_path / "at-once"), records(in_process))
    assert chosen(tmp_path / "at-once") == chosen(in_process)


@pytest.mark.axolotl
def test_trials_on_a_ray_instance_record_what_the_local_backend_records(
    tmp_path, tiny_models, in_process
):
    """`backend: ray` on a Ray instance of the search's own (`ray_address: local`, 2 CPUs), each
    trial a Ray Tune trial on a placement group of one CPU, both at once: the records, in
    candidate order, and the choice are the in-process search's. With trials.jsonl deleted (a
    driver killed after the scores files were written), the search started again collects
    every record from the scores files and launches nothing."""
    pytest.importorskip("ray", reason="the `ray` extra (scripts/test.sh installs it)")
    run_dir = tmp_path / "ray"
    config = search_recipe(
        run_dir, tiny_models["llama"], backend="ray", ray_address="local", cpu_trials_at_once=2
    )
    output = finish(start_search(config), config)
    assert "cofitune.search.backend: ray: each trial a launch on a Ray placement group" in output
    same_records(records(run_dir), records(in_process))
    assert chosen(run_dir) == chosen(in_process)
    logs = [run_dir / "search" / TRIALS_DIR / f"layers_{w}_modules_ffn" / LOG_FILE for w in WINDOWS]
    for log in logs:
        assert "CPU, 1 process(es)" in log.read_text()

    (run_dir / "search" / "trials.jsonl").unlink()
    output = finish(start_search(config), config)
    assert "2 trials (0 run now" in output, output[-3000:]
    same_records(records(run_dir), records(in_process))
    for log in logs:
        assert log.read_text().count("-m accelerate.commands.launch") == 1


def wait_for(condition, what: str, driver: subprocess.Popen, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert driver.poll() is None, f"the search ended before {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.2)


@pytest.mark.axolotl
def test_a_killed_rank_is_recorded_as_failed_and_a_killed_driver_reruns_nothing_finished(
    tmp_path, tiny_models, in_process
):
    """Three trials launched one at a time: the first one's training process is killed (as the
    kernel kills one out of memory), so it is recorded as failed with its log's tail and the
    search goes on; once the second one's scores are written the driver and everything it
    started are killed. Started again, the search runs only the third: the first stays failed,
    the second is collected from its scores file, each launched once."""
    run_dir = tmp_path / "killed"
    levels = [{"windows": ["0-7", *WINDOWS], "modules": ["ffn"]}]
    config = search_recipe(run_dir, tiny_models["llama"], trials="launch", levels=levels)
    trials = run_dir / "search" / TRIALS_DIR
    first, second = trials / "layers_0-7_modules_ffn", trials / "layers_0-3_modules_ffn"
    driver = start_search(config)

    def first_rank() -> list[psutil.Process]:
        return [
            p
            for p in psutil.process_iter(["cmdline"])
            if "axolotl.cli.train" in (p.info["cmdline"] or [])
            and str(first / "config.yml") in (p.info["cmdline"] or [])
        ]

    wait_for(first_rank, "the first trial's training process", driver)
    for process in first_rank():
        process.send_signal(signal.SIGKILL)
    wait_for((second / SCORES_FILE).exists, "the second trial's scores", driver)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()

    output = finish(start_search(config), config)
    found = records(run_dir)
    assert [r["key"] for r in found] == [f"layers={w}|modules=ffn" for w in ["0-7", *WINDOWS]]
    failed = found[0]["failed"]
    assert failed.startswith("exit status") and str(first / LOG_FILE) in failed, failed
    assert "Failed (kept in trials.jsonl, not scored; delete its line to retry): " in output
    launches = "-m accelerate.commands.launch"
    assert (first / LOG_FILE).read_text().count(launches) == 1
    assert (second / LOG_FILE).read_text().count(launches) == 1
    same_records(found[1:], records(in_process))
    assert chosen(run_dir) == chosen(in_process)
