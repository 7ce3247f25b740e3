"""Training one selection after another in memory with Axolotl's trainer: the one place that does.

The search's trials and the forgetting benchmark's runs (CoFiTune's selections and the methods
it is compared with) all do the same thing: load the model, tokenizer and data once through
Axolotl, then, per run, set what trains (a set of parameters, frozen around with Axolotl's own
freezing, or PEFT adapters), build Axolotl's trainer with `setup_trainer`, let the plugin's
`post_trainer_create` in (its selection check and soft masks), train, evaluate, and put the base
weights back for the next run. `axolotl.train.train()` is not used: it always saves and tears
down the process group.
"""

import gc
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

import torch
from peft import PeftConfig
from torch import nn
from transformers.trainer_utils import TrainOutput

from cofitune_plugin.selection import Selection, select

Evaluation = TypeVar("Evaluation")


@dataclass
class TrainedRun(Generic[Evaluation]):
    """What one run trained and measured."""

    output: TrainOutput
    trainable: int  # trainable parameters (of the adapters, for a PEFT run)
    train_seconds: float
    peak_accelerator_bytes: int | None  # peak CUDA memory of `trainer.train()`, None on CPU
    evaluation: Evaluation


class Session:
    """A recipe's model, tokenizer and data, loaded once through Axolotl (`load_cfg` with
    `overrides`, `load_datasets`, `setup_model_and_tokenizer`)."""

    def __init__(self, config: str | Path, **overrides: Any) -> None:
        from axolotl.cli.config import load_cfg
        from axolotl.common.datasets import load_datasets
        from axolotl.train import setup_model_and_tokenizer

        start = time.perf_counter()
        self.cfg = load_cfg(str(config), **overrides)
        self.data = load_datasets(cfg=self.cfg)
        self.model, self.tokenizer, _, self.processor = setup_model_and_tokenizer(self.cfg)
        self.load_seconds = time.perf_counter() - start

    def select(self, layers: str, modules: str | list[str]) -> Selection:
        """CoFiTune's selection `layers` x `modules` in this model."""
        return select(self.model, layers, modules)

    def train(
        self,
        trainable: list[str] | PeftConfig,
        evaluate: Callable[[nn.Module], Evaluation],
        overrides: dict[str, Any] | None = None,
        *,
        plugin: bool = False,
        restore: Literal["memory", "checkpoint"] = "memory",
        optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
        loss: Callable[..., torch.Tensor] | None = None,
    ) -> TrainedRun[Evaluation]:
        """Train `trainable` (Axolotl `unfrozen_parameters` patterns, or a PEFT config whose
        adapters wrap the model) with the session's config changed by `overrides`, score the
        trained model with `evaluate`, then put the base weights back: for a PEFT run by
        unloading the adapters, otherwise from a copy of the trained parameters kept in memory
        or, with `restore="checkpoint"`, from the checkpoint on disk (no copy is held, which
        would add the trained parameters' size to a full fine-tune's peak memory).

        `plugin`: call the plugins' `post_trainer_create` (CoFiTune's recipes need it; the
        methods CoFiTune is compared with run without it). A `seed` override is set before the
        adapters are made: LoRA's A matrices are random. `optimizer` builds the run's optimizer
        from the model (one Axolotl has no option for); the config's scheduler drives it.
        `loss` replaces the trainer's loss (its `compute_loss_func`: called with the model's
        outputs, the labels and `num_items_in_batch`), as Axolotl's EAFT loss does."""
        from axolotl.integrations.base import PluginManager
        from axolotl.utils.dict import DictDefault
        from axolotl.utils.freeze import freeze_layers_except
        from axolotl.utils.trainer import setup_trainer
        from peft import get_peft_model
        from transformers import set_seed

        overrides = overrides or {}
        cfg = DictDefault({**self.cfg, **overrides})
        if "seed" in overrides:
            set_seed(overrides["seed"])
        model = self.model
        if isinstance(trainable, PeftConfig):
            model = get_peft_model(self.model, trainable)
        else:
            freeze_layers_except(self.model, trainable)
        trained = [name for name, p in self.model.named_parameters() if p.requires_grad]
        original = (
            {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
            if restore == "memory" and model is self.model
            else None
        )
        count = sum(p.numel() for p in model.parameters() if p.requires_grad)
        trainer = setup_trainer(
            cfg,
            self.data.train_dataset,
            self.data.eval_dataset,
            model,
            self.tokenizer,
            self.processor,
            self.data.total_num_steps,
        )
        if optimizer is not None:
            trainer.optimizer = optimizer(model)  # the trainer builds one only when unset
        if loss is not None:
            trainer.compute_loss_func = loss
        if plugin:
            PluginManager.get_instance().post_trainer_create(cfg, trainer)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        output = trainer.train()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
        del trainer
        gc.collect()

        evaluation = evaluate(model)
        if model is not self.model:
            self.model = model.unload()  # the base modules back, adapters dropped
        elif original is not None:
            self._restore_from_memory(original)
        else:
            self._restore_from_checkpoint(trained)
        return TrainedRun(output, count, seconds, peak, evaluation)

    @torch.no_grad()
    def _restore_from_memory(self, original: dict[str, torch.Tensor]) -> None:
        for name, param in self.model.named_parameters():
            if name in original:
                param.copy_(original[name])

    @torch.no_grad()
    def _restore_from_checkpoint(self, names: Collection[str]) -> None:
        for name, value in checkpoint_values(self.cfg.base_model, names).items():
            self.model.get_parameter(name).copy_(value)


def checkpoint_values(directory: str | Path, names: Collection[str]) -> dict[str, torch.Tensor]:
    """A model's values of the parameters `names`, read from its checkpoint in `directory`
    (safetensors) rather than kept in memory."""
    from safetensors import safe_open

    wanted, values = set(names), {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(path), "pt") as checkpoint:
            for name in wanted.intersection(checkpoint.keys()):
                values[name] = checkpoint.get_tensor(name)
            wanted -= values.keys()
    if wanted:
        raise RuntimeError(f"not in the checkpoint, cannot restore: {sorted(wanted)[:5]}")
    return values


def exact_patterns(names: Collection[str]) -> list[str]:
    """Axolotl `unfrozen_parameters` patterns that unfreeze exactly the parameters `names`
    (Axolotl's freezing reads a period as a period)."""
    return [f"^{name}$" for name in names]
