"""SAE and feature-set files that the example workflows load by name, made with the core's own writers."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from diffbias_core import FeatureSet, SparseAutoencoder, save_features, save_sae

SAE_NAME = "sd15_hspace.safetensors"
"""Name the example workflows give Load Bias SAE."""
FEATURE_SETS = {
    "sd15_hspace.gender.features.safetensors": ("male", "female"),
    "sd15_hspace.race.features.safetensors": ("white", "black", "asian", "indian"),
}
"""Feature files the example workflows load, with their classes."""


def example_sae(seed: int = 0, width: int = 1280, latents: int = 512, k: int = 16) -> SparseAutoencoder:
    """A random per-token SAE for the SD1.5 bottleneck (unet.middle)."""
    sae = SparseAutoencoder(
        width,
        latents,
        k,
        hook="unet.middle",
        model_family="sd15",
        provenance={"made_by": "tests/comfy/sae_files.py"},
    )
    sae.reset_parameters(torch.Generator().manual_seed(seed))
    return sae


def example_features(
    sae: SparseAutoencoder, classes: tuple[str, ...], per_class: int = 20, seed: int = 0
) -> FeatureSet:
    """Distinct random feature ids per class with descending scores."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randperm(sae.num_latents, generator=generator)[: per_class * len(classes)].reshape(
        len(classes), -1
    )
    scores = torch.linspace(1.0, 0.1, per_class)
    return FeatureSet(
        classes=classes,
        ids=tuple(row.clone() for row in ids),
        scores=tuple(scores.clone() for _ in classes),
        sae_fingerprint=sae.fingerprint(),
        hook=sae.hook,
        method="random",
        provenance={"made_by": "tests/comfy/sae_files.py"},
    )


ERROR_SAES = {
    "wrong_width.safetensors": dict(width=640),
    "wrong_hook.safetensors": dict(hook="dit.double.0"),
    "other_sd15.safetensors": dict(seed=1),
}
"""SAE files the bad-input tests load: another width, a DiT hook, and a second SD1.5 h-space SAE."""


def write_error_files(folder: Path) -> None:
    """Write the SAE files of :data:`ERROR_SAES` into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, options in ERROR_SAES.items():
        sae = example_sae(seed=options.get("seed", 0), width=options.get("width", 1280))
        sae.hook = options.get("hook", sae.hook)
        save_sae(sae, folder / name)


SPARSIFY_FOLDER = "sparsify_sd15"
"""A folder in EleutherAI sparsify's layout (cfg.json + sae.safetensors) that records no hook point."""


def write_sparsify_folder(folder: Path, width: int = 1280, latents: int = 256, k: int = 8) -> None:
    """Write :data:`SPARSIFY_FOLDER` in ``folder`` (sparsify's tensor names, no diffbias metadata)."""
    sae = example_sae(seed=5, width=width, latents=latents, k=k)
    target = folder / SPARSIFY_FOLDER
    target.mkdir(parents=True, exist_ok=True)
    cfg = {
        "activation": "topk",
        "expansion_factor": latents // width or 1,
        "normalize_decoder": True,
        "num_latents": latents,
        "k": k,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": width,
    }
    (target / "cfg.json").write_text(json.dumps(cfg))
    tensors = {
        "encoder.weight": sae.W_enc.detach().clone(),
        "encoder.bias": sae.b_enc.detach().clone(),
        "W_dec": sae.W_dec.detach().clone(),
        "b_dec": sae.b_dec.detach().clone(),
    }
    save_file(tensors, str(target / "sae.safetensors"))


def write_example_files(folder: Path) -> None:
    """Write the SAE and the feature sets the example workflows name into ``folder`` (models/sae)."""
    folder.mkdir(parents=True, exist_ok=True)
    sae = example_sae()
    save_sae(sae, folder / SAE_NAME)
    for i, (name, classes) in enumerate(FEATURE_SETS.items()):
        save_features(example_features(sae, classes, seed=i), folder / name)
