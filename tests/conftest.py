"""Fixtures shared across test modules; the plain helpers they use live in helpers.py."""

import os
from pathlib import Path

import pytest
import torch

from helpers import (
    OFFLINE_ENV,
    build_tiny_model,
    recipe,
    run_axolotl,
    soft_mask_block,
    write_recipe,
)

os.environ.update(OFFLINE_ENV)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread; two contend badly when the CPU is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """One saved tiny model per architecture, shared by the whole session (read-only)."""
    root = tmp_path_factory.mktemp("models")
    return {mt: build_tiny_model(root / mt, mt) for mt in ("llama", "gpt_neox", "qwen2_moe")}


@pytest.fixture(scope="session")
def llama_importance(tmp_path_factory, tiny_models) -> Path:
    """`axolotl cofitune-importance` run once on the tiny llama; returns the importance dir."""
    root = tmp_path_factory.mktemp("importance")
    importance = root / "importance"
    cfg = recipe(root, tiny_models["llama"], cofitune=soft_mask_block(importance))
    result = run_axolotl("cofitune-importance", str(write_recipe(root, cfg)), cwd=root)
    assert result.returncode == 0, result.stderr[-4000:]
    return importance
