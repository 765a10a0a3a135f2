"""TopK sparse autoencoder on a hidden activation of a diffusion model.

    z = TopK_k(ReLU(W_enc (x - b_dec) + b_enc))        x_hat = W_dec^T z + b_dec

Two layouts share one module:

* per-token (``kernel_size == 1``): one code per token or per spatial position; ``x`` is a
  ``d_in`` vector (the channel dim of a ``(B, C, H, W)`` map, the last dim of ``(B, T, C)``).
* convolutional (``kernel_size == K > 1``, the DiffLens SD1.5 layout): the encoder is a K x K
  convolution over a K x K map, so the whole map gives one code. Internally this is a per-token
  SAE on the flattened ``(C, K, K)`` map, ``n_in = d_in * K * K``; ``b_dec`` is per channel and
  is broadcast over the K x K positions, as a ConvTranspose2d bias is.

Weights are stored in the public file shapes: ``W_enc``/``W_dec`` are ``(num_latents, d_in)`` or
``(num_latents, d_in, K, K)``, ``b_enc`` is ``(num_latents,)`` and ``b_dec`` is ``(d_in,)``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..base import layout

WEIGHTS = ("W_enc", "b_enc", "W_dec", "b_dec")
"""Names of the four weight tensors, in the order :meth:`SparseAutoencoder.from_weights` takes them."""


class SparseCode(NamedTuple):
    """A k-sparse latent code.

    values: (..., k) activations of the selected latents, >= 0, in descending order.
    indices: (..., k) int64 latent ids in [0, num_latents).
    """

    values: Tensor
    indices: Tensor


class SparseAutoencoder(nn.Module):
    """TopK sparse autoencoder (per-token or K x K convolutional).

    Args:
        d_in: channel width of the hooked activation.
        num_latents: dictionary size L.
        k: number of active latents per code, 1 <= k <= L.
        kernel_size: 1 for per-token codes; K > 1 for one code per K x K map.
        hook: hook point name (``unet.middle``, ``dit.double.3``, ...), see docs/ARCHITECTURE.md.
        model_family: the model family the SAE was trained on (``sd15``, ``sdxl``, ``flux``, ``toy``...).
        provenance: free-form string facts (training data, steps, source file, ...), saved with the SAE.
        dtype, device: of the parameters. ``device="meta"`` skips the random initialisation (for loading).
    """

    def __init__(
        self,
        d_in: int,
        num_latents: int,
        k: int,
        *,
        kernel_size: int = 1,
        hook: str = "unet.middle",
        model_family: str = "unknown",
        provenance: Mapping[str, str] | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("d_in", d_in),
            ("num_latents", num_latents),
            ("k", k),
            ("kernel_size", kernel_size),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SparseAutoencoder: {name} must be a positive integer, got {value!r}")
        if k > num_latents:
            raise ValueError(f"SparseAutoencoder: k must be <= num_latents ({num_latents}), got {k}")
        for name, value in (("hook", hook), ("model_family", model_family)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"SparseAutoencoder: {name} must be a non-empty string, got {value!r}")
        provenance = dict(provenance or {})
        bad = {
            key: value
            for key, value in provenance.items()
            if not (isinstance(key, str) and isinstance(value, str))
        }
        if bad:
            raise ValueError(f"SparseAutoencoder: provenance keys and values must be strings, got {bad!r}")
        self.d_in = d_in
        self.num_latents = num_latents
        self.k = k
        self.kernel_size = kernel_size
        self.hook = hook
        self.model_family = model_family
        self.provenance: dict[str, str] = provenance
        """Free-form string facts about how the SAE was made (data, steps, source file, ...)."""
        kernel = (kernel_size, kernel_size) if kernel_size > 1 else ()
        factory = {"dtype": dtype, "device": device}
        self.W_enc = nn.Parameter(torch.empty(num_latents, d_in, *kernel, **factory))
        self.b_enc = nn.Parameter(torch.zeros(num_latents, **factory))
        self.W_dec = nn.Parameter(torch.empty(num_latents, d_in, *kernel, **factory))
        self.b_dec = nn.Parameter(torch.zeros(d_in, **factory))
        self._fingerprint: tuple[tuple, str] | None = None
        self.reset_parameters()

    @classmethod
    def from_weights(
        cls,
        W_enc: Tensor,
        b_enc: Tensor,
        W_dec: Tensor,
        b_dec: Tensor,
        k: int,
        *,
        hook: str = "unet.middle",
        model_family: str = "unknown",
        provenance: Mapping[str, str] | None = None,
    ) -> SparseAutoencoder:
        """An SAE holding the given tensors (no copy, no random init); sizes are read from the shapes.

        W_enc, W_dec: (L, d_in) or (L, d_in, K, K); b_enc: (L,); b_dec: (d_in,); one floating dtype and device.
        """
        if W_enc.ndim not in (2, 4):
            raise ValueError(f"W_enc must be (L, d_in) or (L, d_in, K, K), got shape {tuple(W_enc.shape)}")
        num_latents, d_in = W_enc.shape[:2]
        kernel_size = W_enc.shape[-1] if W_enc.ndim == 4 else 1
        if W_enc.ndim == 4 and (W_enc.shape[2] != kernel_size or kernel_size < 2):
            raise ValueError(f"W_enc must have a square kernel of size >= 2, got shape {tuple(W_enc.shape)}")
        expected = {
            "W_enc": tuple(W_enc.shape),
            "b_enc": (num_latents,),
            "W_dec": tuple(W_enc.shape),
            "b_dec": (d_in,),
        }
        given = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
        for name, tensor in given.items():
            if tuple(tensor.shape) != expected[name]:
                raise ValueError(f"{name} must have shape {expected[name]}, got {tuple(tensor.shape)}")
            if not tensor.is_floating_point() or tensor.dtype != W_enc.dtype or tensor.device != W_enc.device:
                raise ValueError(
                    f"{name} is {tensor.dtype} on {tensor.device}; all weights must share one floating dtype "
                    f"and device ({W_enc.dtype} on {W_enc.device})"
                )
        sae = cls(
            d_in,
            num_latents,
            k,
            kernel_size=kernel_size,
            hook=hook,
            model_family=model_family,
            provenance=provenance,
            dtype=W_enc.dtype,
            device="meta",
        )
        sae.load_state_dict(given, assign=True)
        return sae

    def copy_to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> SparseAutoencoder:
        """A new SAE with copies of the weights on ``device``/``dtype`` (None: this SAE's own).

        The copy has the same sizes, ``hook``, ``model_family``, a copy of ``provenance`` and the same
        :meth:`fingerprint`: it is the same dictionary, so a copy in a lower precision keeps the source's
        fingerprint (computed once here if it was not known) and its feature sets still match it. The
        weights are always copied, also when they already are on that device and dtype, so a caller may
        change the copy (train it, edit ``provenance``) without touching the source, which is never changed.
        Callers that only read and want to skip the copy check ``sae.device``/``sae.dtype`` first.
        The copy is made in the caller's autograd mode: under ``torch.inference_mode()`` its weights are
        inference tensors (call it inside ``torch.inference_mode(False)`` for a copy autograd can train).
        """
        dtype = self.dtype if dtype is None else dtype
        if not dtype.is_floating_point:
            raise ValueError(f"SparseAutoencoder.copy_to: dtype must be a floating dtype, got {dtype}")
        device = self.device if device is None else torch.device(device)
        known = self.known_fingerprint()
        if known is None and dtype != self.dtype:
            known = self.fingerprint()  # of the source's values, before rounding
        weights = (getattr(self, name).detach().to(device=device, dtype=dtype, copy=True) for name in WEIGHTS)
        copy = SparseAutoencoder.from_weights(
            *weights, self.k, hook=self.hook, model_family=self.model_family, provenance=dict(self.provenance)
        )
        copy.set_known_fingerprint(known)
        return copy

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the parameters (the SAE computes in it)."""
        return self.W_dec.dtype

    @property
    def device(self) -> torch.device:
        """device of the parameters."""
        return self.W_dec.device

    # ------------------------------------------------------------------ shapes
    @property
    def n_in(self) -> int:
        """Length of one SAE input vector: ``d_in * kernel_size**2``."""
        return self.d_in * self.kernel_size**2

    @property
    def w_enc_flat(self) -> Tensor:
        """(num_latents, n_in) view of the encoder weight."""
        return self.W_enc.reshape(self.num_latents, self.n_in)

    @property
    def w_dec_flat(self) -> Tensor:
        """(num_latents, n_in) view of the decoder weight (row j is latent j's direction)."""
        return self.W_dec.reshape(self.num_latents, self.n_in)

    @property
    def b_dec_flat(self) -> Tensor:
        """(n_in,) decoder bias broadcast over the kernel positions, in (C, K, K) order."""
        if self.kernel_size == 1:
            return self.b_dec
        return self.b_dec.repeat_interleave(self.kernel_size**2)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Unit-norm random decoder rows, encoder tied to the decoder, zero biases.

        ``generator`` (a CPU ``torch.Generator``) makes the draw reproducible without the global RNG.
        Parameters on the meta device are left alone.
        """
        if self.W_dec.is_meta:
            return
        with torch.no_grad():
            w = torch.randn(self.num_latents, self.n_in, dtype=torch.float32, generator=generator)
            w /= w.norm(dim=1, keepdim=True)
            self.W_dec.copy_(w.reshape(self.W_dec.shape))
            self.W_enc.copy_(w.reshape(self.W_enc.shape))
            self.b_enc.zero_()
            self.b_dec.zero_()

    def check_width(self, width: int, where: str = "activation") -> None:
        """Raise ValueError if ``width`` (the channel dim of an activation) is not ``d_in``."""
        if width != self.d_in:
            raise ValueError(
                f"SAE for hook {self.hook!r} expects width {self.d_in}, but the {where} has width {width}; "
                "use an SAE trained on this model's hook point"
            )

    def map_to_inputs(self, h: Tensor) -> Tensor:
        """Spatial map to SAE inputs (:func:`~..base.layout.map_to_inputs`, with the width checked).

        h: (B, d_in, H, W) -> (B, H*W, d_in) for kernel 1, (B, 1, d_in*K*K) for kernel K (needs H == W == K).
        """
        if h.ndim != 4:
            raise ValueError(f"expected a (B, C, H, W) map, got shape {tuple(h.shape)}")
        self.check_width(h.shape[1])
        return layout.map_to_inputs(h, self.kernel_size)

    def inputs_to_map(self, x: Tensor, height: int, width: int) -> Tensor:
        """Inverse of :meth:`map_to_inputs`. x: (B, P, n_in) -> (B, d_in, height, width)."""
        return layout.inputs_to_map(x, height, width, self.kernel_size)

    # ------------------------------------------------------------------ math
    def pre_activations(self, x: Tensor) -> Tensor:
        """Dense ReLU pre-activations. x: (..., n_in) -> (..., num_latents)."""
        if x.shape[-1] != self.n_in:
            raise ValueError(
                f"SAE for hook {self.hook!r} expects inputs of width {self.n_in} (d_in {self.d_in}, kernel "
                f"{self.kernel_size}), but got width {x.shape[-1]}; use an SAE trained on this model's hook point"
            )
        x = x.to(self.W_enc.dtype)
        return F.relu(F.linear(x - self.b_dec_flat, self.w_enc_flat, self.b_enc))

    def select(self, pre: Tensor) -> SparseCode:
        """The TopK of dense pre-activations: (..., num_latents) -> SparseCode (..., k), values descending."""
        values, indices = pre.topk(self.k, dim=-1, sorted=True)
        return SparseCode(values, indices)

    def encode(self, x: Tensor) -> SparseCode:
        """x: (..., n_in) -> SparseCode with values/indices (..., k). Computes in the SAE's dtype.

        The one encode: training (:mod:`~..dissect.train_step`), attribution and the intervention all code
        with :meth:`pre_activations` and :meth:`select`.
        """
        return self.select(self.pre_activations(x))

    def decode_sparse(self, indices: Tensor, values: Tensor) -> Tensor:
        """Sum of ``values``-weighted decoder rows, without the bias.

        indices: (..., n) int64, values: (..., n) -> (..., n_in). Never builds a dense
        (tokens, num_latents) tensor: the rows are gathered and summed by ``embedding_bag``.
        """
        if indices.shape != values.shape:
            raise ValueError(
                f"indices {tuple(indices.shape)} and values {tuple(values.shape)} must have one shape"
            )
        lead = indices.shape[:-1]
        n = indices.shape[-1]
        if indices.numel() == 0:
            return self.W_dec.new_zeros(*lead, self.n_in)
        flat_idx = indices.reshape(-1, n)  # (tokens, n)
        flat_val = values.reshape(-1, n).to(self.W_dec.dtype)  # (tokens, n)
        out = F.embedding_bag(
            flat_idx, self.w_dec_flat, per_sample_weights=flat_val, mode="sum"
        )  # (tokens, n_in)
        return out.reshape(*lead, self.n_in)

    def decode(self, code: SparseCode) -> Tensor:
        """SparseCode (..., k) -> reconstruction (..., n_in)."""
        return self.decode_sparse(code.indices, code.values) + self.b_dec_flat

    def decode_dense(self, z: Tensor) -> Tensor:
        """Dense latents z: (..., num_latents) -> (..., n_in). For gradients w.r.t. every latent."""
        return z.to(self.W_dec.dtype) @ self.w_dec_flat + self.b_dec_flat

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction of x: (..., n_in) -> (..., n_in)."""
        return self.decode(self.encode(x))

    # ------------------------------------------------------------------ identity
    def fingerprint(self) -> str:
        """16 hex digits of the SHA-256 of the decoder weight (float32, C order).

        Identifies the dictionary that feature ids refer to: a FeatureSet made for one SAE
        records it, and is refused by an SAE with another fingerprint. Hashed in row chunks (no copy
        of the whole decoder) and remembered until ``W_dec`` is replaced or changed in place (writes
        through ``W_dec.data`` bypass the version counter: call :meth:`set_known_fingerprint` with None).
        """
        known = self.known_fingerprint()
        if known is not None:
            return known
        key = self._fingerprint_key()
        digest = hashlib.sha256()
        digest.update(f"{tuple(self.W_dec.shape)}".encode())
        rows = self.W_dec.detach().reshape(self.W_dec.shape[0], -1)  # (L, n_in), C order
        chunk = max(1, (4 << 20) // max(1, rows.shape[1]))  # about 16 MB of float32 at a time
        for start in range(0, rows.shape[0], chunk):
            digest.update(
                rows[start : start + chunk].to(device="cpu", dtype=torch.float32).contiguous().numpy()
            )
        value = digest.hexdigest()[:16]
        self._fingerprint = (key, value)
        return value

    def known_fingerprint(self) -> str | None:
        """The remembered :meth:`fingerprint` if it still names the current ``W_dec``, else None (no hashing)."""
        if self._fingerprint is not None and self._fingerprint[0] == self._fingerprint_key():
            return self._fingerprint[1]
        return None

    def set_known_fingerprint(self, value: str | None) -> None:
        """Remember ``value`` as :meth:`fingerprint` of the current ``W_dec`` (a loader that verified it from
        the file's digests); None forgets it."""
        self._fingerprint = None if value is None else (self._fingerprint_key(), value)

    def _fingerprint_key(self) -> tuple:
        w = self.W_dec
        # inference tensors (ComfyUI's loads) keep no version
        version = -1 if w.is_inference() else w._version
        return (w.data_ptr(), version, tuple(w.shape), w.dtype, w.device)

    def extra_repr(self) -> str:
        kernel = f", kernel_size={self.kernel_size}" if self.kernel_size > 1 else ""
        return f"d_in={self.d_in}, num_latents={self.num_latents}, k={self.k}{kernel}, hook={self.hook!r}"


def expansion_factor(sae: SparseAutoencoder) -> float:
    """num_latents / n_in, the usual way SAE sizes are quoted."""
    return sae.num_latents / sae.n_in


def fvu(x: Tensor, x_hat: Tensor) -> Tensor:
    """Fraction of variance unexplained: sum |x - x_hat|^2 / sum |x - mean(x)|^2 over (N, n_in) rows."""
    x = x.reshape(-1, x.shape[-1]).float()
    x_hat = x_hat.reshape(-1, x_hat.shape[-1]).float()
    total = (x - x.mean(0)).pow(2).sum()
    return (x - x_hat).pow(2).sum() / total.clamp_min(torch.finfo(torch.float32).tiny)


__all__ = ["WEIGHTS", "SparseAutoencoder", "SparseCode", "expansion_factor", "fvu"]
