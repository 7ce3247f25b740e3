"""What a benchmark ran on, recorded beside its figures (the scripts in this folder share it)."""

import importlib.metadata
import os
import platform

import torch


def describe() -> dict:
    """Platform, processor, cores, torch threads and the versions that decide the figures."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        **{name: importlib.metadata.version(name) for name in ("torch", "transformers", "peft")},
    }
