"""The only module that knows Axolotl: it turns a `cofitune:` block into Axolotl's own freezing.

Hooks used, in Axolotl's order:
- `register`: check the recipe and resolve the selection on a meta-device copy of the model (no
  weights are read), then hand it to Axolotl: as `unfrozen_parameters` (`adapter: cofitune`), so
  Axolotl's own freezing and its validators (non-reentrant checkpointing for partially frozen
  models) apply; or, for `cofitune-lora`/`cofitune-qlora`, as Axolotl's built-in `lora`/`qlora`
  adapter with an exact `lora_target_modules` regex, so Axolotl's own LoRA and 4-bit loading
  (it quantizes only for `adapter: qlora`) and their validators apply.
- `on_config_validation_error`: Axolotl rejected the config after `register` rewrote it; put
  back what `register` wrote (`adapter`, `unfrozen_parameters`, ...), so that the same dict,
  loaded again, is judged on what the user wrote. `register` does the same when it refuses the
  recipe itself after writing part of it.
- `get_adapter_capabilities` / `load_adapter`: register the `cofitune` adapter. Axolotl refuses an
  adapter no plugin registered, which is what stops a recipe whose plugin failed to import; the
  LoRA names are not registered at all, since `register` replaces them before validation, so
  nothing but this plugin can make them valid.
- `post_trainer_create`: after Axolotl froze the model (or added the adapters), check that
  exactly the selection (or its adapters) trains, print the trainable-parameter report, and attach
  the soft masks (`cofitune.soft_mask`), to the base rows or to each adapter's `lora_B` rows.
- `post_train`: with `cofitune.report`, write the before/after report (train_report.py) once the
  trained model (or LoRA adapter) is saved in `output_dir`, on global rank 0 only. Axolotl calls
  this hook right after training and again after saving: the report reads the saved model, so it
  runs on the call that finds weights newer than the start of training, once. A LoRA training's
  report runs as `axolotl cofitune-report` in its own process (`_report_in_own_process`).
- `post_lora_merge` (Axolotl >= 0.21, `axolotl merge-lora`): with `cofitune.report`, write the
  report of the merged model into its directory, beside the model users deploy.

Axolotl 0.21 keeps one plugin instance from one `load_cfg` to the next (0.19 made a new one), so
`register`, the first hook of every training, resets what the instance remembers of the last one.
"""

import copy
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml
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

from cofitune_plugin.args import (
    ADAPTER,
    LORA_ADAPTERS,
    CoFiTuneConfig,
    RecipeError,
    check_recipe,
)
from cofitune_plugin.cpu_ddp import enable_cpu_ddp
from cofitune_plugin.cpu_threads import use_every_core
from cofitune_plugin.importance_store import MANIFEST_FILE, load_importance, model_manifest
from cofitune_plugin.lora import lora_b_masks, lora_parameters, target_modules_regex
from cofitune_plugin.search import read_chosen
from cofitune_plugin.selection import Selection, select
from cofitune_plugin.sharded import EnginePlacement, engine_of, sampled_values
from cofitune_plugin.softmask import SoftMask, check_masks, row_masks

# Axolotl shows INFO only from loggers under "axolotl", where its own integrations live.
LOG = get_logger("axolotl.integrations.cofitune")

REWRITTEN_KEYS = ("adapter", "cofitune", "lora_target_modules", "max_memory", "unfrozen_parameters")
"""The recipe keys `register` may write, before Axolotl validates the config."""
_ABSENT = object()


class CoFiTunePlugin(BasePlugin):
    """Axolotl plugin adding the `cofitune` fine-tuning mode."""

    _trainer_created: float | None = None  # when `post_trainer_create` ran (epoch seconds)
    _reported: bool = False
    # The config `register` last rewrote, and its REWRITTEN_KEYS as they were before.
    _registered: tuple[dict, dict[str, Any]] | None = None

    def get_input_args(self) -> str:
        return "cofitune_plugin.args.CoFiTuneArgs"

    def get_adapter_capabilities(self) -> list[AdapterCapabilities]:
        return [AdapterCapabilities(name=ADAPTER, lora_like=False, relora=False)]

    def register(self, cfg: dict) -> None:
        # A new training (or command) starts: forget the previous one's, under Axolotl 0.21.
        self._trainer_created = None
        self._reported = False
        self._registered = (
            cfg,
            {key: copy.deepcopy(cfg[key]) if key in cfg else _ABSENT for key in REWRITTEN_KEYS},
        )
        try:
            self._hand_over(cfg)
        except Exception:
            # refused here rather than by Axolotl's validation: the same clean-up
            self.on_config_validation_error(cfg)
            raise

    def _hand_over(self, cfg: dict) -> None:
        """Check the recipe and write the selection into `cfg` in Axolotl's own terms."""
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
        _, meta_model = meta_model_of(cfg)
        selection = select(meta_model, config.layers, config.modules)
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

    def on_config_validation_error(self, cfg: dict) -> None:
        """Axolotl rejected the config `register` rewrote: put back the keys it wrote as the user
        had them. A caller that loads the same dict again (corrected, or in a notebook) would
        otherwise have it refused for what `register` wrote (`adapter: lora`, a second
        `unfrozen_parameters`), not for what the user wrote. Process-wide set-up (CPU threads,
        CPU DDP) stays: it follows from how the process was launched, not from this config."""
        if self._registered is None or self._registered[0] is not cfg:
            return
        _, before = self._registered
        self._registered = None
        for key, value in before.items():
            if value is _ABSENT:
                cfg.pop(key, None)
            else:
                cfg[key] = value

    def load_adapter(
        self, model: nn.Module, cfg: DictDefault, inference: bool = False, config_only: bool = False
    ) -> tuple[nn.Module, None] | None:
        # Freezing itself is Axolotl's (from `unfrozen_parameters`); there is no adapter to add.
        return (model, None) if cfg.adapter == ADAPTER else None

    def post_trainer_create(self, cfg: DictDefault, trainer: Trainer) -> None:
        if cfg.cofitune is None:
            return
        self._trainer_created = time.time()
        config = CoFiTuneConfig.model_validate(cfg.cofitune)
        lora = cfg.adapter != ADAPTER  # lora/qlora, handed over by `register`
        if lora:
            # PEFT's inner model keeps the selection's names; the meta copy keeps the
            # unquantized shapes, which 4-bit weights no longer have.
            model = trainer.model.get_base_model()
            _, reference = meta_model_of(cfg)
        else:
            model = reference = trainer.model
        selection = select(reference, config.layers, config.modules)
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
            masks = _build_masks(model, selection, config, lora)
            if lora:  # PEFT's names: the callback is handed the PEFT model
                masks = {f"base_model.model.{name}": mask for name, mask in masks.items()}
            trainer.add_callback(_SoftMaskDuringTraining(masks, config.soft_mask.apply_to))

    def post_train(self, cfg: DictDefault, model: nn.Module) -> None:
        if cfg.cofitune is None or cfg.cofitune.get("report") is None or self._reported:
            return
        if os.environ.get("RANK", "0") != "0" or not _saved_since(
            Path(cfg.output_dir), self._trainer_created
        ):
            return
        self._reported = True
        if cfg.adapter != ADAPTER:
            _report_in_own_process(cfg)
            return
        _report_and_log(cfg)

    def post_lora_merge(self, cfg: DictDefault, adapter_path: str, output_path: str) -> None:
        """Axolotl >= 0.21, after `axolotl merge-lora` saved the merged model: its report, in
        `output_path` (the merged weights are what users deploy; 0.19 has no such hook, and the
        report after training merges the adapter in memory instead)."""
        if cfg.cofitune is None or cfg.cofitune.get("report") is None:
            return
        if os.environ.get("RANK", "0") != "0":
            return
        _report_and_log(cfg, Path(output_path))


def _report_and_log(cfg: DictDefault, model_dir: Path | None = None) -> None:
    """`write_report`, then its headline in the training's log."""
    from cofitune_plugin.train_report import headline

    report, path = write_report(cfg, model_dir)
    LOG.info("cofitune: %s", "\n".join([*headline(report), f"Report: {path}"]))


_LAUNCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
"""What a launcher tells its ranks; the report's own process is no rank of the training."""


def _report_in_own_process(cfg: DictDefault) -> None:
    """The report of a LoRA training, written by `axolotl cofitune-report` in a process of its
    own on the recipe as trained. In the training process Axolotl's LoRA kernels (on by default
    for LoRA) have replaced the attention classes' forward with one that needs per-layer state
    only the trained model carries, so the fresh base and merged models the report loads cannot
    run there."""
    recipe = yaml.safe_load(Path(cfg.axolotl_config_path).read_text())
    recipe.update(base_model=str(cfg.base_model), output_dir=str(cfg.output_dir))
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in _LAUNCH_ENV and not key.startswith(("ACCELERATE_", "FSDP_"))
    }
    with tempfile.TemporaryDirectory(prefix="cofitune-report-") as directory:
        trained = Path(directory) / "recipe.yml"
        trained.write_text(yaml.safe_dump(recipe, sort_keys=False))
        command = [sys.executable, "-m", "axolotl.cli.main", "cofitune-report", str(trained)]
        if subprocess.run(command, env=env).returncode != 0:
            raise RecipeError(
                f"cofitune.report: the report on the trained adapter in {cfg.output_dir} failed "
                "(its error is above); the adapter is saved: run `axolotl cofitune-report` on "
                "this recipe to write the report"
            )


def _saved_since(output_dir: Path, since: float | None) -> bool:
    """Weights saved in `output_dir` after `since` (the trained model, not an older run's)."""
    files = [*output_dir.glob("*.safetensors"), *output_dir.glob("pytorch_model*.bin")]
    saved = [p.stat().st_mtime for p in files]
    return bool(saved) and since is not None and max(saved) >= since


def load_trained(cfg: DictDefault, model_dir: Path | None = None):
    """What the report and the dial need from a recipe whose model was trained: the tuned model
    from `model_dir` (default `output_dir`; on the accelerator when there is one), the base's
    values of the selected parameters, an evaluator on the report's data, and the selection's
    table. A `cofitune-lora`/`-qlora` run's adapter is merged into the base in memory: the
    merged weights differ from the base in the selected modules only, so the report and the dial
    read them as a full-weight selection. Refuses a model that is not the recipe's base plus a
    change of the selection (see `dial.check_same_base`)."""
    from axolotl.loaders import load_tokenizer

    from cofitune_plugin.args import eval_settings
    from cofitune_plugin.dial import DialError, check_same_base, selection_values
    from cofitune_plugin.train_report import Evaluator, Trained

    config = CoFiTuneConfig.model_validate(cfg.cofitune)
    settings = eval_settings(config)
    output_dir = model_dir or Path(cfg.output_dir)
    lora = cfg.adapter != ADAPTER  # lora/qlora, handed over by `register`
    adapter = lora and (output_dir / "adapter_config.json").is_file()
    if not adapter and not (output_dir / "config.json").is_file():
        raise RecipeError(
            f"output_dir: no trained {'adapter' if lora else 'model'} in {output_dir}; run "
            "`axolotl train` on this recipe first (the report compares that model with "
            "`base_model`)"
        )
    evaluator = Evaluator(load_tokenizer(cfg), settings)
    _, meta_model = meta_model_of(cfg)
    selection = select(meta_model, config.layers, config.modules)
    remote = bool(cfg.trust_remote_code)
    if adapter:
        from peft import PeftModel

        # The unquantized base: with cofitune-qlora the adapter trained beside 4-bit weights
        # and is merged, as `axolotl merge-lora` does, into the full-precision ones.
        base = AutoModelForCausalLM.from_pretrained(
            cfg.base_model, dtype="auto", trust_remote_code=remote
        )
        tuned = AutoModelForCausalLM.from_pretrained(
            cfg.base_model, dtype=base.dtype, trust_remote_code=remote
        )
        tuned = PeftModel.from_pretrained(tuned, output_dir).merge_and_unload()
    else:
        tuned = AutoModelForCausalLM.from_pretrained(
            output_dir, dtype="auto", trust_remote_code=remote
        )
        base = AutoModelForCausalLM.from_pretrained(
            cfg.base_model, dtype=tuned.dtype, trust_remote_code=remote
        )
    try:
        check_same_base(base, tuned, selection.parameters)
    except DialError as exc:
        raise RecipeError(
            f"output_dir: {output_dir} does not hold `base_model` ({cfg.base_model}) trained on "
            f"this recipe's selection: {exc}"
        ) from None
    base_values = selection_values(base, selection.parameters)
    del base
    if torch.cuda.is_available():
        tuned = tuned.to("cuda")
    total = sum(p.numel() for p in meta_model.parameters())
    search_dir = (config.search.output_dir or config.from_search) if config.search else None
    return Trained(
        tuned,
        base_values,
        evaluator,
        output_dir,
        Path(search_dir) if search_dir else None,
        selection.report(total),
    )


def write_report(cfg: DictDefault, model_dir: Path | None = None) -> tuple[dict, Path]:
    """`cofitune-report.json` and `.md` in `model_dir` (default `output_dir`), on the model
    there; returns the report and the .md path."""
    from cofitune_plugin.train_report import REPORT_MD, report_on

    trained = load_trained(cfg, model_dir)
    return report_on(trained, str(cfg.base_model)), trained.output_dir / REPORT_MD


class _SoftMaskDuringTraining(TrainerCallback):
    """Keeps the soft mask exactly as long as `trainer.train()`, so a later evaluation or a
    second trainer on the same model (the search, the benchmarks) is never masked.

    The mask is bound at `on_train_begin`, after accelerate prepared the model and optimizer:
    FSDP2 replaces the parameters with sharded ones and DeepSpeed builds its partitions there,
    so hooks bound earlier would sit on tensors that no longer train (`sharded.EnginePlacement`).
    """

    def __init__(self, masks: dict[str, torch.Tensor], apply_to: str) -> None:
        self.masks = masks
        self.apply_to = apply_to
        self.soft_mask: SoftMask | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs) -> None:
        self.soft_mask = SoftMask(model, self.masks, self.apply_to, placement=EnginePlacement())
        # Every rank logs what it bound: a resumed run must bind the same rows on each rank.
        LOG.info(
            "cofitune: soft masks bound to this rank's %s (apply_to=%s; rank %s, mask "
            "fingerprint %s)",
            engine_of(model.get_parameter(next(iter(self.masks)))),
            self.apply_to,
            os.environ.get("RANK", "0"),
            self.soft_mask.fingerprint(),
            main_process_only=False,
        )
        if self.apply_to == "update":
            # Accelerate wraps the optimizer, and DeepSpeed's ZeRO optimizer wraps the torch
            # optimizer it steps over its partitions: step hooks go on that innermost one.
            while hasattr(optimizer, "optimizer"):
                optimizer = optimizer.optimizer
            self.soft_mask.attach_optimizer(optimizer)

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


def _build_masks(
    model: nn.Module, selection: Selection, config: CoFiTuneConfig, lora: bool
) -> dict[str, torch.Tensor]:
    """Row masks of the selected weights, for the weights themselves or, with `lora`, for each
    adapter's `lora_B`; checked against the model's shapes now, before training starts."""
    importance = load_importance(
        importance_dirs(config.soft_mask.importance),
        expected=model_manifest(
            model, selection.architecture, selection.layer_prefix, sampled_values
        ),
        estimator=config.soft_mask.estimator,
    )
    masks = row_masks(model, selection, importance)
    if lora:
        masks = lora_b_masks(model, masks)
    LOG.info(
        "cofitune: soft masks on %d parameters (apply_to=%s), from %s",
        len(masks),
        config.soft_mask.apply_to,
        config.soft_mask.importance,
    )
    check_masks(model, masks, EnginePlacement())
    return masks


def meta_model_of(cfg: dict) -> tuple[PretrainedConfig, nn.Module]:
    """The recipe's model built on the meta device: its parameter names and shapes, no weights."""
    trust_remote_code = bool(cfg.get("trust_remote_code"))
    model_config = AutoConfig.from_pretrained(
        cfg.get("base_model_config") or cfg["base_model"], trust_remote_code=trust_remote_code
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)
    return model_config, model


def _check_patterns_match(patterns: list[str], model: nn.Module, selection: Selection) -> None:
    """Guard the hand-over: Axolotl's matcher must pick exactly the selected parameters."""
    compiled = [LayerNamePattern(p) for p in patterns]
    matched = {n for n, _ in model.named_parameters() if any(p.match(n) for p in compiled)}
    if matched != set(selection.parameters):
        raise RuntimeError(f"cofitune: internal error: {patterns} match {sorted(matched)[:5]}...")
