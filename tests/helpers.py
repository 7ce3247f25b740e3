"""Test helpers: tiny models, tokenizers, data and recipes built in temp dirs, and the real
`axolotl` CLI in a subprocess; no test reaches a network. Fixtures stay in conftest.py."""

import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import torch
import yaml
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedTokenizerFast,
)

OFFLINE_ENV = {
    "AXOLOTL_DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
}
AXOLOTL_VERSION = tuple(int(part) for part in version("axolotl").split(".")[:2])
"""The installed Axolotl's (major, minor): the tests run on both ends of the supported range."""
VOCAB_SIZE = 320
_COMMON = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB_SIZE,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    tie_word_embeddings=False,
)
TINY_CONFIGS: dict[str, dict] = {
    "llama": {},
    "qwen2": {},
    "gpt_neox": {"rotary_pct": 1.0},
    "phi3": {},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 16,
        "shared_expert_intermediate_size": 32,
    },
    "gemma2": {"head_dim": 8},
    "qwen3": {"head_dim": 8},
    "mistral": {},
    "gemma": {"head_dim": 8},
    "gemma3_text": {"head_dim": 8},
    "olmo2": {},
    "granite": {},
    "qwen3_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 16,
        "head_dim": 8,
    },
}

SENTENCES = [
    "Tom buys 3 apples at 2 dollars each. Step 1: 3 * 2 = 6. #### 6",
    "A train goes 60 miles per hour for 2 hours. Step 1: 60 * 2 = 120. #### 120",
    "Anna is 7 and her brother is 3 years older. Step 1: 7 + 3 = 10. #### 10",
    "Share 12 sweets among 4 friends. Step 1: 12 / 4 = 3. #### 3",
    "The capital of France is Paris, a city on the Seine.",
    "Write a short poem about the sea and the wind.",
]


def write_tokenizer(path: Path) -> None:
    """A byte-level BPE trained on the test sentences, saved as a HF fast tokenizer."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(SENTENCES * 4, trainer)
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    ).save_pretrained(path)


def tiny_config(model_type: str, **extra) -> PretrainedConfig:
    """An 8-layer, 32-wide config of `model_type` (4 query heads, 2 key/value heads)."""
    return AutoConfig.for_model(model_type, **{**_COMMON, **TINY_CONFIGS[model_type], **extra})


def tiny_model(model_type: str, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised tiny `model_type`, the same for the same seed."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(model_type))


def build_tiny_model(path: Path, model_type: str, seed: int = 0) -> Path:
    """Save a randomly initialised `model_type` with 8 layers and a tokenizer to `path`."""
    model = tiny_model(model_type, seed)
    model.save_pretrained(path)
    write_tokenizer(path)
    return path


def write_dataset(path: Path, n: int = 64) -> Path:
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"text": SENTENCES[i % len(SENTENCES)]}) + "\n")
    return path


def write_equal_length_dataset(path: Path, tokenizer_dir: Path) -> Path:
    """Distinct texts that all tokenize to the same length. Axolotl averages the loss per process
    (`average_tokens_across_devices=False`), so only then is a multi-process step, the mean of
    per-process token means, the same as one process's token mean over the global batch."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    texts = [
        f"Tom buys {a} apples at {b} dollars each. #### {a * b}"
        for a in range(2, 10)
        for b in range(2, 10)
    ]
    by_length: dict[int, list[str]] = {}
    for text in texts:
        by_length.setdefault(len(tokenizer(text)["input_ids"]), []).append(text)
    same_length = max(by_length.values(), key=len)
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in same_length))
    return path


def recipe(tmp_path: Path, model_dir: Path, **overrides) -> dict:
    """A small CPU recipe training `model_dir` on a completion data set with CoFiTune."""
    data = write_dataset(tmp_path / "data.jsonl")
    cfg = {
        "base_model": str(model_dir),
        "plugins": ["cofitune_plugin.CoFiTunePlugin"],
        "adapter": "cofitune",
        "cofitune": {"layers": "25%-50%", "modules": ["ffn"]},
        "datasets": [{"path": str(data), "ds_type": "json", "type": "completion"}],
        "dataset_prepared_path": str(tmp_path / "prepared"),
        "output_dir": str(tmp_path / "out"),
        "sequence_len": 64,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "max_steps": 3,
        "learning_rate": 1e-2,
        "optimizer": "adamw_torch",
        "lr_scheduler": "constant",
        "val_set_size": 0,
        "bf16": False,
        "fp16": False,
        "tf32": False,
        "save_strategy": "no",
        "logging_steps": 1,
        "seed": 0,
        "dataloader_num_workers": 0,
    }
    for key, value in overrides.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    return cfg


def write_recipe(tmp_path: Path, cfg: dict) -> Path:
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_axolotl(
    *args: str, cwd: Path, env: dict[str, str | None] | None = None, program: str = "axolotl"
) -> subprocess.CompletedProcess:
    """Run the real `axolotl` CLI of this environment in a subprocess (`env`: extra variables;
    None removes one; `program`: another command of the environment, e.g. `accelerate`).

    OMP_NUM_THREADS=1 is exported as a user's choice, which the plugin keeps (tiny models run
    fastest on one thread, and the test workers share the cores); `env={"OMP_NUM_THREADS":
    None}` exports none, so the plugin gives the trainer every core."""
    bin_dir = Path(sys.executable).parent  # `axolotl train` execs `accelerate` from PATH
    path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    variables = {**os.environ, **OFFLINE_ENV, "PATH": path, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [str(bin_dir / program), *args],
        cwd=cwd,
        env={key: value for key, value in variables.items() if value is not None},
        capture_output=True,
        text=True,
        timeout=900,
    )


def soft_mask_block(
    importance: Path, apply_to: str = "update", estimator: str | None = None
) -> dict:
    """A `cofitune:` block with soft masks (`estimator`: the recipe's default when None)."""
    soft_mask = {"importance": str(importance), "apply_to": apply_to}
    if estimator:
        soft_mask["estimator"] = estimator
    return {"layers": "25%-50%", "modules": ["ffn+mha"], "soft_mask": soft_mask}


def search_block(tmp_path: Path, **search) -> dict:
    """A `cofitune:` block with a `search:` over a tiny model: held-out completions scored by
    loss, general prompts for retention; `search` entries override the defaults."""
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text(
        "".join(
            json.dumps({"prompt": s[: s.index("Step")], "answer": s[s.index("Step") :]}) + "\n"
            for s in SENTENCES[:4]
        )
    )
    general = tmp_path / "general.jsonl"
    general.write_text("".join(json.dumps({"prompt": s[:20]}) + "\n" for s in SENTENCES[4:]))
    block = {
        "output_dir": str(tmp_path / "search"),
        "trial": {"max_steps": 2},
        "speciality": {"data": str(held_out), "metric": "loss"},
        "versatility": {"prompts": str(general), "max_new_tokens": 8},
        **search,
    }
    return {"from_search": str(tmp_path / "search"), "search": block}


def expected_row_keep(importance: Path, layer: int) -> dict[str, torch.Tensor]:
    """1 - I per row of the tiny llama's selected projections in `layer`, written out by hand
    (4 heads of 8 dims, 2 kv heads) from the raw importance, to check `softmask` against."""
    from safetensors.torch import load_file

    from cofitune_plugin.softmask import normalize

    raw = load_file(importance / "importance.safetensors")
    normalization = json.loads((importance / "manifest.json").read_text())["normalization"]
    keep = {unit: 1 - normalize(raw[unit], normalization) for unit in raw}
    return {
        "mlp.up_proj": keep["intermediate"][layer],
        "mlp.down_proj": keep["output"][layer],
        "self_attn.q_proj": keep["head"][layer].repeat_interleave(8),
        # GQA: 2 kv heads serve query heads (0, 1) and (2, 3): the larger I wins
        "self_attn.k_proj": keep["head"][layer].view(2, 2).amin(1).repeat_interleave(8),
    }


def masked_and_plain_step(
    tmp_path: Path, model_dir: Path, importance: Path, apply_to: str, optimizer: str, **overrides
) -> dict[bool, Path]:
    """One `axolotl train` step of the soft-mask selection, with the mask (True) and without it
    (False), from the same state and with no weight decay or clipping; returns each run's
    output directory."""
    outputs = {}
    for masked in (False, True):
        run_dir = tmp_path / ("masked" if masked else "plain")
        run_dir.mkdir()
        block = soft_mask_block(importance, apply_to)
        if not masked:
            del block["soft_mask"]
        cfg = recipe(
            run_dir,
            model_dir,
            cofitune=block,
            max_steps=1,
            optimizer=optimizer,
            weight_decay=0.0,
            max_grad_norm=0.0,
            **overrides,
        )
        result = run_axolotl("train", str(write_recipe(run_dir, cfg)), cwd=run_dir)
        assert result.returncode == 0, result.stderr[-4000:]
        outputs[masked] = run_dir / "out"
    return outputs


HARNESS = Path(__file__).parent / "harness"
"""The test harness's shims for multi-process launches on CPU (tests/harness)."""


def harness_env(engines: bool = True) -> dict[str, str]:
    """The subprocess environment with the CPU launch shims (tests/harness) on PYTHONPATH;
    without `engines`, only the one every multi-process launch needs (DDP's tests: the
    plugin's own CPU DDP must work without the FSDP/DeepSpeed shims)."""
    path = os.environ.get("PYTHONPATH")
    env = {"PYTHONPATH": f"{HARNESS}{os.pathsep}{path}" if path else str(HARNESS)}
    return env if engines else {**env, "COFITUNE_HARNESS_ENGINES": "0"}
