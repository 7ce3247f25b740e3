"""The plugin's commands, registered through Axolotl's `axolotl.cli_commands` entry points:

- `axolotl cofitune-importance`: measure, once before training, which heads and neurons the
  model's general ability relies on;
- `axolotl cofitune-search`: the coarse level's tree search over layer windows x module sets;
- `axolotl cofitune-report`: the before/after forgetting report of a trained output directory;
- `axolotl cofitune-dial`: the models between the base and the tuned one, scored or written;
- `axolotl cofitune-plan`: the memory a recipe needs per GPU, by role, before renting GPUs.
"""

import os
import time
from pathlib import Path
from typing import Any

import click
import yaml

from cofitune_plugin.importance import Partitioned
from cofitune_plugin.plugin import LOG, importance_dirs


class RecipeParam(click.ParamType):
    """CONFIG wherever `axolotl train` takes it: a YAML file, a directory holding one, or an
    https URL, made a local file by Axolotl's own loader (`check_remote_config`,
    `choose_config`), so the commands and `axolotl train` read the same recipe."""

    name = "recipe"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from axolotl.cli.config import check_remote_config, choose_config

        try:
            path = Path(check_remote_config(value))
            if path.is_dir():
                path = Path(choose_config(path))
        except (RuntimeError, ValueError) as exc:  # the download or its YAML failed
            self.fail(f"{value}: {exc}", param, ctx)
        if not path.is_file():
            self.fail(f"{value}: no such file, directory with a recipe, or https URL", param, ctx)
        return str(path)


RECIPE = RecipeParam()


@click.command("cofitune-importance")
@click.argument("config", type=RECIPE)
@click.option(
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Directory to write; default: the first of cofitune.soft_mask.importance.",
)
@click.option(
    "--max-batches",
    type=int,
    default=None,
    help="Batches to read (all ranks'); default: cofitune.soft_mask.max_batches.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing importance directory.")
def importance(config: str, output: Path | None, max_batches: int | None, overwrite: bool) -> None:
    """Compute unit importance for CONFIG's model with cofitune.soft_mask.estimator on
    cofitune.soft_mask.datasets (default: the training datasets), its first max_batches
    batches, and write importance.safetensors + manifest.json. Under a multi-process
    launcher each rank takes its share of the same batches, with the whole model or, for a
    DeepSpeed ZeRO-3 recipe, with its partition of it, gathered layer by layer as in training;
    the artifact is the one-process one."""
    from axolotl.cli.config import load_cfg
    from axolotl.common.datasets import load_datasets
    from axolotl.train import setup_model_and_trainer

    from cofitune_plugin.architectures import architecture_for
    from cofitune_plugin.args import LAUNCHER_KEYS, RecipeError, check_recipe
    from cofitune_plugin.importance import batch_share, compute_importance, global_batches
    from cofitune_plugin.importance_store import (
        MANIFEST_FILE,
        data_fingerprint,
        model_manifest,
        save_importance,
    )
    from cofitune_plugin.memory_plan import zero_optimization
    from cofitune_plugin.selection import find_decoder_layers
    from cofitune_plugin.sharded import sampled_values

    # Check the block before anything loads; the recipe's masks do not exist yet, so the model is
    # then loaded without them, on the importance data.
    raw = yaml.safe_load(Path(config).read_text())
    recipe = check_recipe(raw)
    soft_mask = recipe.soft_mask if recipe else None
    if soft_mask is None:
        raise RecipeError(
            f"{config}: `cofitune-importance` needs `cofitune.soft_mask.importance: DIR` (with "
            "`plugins: [cofitune_plugin.CoFiTunePlugin]` and `adapter: cofitune`)"
        )
    try:
        zero3 = zero_optimization(raw).get("stage") == 3
    except FileNotFoundError as exc:
        raise RecipeError(
            f"{config}: `deepspeed: {raw['deepspeed']}` is no file here ({exc.strerror}); run "
            "from the directory it is relative to (the recipes': the repository root)"
        ) from None
    if zero3 and soft_mask.estimator == "das":
        # measured on 2 ranks: ZeRO-3's hooks release no layer in a backward through two
        # forward passes, so each rank would hold its partition plus the whole model
        raise RecipeError(
            f"{config}: `cofitune.soft_mask.estimator: das` cannot run on DeepSpeed ZeRO-3 "
            "partitions (its backward through two forward passes keeps every layer gathered on "
            "every rank). Use `estimator: activation` (the default) or `fisher`, which run "
            "partitioned; or compute the das importance with a copy of this recipe without "
            "`deepspeed`, where the model fits one device whole, then train with this one."
        )
    output = output or importance_dirs(soft_mask.importance)[0]
    if (output / MANIFEST_FILE).exists() and not overwrite:
        raise click.ClickException(
            f"{output} already holds an importance; pass --overwrite or choose --output"
        )
    # Unpacked batches (the KL must not mix packed samples) and checkpointing that lets
    # `autograd.grad` reach the gates (reentrant checkpointing hides them). A DeepSpeed ZeRO-3
    # recipe keeps its `deepspeed` key: the model loads partitioned and an engine without
    # optimizer gathers its layers for the passes, so no rank holds it whole. Under the other
    # launchers every rank holds the weights whole anyway (ZeRO-2, DDP) or could (FSDP2: not
    # built), so the model is loaded whole and the engines' keys are cleared.
    overrides: dict = {
        "cofitune__soft_mask": None,
        "cofitune__from_search": None,  # importance covers every layer, whatever is chosen
        "sample_packing": False,
        "gradient_checkpointing_kwargs__use_reentrant": False,
        **{key: None for key in LAUNCHER_KEYS if not (zero3 and key == "deepspeed")},
    }
    if soft_mask.datasets:
        overrides["datasets"] = soft_mask.datasets
    cfg = load_cfg(config, **overrides)
    dataset_meta = load_datasets(cfg=cfg)
    trainer, model, *_ = setup_model_and_trainer(cfg, dataset_meta)
    partitioned = _zero3_inference(trainer) if zero3 else None

    text_config = model.config.get_text_config()
    architecture = architecture_for(text_config.model_type)
    layer_prefix = find_decoder_layers(model, text_config.num_hidden_layers)
    seed = trainer.args.seed
    batches = global_batches(
        trainer.train_dataset,
        trainer.data_collator,
        cfg.micro_batch_size,
        seed,
        max_batches or soft_mask.max_batches,
    )
    manifest = {
        **model_manifest(model, architecture, layer_prefix, sampled_values),
        "base_model": cfg.base_model,
        "data_fingerprint": data_fingerprint(batches),
        "sequence_len": cfg.sequence_len,
        "dropout": soft_mask.dropout if soft_mask.estimator == "das" else None,
        "batches": len(batches),
        "seed": seed,
    }

    share = batch_share(len(batches))
    LOG.info(
        "cofitune: importance on rank %d of %d: batches %s of %d",
        share.start,
        share.step,
        list(share),
        len(batches),
        main_process_only=False,
    )
    start = time.perf_counter()
    raw = compute_importance(
        model,
        batches,
        architecture,
        layer_prefix,
        estimator=soft_mask.estimator,
        dropout=soft_mask.dropout,
        seed=seed,
        partitioned=partitioned,
    )
    seconds = time.perf_counter() - start
    if trainer.accelerator.is_main_process:
        save_importance(raw, output, manifest, overwrite=overwrite)
        LOG.info(
            "cofitune: %s importance of %s over %s tokens in %.1f s (%.0f tokens/s) written to %s",
            soft_mask.estimator,
            cfg.base_model,
            f"{raw.tokens:,}",
            seconds,
            raw.tokens / seconds,
            output,
        )
    trainer.accelerator.wait_for_everyone()  # no rank exits before the artifact exists


def _zero3_inference(trainer: Any) -> Partitioned:
    """Wrap the trainer's ZeRO-3-partitioned model in a DeepSpeed engine without optimizer, as
    the Hugging Face Trainer does to evaluate: the engine's hooks gather each layer's weights
    for its forward (and backward) and release them after."""
    import deepspeed
    from transformers.integrations.deepspeed import deepspeed_init

    deepspeed_init(trainer, num_training_steps=0, inference=True)
    engine = trainer.model_wrapped = trainer.accelerator.prepare(trainer.model)
    return Partitioned(deepspeed.zero.GatheredParameters, engine.empty_partition_cache)


@click.command("cofitune-search")
@click.argument("config", type=RECIPE)
def search(config: str) -> None:
    """Run CONFIG's `cofitune.search` tree: a short fine-tune per candidate selection, each
    scored on speciality and versatility. Writes trials.jsonl (resumable), chosen.yml (read by
    `cofitune.from_search`), report.md and pareto.png to the search's output_dir."""
    from cofitune_plugin.search_run import search_command

    _refuse_several_processes(
        "cofitune-search", "is one process that keeps the records (it launches its own trials)"
    )
    click.echo(search_command(config))


@click.command("cofitune-report")
@click.argument("config", type=RECIPE)
def report(config: str) -> None:
    """Compare CONFIG's trained model (in its output_dir) with its base model on the
    `cofitune.report` data (default: the search's): writes cofitune-report.json and .md to the
    output_dir, as `axolotl train` does when the recipe has a `cofitune.report` block."""
    from axolotl.cli.config import load_cfg

    from cofitune_plugin.plugin import write_report
    from cofitune_plugin.train_report import headline

    _check_report_recipe(config)
    report, path = write_report(load_cfg(config))
    click.echo("\n".join([*headline(report), f"Report: {path}"]))


@click.command("cofitune-dial")
@click.argument("config", type=RECIPE)
@click.option(
    "--grid",
    default="0,0.25,0.5,0.75,1",
    show_default=True,
    help="Comma-separated values of a to score, each base + a (tuned - base).",
)
@click.option(
    "--alpha",
    type=float,
    default=None,
    help="Write the model at this a (no scoring) as a Hugging Face directory.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where --alpha writes; default: <output_dir>/cofitune-dial/alpha-<A>.",
)
def dial(config: str, grid: str, alpha: float | None, out: Path | None) -> None:
    """Score CONFIG's models between the base (a = 0) and the trained one (a = 1), over the
    selection only: resumable records in <output_dir>/cofitune-dial/dial.jsonl, the curve on the
    search's axes in dial.png and a table in dial.md. With --alpha, write that model instead."""
    from axolotl.cli.config import load_cfg

    from cofitune_plugin.plugin import load_trained
    from cofitune_plugin.train_report import write_dial

    try:
        alphas = [float(a) for a in grid.split(",")]
    except ValueError:
        raise click.BadParameter(
            f"{grid!r}: write numbers separated by commas", param_hint="--grid"
        ) from None
    _check_report_recipe(config)
    cfg = load_cfg(config)
    output_dir = Path(cfg.output_dir)
    if alpha is not None and out is not None and out.resolve() == output_dir.resolve():
        raise click.BadParameter("would overwrite the trained model; choose another", "--out")
    click.echo(write_dial(load_trained(cfg), alphas, alpha, out))


def _refuse_several_processes(command: str, why: str) -> None:
    """Stop a one-process command that a multi-process launcher (torchrun, `accelerate
    launch`) started, before anything loads, instead of running it once per rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise click.ClickException(
            f"{command} {why}; start it with `axolotl {command}`, not under a multi-process "
            "launcher"
        )


def _check_report_recipe(config: str) -> None:
    """Refuse, before any model loads, a recipe the report cannot read."""
    from cofitune_plugin.args import RecipeError, check_recipe, eval_settings

    raw = yaml.safe_load(Path(config).read_text())
    recipe = check_recipe(raw)
    if recipe is None:
        raise RecipeError(f"{config}: no `cofitune:` block; the report compares a CoFiTune model")
    if recipe.report is None:  # check_recipe checks a `report` block; the search may stand in
        eval_settings(recipe)


@click.command("cofitune-plan")
@click.argument("config", type=RECIPE)
@click.option("--gpus", type=int, default=1, show_default=True, help="GPUs the run uses.")
@click.option("--gpu-memory", type=float, default=None, help="GiB per GPU: says if it fits.")
@click.option(
    "--model-config",
    type=click.Path(exists=True),
    default=None,
    help="A config.json (or its directory) standing in for base_model, e.g. offline.",
)
def plan(config: str, gpus: int, gpu_memory: float | None, model_config: str | None) -> None:
    """Estimate CONFIG's memory per GPU by role (weights, gradients, fp32 master, Adam moments,
    update-mask copy, activations) under its launcher on GPUS GPUs. No weights are loaded."""
    from cofitune_plugin.args import RecipeError, check_recipe
    from cofitune_plugin.memory_plan import describe_plan
    from cofitune_plugin.plugin import meta_model_of
    from cofitune_plugin.search import read_chosen
    from cofitune_plugin.selection import select

    raw = yaml.safe_load(Path(config).read_text())
    recipe = check_recipe(raw)
    if recipe is None:
        raise RecipeError(f"{config}: `cofitune-plan` needs a `cofitune:` block")
    if recipe.from_search:
        recipe = recipe.model_copy(
            update={**read_chosen(Path(recipe.from_search)), "from_search": None}
        )
    if model_config:
        raw["base_model_config"] = model_config
    _, meta_model = meta_model_of(raw)
    selection = select(meta_model, recipe.layers, recipe.modules)
    click.echo(describe_plan(raw, meta_model, selection, gpus, gpu_memory))
