"""The fine level's control: an importance that carries no information.

Each layer's scores of each unit type are shuffled over that layer's units: the same values, so
the same mask strength per layer and the same distribution, on units chosen at random. If the
mask from the measured importance keeps no more general ability than this one at matched
speciality, the mask is only a damping (a smaller step, which a lower rate gives for free), and
the importance measures nothing the method uses.

`python benchmarks/forgetting/permuted.py SOURCE TARGET [SEED]`: a permuted copy of the
importance in SOURCE, written to TARGET (started by `python benchmarks/forgetting` when a planned
method trains with it, `methods.Method.permuted_mask`).
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from cofitune_plugin.importance import RawImportance
from cofitune_plugin.importance_store import IMPORTANCE_FILE, MANIFEST_FILE, save_importance


def permuted(raw: RawImportance, seed: int) -> RawImportance:
    """`raw` with each layer's scores of each unit type shuffled over the layer's units."""
    generator = torch.Generator().manual_seed(seed)

    def shuffle(scores: torch.Tensor) -> torch.Tensor:
        return torch.stack(
            [layer[torch.randperm(layer.numel(), generator=generator)] for layer in scores]
        )

    return RawImportance(
        **{unit: shuffle(scores) for unit, scores in raw.tensors().items()},
        tokens=raw.tokens,
        estimator=raw.estimator,
    )


def write_permuted(source: Path, target: Path, seed: int = 0) -> None:
    """A permuted copy of the importance in `source`, in `target`, its manifest saying so (and
    otherwise the source's, so training accepts it for the same model and estimator). A
    complete `target` is never replaced; an interrupted one (no manifest) is."""
    manifest = json.loads((source / MANIFEST_FILE).read_text())
    raw = RawImportance(
        **load_file(source / IMPORTANCE_FILE),
        tokens=manifest["tokens"],
        estimator=manifest["estimator"],
    )
    manifest["control"] = f"values permuted within each layer and unit type, seed {seed}"
    complete = (target / MANIFEST_FILE).exists()
    save_importance(permuted(raw, seed), target, manifest, overwrite=not complete)


if __name__ == "__main__":
    write_permuted(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]) if sys.argv[3:] else 0)
