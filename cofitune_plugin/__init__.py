"""CoFiTune for Axolotl: train a few modules of an aligned LLM, soft-masked, to keep its
general abilities while it learns a domain (arXiv 2404.10306)."""

from cofitune_plugin.plugin import CoFiTunePlugin

__all__ = ["CoFiTunePlugin"]
__version__ = "0.1.0"
