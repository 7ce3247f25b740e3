"""`axolotl cofitune-importance`: measure, once before training, which heads and neurons the
model's general ability relies on (registered through Axolotl's `axolotl.cli_commands`)."""

import itertools
import time
from pathlib import Path

import click
import yaml

from cofitune_plugin.plugin import LOG, importance_dirs


@click.command("cofitune-importance")
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Directory to write; default: the first of cofitune.soft_mask.importance.",
)
@click.option("--max-batches", type=int, default=None, help="Stop after this many batches.")
@click.option("--overwrite", is_flag=True, help="Replace an existing importance directory.")
def importance(config: str, output: Path | None, max_batches: int | None, overwrite: bool) -> None:
    """Compute unit importance for CONFIG's model on cofitune.soft_mask.datasets (default: the
    training datasets) and write importance.safetensors + manifest.json."""
    from axolotl.cli.config import load_cfg
    from axolotl.common.datasets import load_datasets
    from axolotl.train import setup_model_and_trainer

    from cofitune_plugin.architectures import architecture_for
    from cofitune_plugin.args import RecipeError, check_recipe
    from cofitune_plugin.importance import (
        MANIFEST_FILE,
        compute_importance,
        data_fingerprint,
        model_manifest,
        save_importance,
    )
    from cofitune_plugin.selection import find_decoder_layers

    # Check the block before anything loads; the recipe's masks do not exist yet, so the model is
    # then loaded without them, on the importance data.
    recipe = check_recipe(yaml.safe_load(Path(config).read_text()))
    soft_mask = recipe.soft_mask if recipe else None
    if soft_mask is None:
        raise RecipeError(
            f"{config}: `cofitune-importance` needs `cofitune.soft_mask.importance: DIR` (with "
            "`plugins: [cofitune_plugin.CoFiTunePlugin]` and `adapter: cofitune`)"
        )
    output = output or importance_dirs(soft_mask.importance)[0]
    if (output / MANIFEST_FILE).exists() and not overwrite:
        raise click.ClickException(
            f"{output} already holds an importance; pass --overwrite or choose --output"
        )
    # Unpacked batches (the KL must not mix packed samples) and checkpointing that lets
    # `autograd.grad` reach the gates (reentrant checkpointing hides them).
    overrides: dict = {
        "cofitune__soft_mask": None,
        "sample_packing": False,
        "gradient_checkpointing_kwargs__use_reentrant": False,
    }
    if soft_mask.datasets:
        overrides["datasets"] = soft_mask.datasets
    cfg = load_cfg(config, **overrides)
    dataset_meta = load_datasets(cfg=cfg)
    trainer, model, *_ = setup_model_and_trainer(cfg, dataset_meta)

    text_config = model.config.get_text_config()
    architecture = architecture_for(text_config.model_type)
    layer_prefix = find_decoder_layers(model, text_config.num_hidden_layers)
    batches = [dict(b) for b in itertools.islice(trainer.get_train_dataloader(), max_batches)]
    manifest = {
        **model_manifest(model, architecture, layer_prefix),
        "base_model": cfg.base_model,
        "data_fingerprint": data_fingerprint(batches),
        "sequence_len": cfg.sequence_len,
        "dropout": soft_mask.dropout,
        "batches": len(batches),
    }

    start = time.perf_counter()
    raw = compute_importance(model, batches, architecture, layer_prefix, dropout=soft_mask.dropout)
    seconds = time.perf_counter() - start
    if trainer.accelerator.is_main_process:
        save_importance(raw, output, manifest, overwrite=overwrite)
    LOG.info(
        "cofitune: importance of %s over %s tokens in %.1f s (%.0f tokens/s) written to %s",
        cfg.base_model,
        f"{raw.tokens:,}",
        seconds,
        raw.tokens / seconds,
        output,
    )
