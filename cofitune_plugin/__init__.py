"""CoFiTune for Axolotl: train a few modules of an aligned LLM, soft-masked, to keep its
general abilities while it learns a domain (arXiv 2404.10306)."""

__all__ = ["CoFiTunePlugin"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """Import the Axolotl glue only when asked for (Axolotl's plugin loader does `getattr`), so
    the plain-PyTorch modules load without Axolotl's 10-15 s import."""
    if name == "CoFiTunePlugin":
        from cofitune_plugin.plugin import CoFiTunePlugin

        return CoFiTunePlugin
    raise AttributeError(f"module 'cofitune_plugin' has no attribute {name!r}")
