"""The `cofitune:` block of an Axolotl recipe, and the recipe-level rules around it."""

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

ADAPTER = "cofitune"


class RecipeError(ValueError):
    """A recipe CoFiTune cannot run; the message names the key and the fix."""


class SoftMaskConfig(BaseModel):
    """Fine level: scale the trained rows by (1 - importance) of the units they feed."""

    model_config = ConfigDict(extra="forbid")

    importance: str | list[str] = Field(
        description="Directory (or directories, combined by elementwise max) written by "
        "`axolotl cofitune-importance`."
    )
    apply_to: Literal["update", "gradient"] = Field(
        default="update",
        description="`update` scales the parameter change after the optimizer step, so Adam "
        "cannot cancel the mask; `gradient` scales gradients as the paper does.",
    )
    datasets: list[dict[str, Any]] | None = Field(
        default=None,
        description="General-ability data for `cofitune-importance`, in Axolotl's `datasets` "
        "format; the training datasets when unset.",
    )
    dropout: float = Field(
        default=0.003,
        gt=0,
        lt=1,
        description="Noise injected on head and MLP outputs so the two importance passes differ.",
    )


class CoFiTuneConfig(BaseModel):
    """Coarse level: which layers and modules train. The defaults are the paper's winner."""

    model_config = ConfigDict(extra="forbid")

    layers: str | int | list[int] = Field(
        default="25%-50%",
        description="A depth window ('25%-50%'), an inclusive index range ('10-19') or a list "
        "of layer indices.",
    )
    modules: str | list[str] = Field(
        default=["ffn"],
        description="ffn (up+down projections), mha (q, k, v projections), or raw sub-module "
        "names such as gate_proj or o_proj; 'ffn+mha' means both sets.",
    )
    soft_mask: SoftMaskConfig | None = None


class CoFiTuneArgs(BaseModel):
    """Merged into Axolotl's config schema by the plugin, so the block survives validation."""

    cofitune: CoFiTuneConfig | None = None


def check_recipe(cfg: Mapping[str, Any]) -> CoFiTuneConfig | None:
    """Validate a raw recipe before anything is loaded; None when CoFiTune is not asked for.

    The block must come with `adapter: cofitune`: Axolotl refuses an adapter that no loaded plugin
    registered, so a recipe whose plugin failed to import stops instead of silently training
    every parameter.
    """
    block = cfg.get("cofitune")
    adapter = cfg.get("adapter")
    if block is None:
        if adapter == ADAPTER:
            raise RecipeError(
                "adapter: cofitune needs a `cofitune:` block, e.g. `cofitune: {layers: "
                "'25%-50%', modules: [ffn]}`"
            )
        return None
    try:
        config = CoFiTuneConfig.model_validate(block)
    except ValidationError as exc:
        problems = "; ".join(
            f"cofitune.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()
        )
        raise RecipeError(problems) from None

    if adapter != ADAPTER:
        raise RecipeError(
            f"a `cofitune:` block needs `adapter: {ADAPTER}` (found adapter: {adapter!r}). "
            "It is what makes Axolotl stop, rather than train every parameter, if the plugin "
            "fails to load. LoRA/QLoRA on the CoFiTune selection is not supported yet."
        )
    if cfg.get("unfrozen_parameters"):
        raise RecipeError(
            "`unfrozen_parameters` and `cofitune:` both choose what trains; remove "
            "`unfrozen_parameters` and express the selection in `cofitune.layers`/`modules`"
        )
    unsupported = {
        "rl": "preference training (rl) with cofitune is not supported yet; remove `rl`",
        "load_in_8bit": "quantized weights cannot be trained in place; remove `load_in_8bit`",
        "load_in_4bit": "quantized weights cannot be trained in place; remove `load_in_4bit`",
        "relora": "ReLoRA needs a LoRA adapter; remove `relora`",
    }
    for key, message in unsupported.items():
        if cfg.get(key):
            raise RecipeError(f"cofitune: {message}")
    fsdp_config = cfg.get("fsdp_config") or {}
    if (cfg.get("fsdp") or fsdp_config) and str(
        cfg.get("fsdp_version") or fsdp_config.get("fsdp_version", "1")
    ) != "2":
        raise RecipeError(
            "cofitune: FSDP1 flattens frozen and trained weights together; set `fsdp_version: 2`"
        )
    if config.soft_mask and (cfg.get("deepspeed") or cfg.get("fsdp") or fsdp_config):
        raise RecipeError(
            "cofitune.soft_mask: not supported under DeepSpeed or FSDP yet; train with DDP or a "
            "single process, or remove `soft_mask` to train the selection without masks"
        )
    return config
