"""Importers for SAE folders in the layouts other projects publish.

* EleutherAI sparsify: ``cfg.json`` + ``sae.safetensors`` {encoder.weight (L, d_in), encoder.bias (L,),
  W_dec (L, d_in), b_dec (d_in,)}; encodes ``x - b_dec``. TopK only; transcoders and skip connections refused.
* SAELens: ``cfg.json`` + ``sae_weights.safetensors`` {W_enc (d_in, L), b_enc, W_dec (L, d_in), b_dec}; the
  TopK architecture only (``architecture: topk`` with ``k``, or older ``activation_fn(_str): topk`` with
  ``activation_fn_kwargs.k``). ``apply_b_dec_to_input: false``, ``rescale_acts_by_decoder_norm: true`` and
  a ``scaling_factor`` tensor are folded into the weights, which leaves every code and output unchanged.
* DiffLens: ``cfg.json`` + ``sae.safetensors`` {encoder.weight (L, C, K, K) Conv2d, encoder.bias (L,),
  decoder.weight (C, L, 1, 1) Conv2d when K = 1 or (L, C, K, K) ConvTranspose2d when K > 1,
  decoder.bias (C,)}; the kernel size is read from the shapes. DiffLens trains its SAEs without subtracting
  the decoder bias from the input, so the import folds ``W_enc b_dec`` into ``b_enc``.

Each importer maps a layout to the canonical tensors of ``SparseAutoencoder``; with ``load=False`` the same
code runs on data-less meta tensors built from the file header, which gives cheap metadata listings.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor

from ..base.safefile import expect_shapes, meta_tensors, read_safetensors
from ..base.tensorfile import PICKLE_SUFFIXES, FormatError, read_header, refuse_pickle
from .model import SparseAutoencoder
from .native import SAE_FORMAT, build_sae

WEIGHT_FILES = {"sae.safetensors": ("sparsify", "difflens"), "sae_weights.safetensors": ("saelens",)}
"""Weight file name of each published layout (next to its ``cfg.json``)."""


def layout_folder(path: Path) -> Path | None:
    """The layout folder that ``path`` (a folder, or a layout's weight file) stands for; None for other files."""
    if path.is_dir():
        return path
    if path.name in WEIGHT_FILES and (path.parent / "cfg.json").is_file():
        if read_header(path).metadata.get("format") != SAE_FORMAT:
            return path.parent
    return None


def import_folder(folder: Path, *, load: bool) -> SparseAutoencoder:
    """Read an SAE folder in a published layout; with ``load=False`` the SAE is on the meta device (no data)."""
    weights = [folder / name for name in WEIGHT_FILES if (folder / name).is_file()]
    if not (folder / "cfg.json").is_file() or not weights:
        raise FormatError(_describe_unknown(folder))
    if len(weights) > 1:
        raise FormatError(
            f"{folder}: holds both {' and '.join(p.name for p in weights)} beside one cfg.json, so it is not clear "
            "which SAE (sparsify/DiffLens or SAELens) the folder is; keep each SAE in its own folder"
        )
    cfg_path, weight_path = folder / "cfg.json", weights[0]
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    # ValueError: UnicodeDecodeError, JSONDecodeError, a too long integer
    except (OSError, ValueError) as error:
        raise FormatError(f"{cfg_path}: not readable as JSON ({error})") from None
    except RecursionError:
        raise FormatError(f"{cfg_path}: JSON nested too deeply to be an SAE config") from None
    if not isinstance(cfg, dict):
        raise FormatError(f"{cfg_path}: expected a JSON object, found {type(cfg).__name__}")
    header = read_header(weight_path).entries
    layout = _detect(weight_path, header)
    tensors = read_safetensors(weight_path)[0] if load else meta_tensors(header)
    canonical, k, provenance = _IMPORTERS[layout](weight_path, cfg, tensors)
    hook = "unet.middle" if layout == "difflens" else "unknown"
    provenance = {"imported_from": layout, "source_folder": folder.name, **provenance}
    return build_sae(weight_path, canonical, k, hook, "unknown", provenance)


def _describe_unknown(folder: Path) -> str:
    found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    pickles = [name for name in found if Path(name).suffix.lower() in PICKLE_SUFFIXES]
    if pickles:
        refuse_pickle(folder / pickles[0])
    nested = (
        [p.name for p in sorted(folder.iterdir()) if (p / "cfg.json").is_file()] if folder.is_dir() else []
    )
    if nested:
        return f"{folder}: this folder holds several SAEs ({', '.join(nested)}); give one of those folders"
    return (
        f"{folder}: unknown layout: expected cfg.json with sae.safetensors (sparsify, DiffLens) or "
        f"sae_weights.safetensors (SAELens), found {found or 'nothing'}"
    )


def _detect(path: Path, header: dict[str, Any]) -> str:
    names = set(header)
    if path.name == "sae_weights.safetensors":
        return "saelens"
    if {"encoder.weight", "decoder.weight"} <= names:
        return "difflens"
    if {"encoder.weight", "W_dec"} <= names:
        return "sparsify"
    raise FormatError(
        f"{path}: unknown layout: expected tensors encoder.weight + W_dec (sparsify) or encoder.weight + "
        f"decoder.weight (DiffLens), found {sorted(names)}"
    )


def _cfg_int(path: Path, cfg: dict[str, Any], key: str, default: int | None = None) -> int:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise FormatError(
            f"{path.parent / 'cfg.json'}: {key!r} must be a non-negative integer, found {value!r}"
        )
    return value


def _sizes(path: Path, cfg: dict[str, Any], tensor: Tensor) -> tuple[int, int]:
    """(num_latents, d_in) from the encoder weight, checked against cfg.json (num_latents 0: d_in * expansion)."""
    num_latents, d_in = tensor.shape[:2]
    cfg_d_in = _cfg_int(path, cfg, "d_in", d_in)
    cfg_latents = _cfg_int(path, cfg, "num_latents", 0) or cfg_d_in * _cfg_int(
        path, cfg, "expansion_factor", 0
    )
    if (cfg_d_in, cfg_latents or num_latents) != (d_in, num_latents):
        raise FormatError(
            f"{path}: cfg.json says d_in {cfg_d_in} and {cfg_latents} latents, but the encoder weight has shape "
            f"{tuple(tensor.shape)} (expected ({cfg_latents}, {cfg_d_in}, ...))"
        )
    return num_latents, d_in


Imported = tuple[dict[str, Tensor], int, dict[str, str]]


def _sparsify(path: Path, cfg: dict[str, Any], t: dict[str, Tensor]) -> Imported:
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise FormatError(f"{path}: sparsify activation {activation!r} is not supported; expected 'topk'")
    if cfg.get("transcode") or cfg.get("skip_connection") or "W_skip" in t:
        raise FormatError(
            f"{path}: this is a sparsify transcoder or has a skip connection; only autoencoders of one "
            "activation can be edited"
        )
    latents, d_in = _sizes(path, cfg, t["encoder.weight"])
    expect_shapes(path, t, {"encoder.weight": (latents, d_in), "encoder.bias": (latents,), "W_dec": (latents, d_in),
                            "b_dec": (d_in,)})  # fmt: skip
    canonical = {
        "W_enc": t["encoder.weight"],
        "b_enc": t["encoder.bias"],
        "W_dec": t["W_dec"],
        "b_dec": t["b_dec"],
    }
    return canonical, _cfg_int(path, cfg, "k"), {"source_hook": path.parent.name}


def _saelens(path: Path, cfg: dict[str, Any], t: dict[str, Tensor]) -> Imported:
    architecture = cfg.get("architecture", "standard")
    activation = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))
    if architecture != "topk" and not (architecture == "standard" and activation == "topk"):
        raise FormatError(
            f"{path}: SAELens architecture {architecture!r} (activation {activation!r}) is not a TopK SAE; "
            "diffbias edits TopK codes only (expected architecture 'topk', or activation_fn 'topk')"
        )
    kwargs = cfg.get("activation_fn_kwargs") or {}
    k = _cfg_int(path, {"k": cfg.get("k", kwargs.get("k") if isinstance(kwargs, dict) else None)}, "k")
    if cfg.get("normalize_activations", "none") not in ("none", None, False):
        raise FormatError(
            f"{path}: normalize_activations {cfg['normalize_activations']!r} rescales inputs at run time; only "
            "'none' can be imported"
        )
    found = tuple(t["W_enc"].shape) if "W_enc" in t else (0, 0)
    d_in = _cfg_int(path, cfg, "d_in", found[0])
    latents = _cfg_int(path, cfg, "d_sae", found[-1])
    shapes = {"W_enc": (d_in, latents), "b_enc": (latents,), "W_dec": (latents, d_in), "b_dec": (d_in,)}
    scaling = t.pop("scaling_factor", None)
    expect_shapes(path, t, shapes)
    w_enc, b_enc, w_dec, b_dec = (t[name].float() for name in ("W_enc", "b_enc", "W_dec", "b_dec"))
    if not cfg.get("apply_b_dec_to_input", True):
        b_enc = b_enc + b_dec @ w_enc  # (L,): the encoder sees x, not x - b_dec
    if cfg.get("rescale_acts_by_decoder_norm", False):
        norm = w_dec.norm(
            dim=-1
        )  # (L,): codes are pre-activations times the decoder norm, decoded divided by it
        w_enc, b_enc, w_dec = w_enc * norm, b_enc * norm, w_dec / norm[:, None]
    if scaling is not None:
        expect_shapes(path, {"scaling_factor": scaling}, {"scaling_factor": (latents,)})
        w_dec = w_dec * scaling.float()[:, None]  # (L, d_in): decode scales acts by scaling_factor
    dtype = t["W_dec"].dtype
    canonical = {"W_enc": w_enc.T, "b_enc": b_enc, "W_dec": w_dec, "b_dec": b_dec}  # W_enc.T: (L, d_in)
    canonical = {name: tensor.to(dtype).contiguous() for name, tensor in canonical.items()}
    facts = {**cfg, **(cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {})}
    provenance = {
        f"source_{key}": str(facts[key]) for key in ("hook_name", "model_name") if facts.get(key) is not None
    }
    return canonical, k, provenance


def _difflens(path: Path, cfg: dict[str, Any], t: dict[str, Tensor]) -> Imported:
    encoder = t["encoder.weight"]
    if encoder.ndim != 4 or encoder.shape[2] != encoder.shape[3]:
        raise FormatError(f"{path}: encoder.weight must be (L, C, K, K), found shape {tuple(encoder.shape)}")
    latents, d_in = _sizes(path, cfg, encoder)
    kernel = encoder.shape[-1]
    decoder_shape = (d_in, latents, 1, 1) if kernel == 1 else (latents, d_in, kernel, kernel)
    expect_shapes(path, t, {"encoder.weight": (latents, d_in, kernel, kernel), "encoder.bias": (latents,),
                            "decoder.weight": decoder_shape, "decoder.bias": (d_in,)})  # fmt: skip
    if kernel == 1:
        w_enc = encoder[:, :, 0, 0]  # (L, C)
        w_dec = t["decoder.weight"][:, :, 0, 0].T  # (C, L) -> (L, C)
    else:
        w_enc, w_dec = encoder, t["decoder.weight"]  # (L, C, K, K) each
    b_dec = t["decoder.bias"]
    b_dec_flat = b_dec.float().repeat_interleave(kernel * kernel)  # (C*K*K,) in (c h w) order
    b_enc = t["encoder.bias"].float() + w_enc.reshape(latents, -1).float() @ b_dec_flat  # (L,)
    canonical = {"W_enc": w_enc, "b_enc": b_enc.to(encoder.dtype), "W_dec": w_dec, "b_dec": b_dec}
    return {name: tensor.contiguous() for name, tensor in canonical.items()}, _cfg_int(path, cfg, "k"), {}


_IMPORTERS: dict[str, Callable[[Path, dict[str, Any], dict[str, Tensor]], Imported]] = {
    "sparsify": _sparsify,
    "saelens": _saelens,
    "difflens": _difflens,
}

__all__ = ["WEIGHT_FILES", "import_folder", "layout_folder"]
