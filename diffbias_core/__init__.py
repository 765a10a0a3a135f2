"""diffbias_core: find and edit the sparse-autoencoder features of a diffusion model that carry a bias.

Pure torch + safetensors (+ numpy, einops); never imports ComfyUI. See DESIGN in the README.
"""

from .sae import SparseAutoencoder, SparseCode

__all__ = ["SparseAutoencoder", "SparseCode"]
