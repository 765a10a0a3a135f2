"""diffbias_core: find and edit the sparse-autoencoder features of a diffusion model that carry a bias.

Pure torch + safetensors (+ numpy, einops); never imports ComfyUI. The stages and the data flow: docs/ARCHITECTURE.md.
"""

from .attribute.features import FeatureSet, load_features, save_features
from .intervene.intervention import (
    SUPPRESS,
    EditSpec,
    FeatureTable,
    apply_edit,
    assign_classes,
    edit_map,
    feature_table,
    parse_target,
)
from .measure.metrics import Proportions, class_proportions, fairness_discrepancy, kl_to_target
from .sae.formats import FormatError, load_sae, sae_metadata, save_sae
from .sae.model import SparseAutoencoder, SparseCode

__all__ = [
    "SUPPRESS",
    "EditSpec",
    "FeatureSet",
    "FeatureTable",
    "FormatError",
    "Proportions",
    "SparseAutoencoder",
    "SparseCode",
    "apply_edit",
    "assign_classes",
    "class_proportions",
    "edit_map",
    "fairness_discrepancy",
    "feature_table",
    "kl_to_target",
    "load_features",
    "load_sae",
    "parse_target",
    "sae_metadata",
    "save_features",
    "save_sae",
]
