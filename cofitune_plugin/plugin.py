"""The only module that knows Axolotl: it turns a `cofitune:` block into Axolotl's own freezing.

Hooks used, in Axolotl's order:
- `register`: check the recipe and resolve the selection on a meta-device copy of the model (no
  weights are read), then hand it to Axolotl: as `unfrozen_parameters` (`adapter: cofitune`), so
  Axolotl's own freezing and its validators (non-reentrant checkpointing for partially frozen
  models) apply; or, for `cofitune-lora`/`cofitune-qlora`, as Axolotl's built-in `lora`/`qlora`
  adapter with an exact `lora_target_modules` regex, so Axolotl's own LoRA and 4-bit loading
  (it quantizes only for `adapter: qlora`) and their validators apply.
- `get_adapter_capabilities` / `load_adapter`: register the `cofitune` adapter. Axolotl refuses an
  adapter no plugin registered, which is what stops a recipe whose plugin failed to import; the
  LoRA names are not registered at all, since `register` replaces them before validation, so
  nothing but this plugin can make them valid.
- `post_trainer_create`: after Axolotl froze the model (or added the adapters), check that
  exactly the selection (or its adapters) trains, print the trainable-parameter report, and attach
  the soft masks (`cofitune.soft_mask`), to the base rows or to each adapter's `lora_B` rows.
"""

import os
from pathlib import Path

import torch
from axolotl.integrations.base import AdapterCapabilities, BasePlugin
from axolotl.utils.dict import DictDefault
from axolotl.utils.freeze import LayerNamePattern
from axolotl.utils.logging import get_logger
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PretrainedConfig,
    Trainer,
    TrainerCallback,
)

from cofitune_plugin.architectures import architecture_for
from cofitune_plugin.args import (
    ADAPTER,
    LORA_ADAPTERS,
    CoFiTuneConfig,
    RecipeError,
    check_recipe,
)
from cofitune_plugin.cpu_ddp import enable_cpu_ddp
from cofitune_plugin.cpu_threads import use_every_core
from cofitune_plugin.importance import MANIFEST_FILE, load_importance, model_manifest
from cofitune_plugin.lora import lora_b_masks, lora_parameters, target_modules_regex
from cofitune_plugin.search import read_chosen
from cofitune_plugin.selection import Selection, select_parameters
from cofitune_plugin.softmask import SoftMask, row_masks

# Axolotl shows INFO only from loggers under "axolotl", where its own integrations live.
LOG = get_logger("axolotl.integrations.cofitune")


class CoFiTunePlugin(BasePlugin):
    """Axolotl plugin adding the `cofitune` fine-tuning mode."""

    def get_input_args(self) -> str:
        return "cofitune_plugin.args.CoFiTuneArgs"

    def get_adapter_capabilities(self) -> list[AdapterCapabilities]:
        return [AdapterCapabilities(name=ADAPTER, lora_like=False, relora=False)]

    def register(self, cfg: dict) -> None:
        if threads := use_every_core():
            LOG.info(
                "cofitune: no accelerator: %d CPU threads per process, in place of the "
                "launcher's OMP_NUM_THREADS=%s (export it to choose)",
                threads,
                os.environ["OMP_NUM_THREADS"],
            )
        config = check_recipe(cfg)
        if config is None:
            return
        if enable_cpu_ddp(cfg):
            LOG.info("cofitune: no accelerator: the processes train as one DDP job over gloo")
        if config.soft_mask:
            _check_importance_exists(config.soft_mask.importance)
        if config.from_search:
            # The search's choice becomes the block's own layers/modules, so every later hook
            # (and a second `register`) sees one plain selection.
            chosen = read_chosen(Path(config.from_search))
            LOG.info("cofitune: using the selection chosen in %s: %s", config.from_search, chosen)
            config = config.model_copy(update={**chosen, "from_search": None})
            cfg["cofitune"] = {**cfg["cofitune"], **chosen, "from_search": None}
        model_config, meta_model = meta_model_of(cfg)
        selection = select(model_config, meta_model, config)
        if cfg["adapter"] in LORA_ADAPTERS:
            targets = target_modules_regex(selection, meta_model)
            cfg["adapter"] = LORA_ADAPTERS[cfg["adapter"]]
            cfg["lora_target_modules"] = targets
            LOG.info(
                "cofitune: %s adapters on %d layers; lora_target_modules=%s",
                cfg["adapter"],
                len(selection.layers),
                targets,
            )
            return
        patterns = selection.unfrozen_parameters()
        _check_patterns_match(patterns, meta_model, selection)
        cfg["unfrozen_parameters"] = patterns
        LOG.info(
            "cofitune: training %s parameters in %d layers; unfrozen_parameters=%s",
            f"{selection.numel:,}",
            len(selection.layers),
            patterns,
        )

    def load_adapter(
        self, model: nn.Module, cfg: DictDefault, inference: bool = False, config_only: bool = False
    ) -> tuple[nn.Module, None] | None:
        # Freezing itself is Axolotl's (from `unfrozen_parameters`); there is no adapter to add.
        return (model, None) if cfg.adapter == ADAPTER else None

    def post_trainer_create(self, cfg: DictDefault, trainer: Trainer) -> None:
        if cfg.cofitune is None:
            return
        config = CoFiTuneConfig.model_validate(cfg.cofitune)
        lora = cfg.adapter != ADAPTER  # lora/qlora, handed over by `register`
        if lora:
            # PEFT's inner model keeps the selection's names; the meta copy keeps the
            # unquantized shapes, which 4-bit weights no longer have.
            model = trainer.model.get_base_model()
            _, reference = meta_model_of(cfg)
        else:
            model = reference = trainer.model
        selection = select(reference.config, reference, config)
        trained = lora_parameters(model, selection) if lora else list(selection.parameters)
        _check_trains_exactly(model, trained)
        total = sum(getattr(p, "ds_numel", p.numel()) for p in reference.parameters())
        LOG.info("\n%s", selection.report(total))
        if lora:
            LOG.info(
                "cofitune: training only the LoRA adapters of these modules: %s parameters",
                f"{sum(model.get_parameter(name).numel() for name in trained):,}",
            )
        if config.soft_mask:
            trainer.add_callback(
                _SoftMaskDuringTraining(_build_soft_mask(model, selection, config, lora))
            )


class _SoftMaskDuringTraining(TrainerCallback):
    """Keeps the soft mask exactly as long as `trainer.train()`: hands it the optimizer once the
    Trainer has built it (update mode) and removes its hooks at the end, so a later evaluation or
    a second trainer on the same model (the search, the benchmarks) is never masked."""

    def __init__(self, soft_mask: SoftMask) -> None:
        self.soft_mask = soft_mask

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs) -> None:
        if self.soft_mask.apply_to == "update":
            # Accelerate wraps the optimizer; step hooks must sit on the torch optimizer it steps.
            self.soft_mask.attach_optimizer(getattr(optimizer, "optimizer", optimizer))

    def on_train_end(self, args, state, control, **kwargs) -> None:
        self.soft_mask.remove()


def importance_dirs(importance: str | list[str]) -> list[Path]:
    return [Path(d) for d in ([importance] if isinstance(importance, str) else importance)]


def _check_importance_exists(importance: str | list[str]) -> None:
    missing = [str(d) for d in importance_dirs(importance) if not (d / MANIFEST_FILE).is_file()]
    if missing:
        raise RecipeError(
            f"cofitune.soft_mask.importance: no importance in {missing}; compute it first with "
            "`axolotl cofitune-importance <recipe.yml>`, or remove `soft_mask`"
        )


def _check_trains_exactly(model: nn.Module, expected: list[str]) -> None:
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    if trainable != set(expected):
        extra = sorted(trainable - set(expected))[:5]
        absent = sorted(set(expected) - trainable)[:5]
        raise RuntimeError(
            "cofitune: the model's trainable parameters differ from the CoFiTune selection "
            f"(trainable but not selected: {extra}; selected but frozen: {absent}); "
            "refusing to train. Did another plugin or setting change `requires_grad`?"
        )


def _build_soft_mask(
    model: nn.Module, selection: Selection, config: CoFiTuneConfig, lora: bool
) -> SoftMask:
    """Row masks of the selected weights, on the weights themselves or, with `lora`, on each
    adapter's `lora_B`."""
    text_config = model.config.get_text_config()
    architecture = architecture_for(text_config.model_type)
    importance = load_importance(
        importance_dirs(config.soft_mask.importance),
        expected=model_manifest(model, architecture, selection.layer_prefix),
    )
    n_heads = text_config.num_attention_heads
    masks = row_masks(
        model,
        selection,
        architecture,
        importance,
        n_heads=n_heads,
        n_kv_heads=getattr(text_config, "num_key_value_heads", None) or n_heads,
    )
    if lora:
        masks = lora_b_masks(model, masks)
    LOG.info(
        "cofitune: soft masks on %d parameters (apply_to=%s), from %s",
        len(masks),
        config.soft_mask.apply_to,
        config.soft_mask.importance,
    )
    return SoftMask(model, masks, apply_to=config.soft_mask.apply_to)


def meta_model_of(cfg: dict) -> tuple[PretrainedConfig, nn.Module]:
    """The recipe's model built on the meta device: its parameter names and shapes, no weights."""
    trust_remote_code = bool(cfg.get("trust_remote_code"))
    model_config = AutoConfig.from_pretrained(
        cfg.get("base_model_config") or cfg["base_model"], trust_remote_code=trust_remote_code
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)
    return model_config, model


def select(model_config: PretrainedConfig, model: nn.Module, config: CoFiTuneConfig) -> Selection:
    text_config = model_config.get_text_config()
    return select_parameters(
        model,
        model_type=text_config.model_type,
        num_layers=text_config.num_hidden_layers,
        layers=config.layers,
        modules=config.modules,
    )


def _check_patterns_match(patterns: list[str], model: nn.Module, selection: Selection) -> None:
    """Guard the hand-over: Axolotl's matcher must pick exactly the selected parameters."""
    compiled = [LayerNamePattern(p) for p in patterns]
    matched = {n for n, _ in model.named_parameters() if any(p.match(n) for p in compiled)}
    if matched != set(selection.parameters):
        raise RuntimeError(f"cofitune: internal error: {patterns} match {sorted(matched)[:5]}...")
