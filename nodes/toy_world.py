"""The embedded toy world as ComfyUI's own MODEL, CLIP and VAE, so that the stock nodes run it unchanged.

* MODEL: a ``ModelPatcher`` around a ``comfy.model_base.BaseModel`` (v-prediction) whose
  ``model_sampling`` is the toy's cosine schedule in ComfyUI's sigma form (``ToyModelSampling``): the
  ``simple`` scheduler with N steps gives the toy DDIM grid t = 1, 1 - 1/N, ..., 1/N, and the
  ``euler``/``ddim`` samplers then take exactly the toy's DDIM steps (the clean estimate clipped to the
  RGB cube, as the toy sampler does). The network is wrapped as ``ToyDiffusionModel``, which offers
  the seams of ComfyUI's UNet: ``transformer_options["block"]`` set per block and the
  ``input_block_patch``, ``input_block_patch_after_skip`` and ``output_block_patch`` patches called
  where ComfyUI's UNet calls them, and ``input_blocks``/``middle_block``/``output_blocks`` for the
  hook-point lookup. So every UNet patch (this plugin's at ``unet.middle`` among them) acts on it.
* CLIP: a ``comfy.sd.CLIP`` whose tokenizer reads the toy's prompt words ("a red circle") and whose
  encoder is the toy's prompt embedding: conditioning (1, 2, 32).
* VAE: a ``comfy.sd.VAE`` mapping the toy's model space (brightness, scaled chroma) to RGB pictures,
  8 pixels per world pixel (a 128 x 128 Empty Latent Image is the toy's 16 x 16), and back.
"""

from __future__ import annotations

import copy

import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.model_sampling
import comfy.sd
import comfy.supported_models_base
import torch
from torch import Tensor

from ..diffbias_core.toy.diffusion import SIGMA_MAX, edm_sigma, edm_time, to_model_space, to_rgb
from ..diffbias_core.toy.display import (
    DISPLAY_SCALE,
    latent_rgb_factors,
    latent_to_picture,
    picture_to_latent,
)
from ..diffbias_core.toy.model import BlockSeams, ToyUNet, count_parameters, embed_tokens
from ..diffbias_core.toy.world import PROMPT_LENGTH, VOCAB, parse_prompt

SCHEDULE_POINTS = 1000
"""Noise levels in ``ToyModelSampling.sigmas``: t = 1/1000, 2/1000, ..., 1 (for the table-based schedulers)."""
TOKENS_KEY = "toy"
"""Key of the toy's token list in the tokenizer's output (SD1.x uses "l")."""


class Toy(comfy.supported_models_base.BASE):
    """Model config of the toy world (``model_info`` reads the family ``toy`` from this class's name)."""

    unet_config = {"disable_unet_model_creation": True}
    unet_extra_config = {}
    latent_format = comfy.latent_formats.LatentFormat
    memory_usage_factor = 1.0
    supported_inference_dtypes = [torch.float32]


class ToyLatentFormat(comfy.latent_formats.LatentFormat):
    """The toy's latent: its 3-channel model-space image, unscaled; previews map it to RGB exactly."""

    latent_channels = 3

    def __init__(self, chroma_scale: float) -> None:
        self.latent_rgb_factors = latent_rgb_factors(chroma_scale)


class ToyModelSampling(torch.nn.Module, comfy.model_sampling.V_PREDICTION):
    """The toy's cosine schedule in ComfyUI's sigma form (x = x0 + sigma noise), v-prediction.

    ``timestep(sigma)`` is the toy's time t in [0, 1] that its network takes; ``sigmas`` tabulates
    t = 1/1000 ... 1 for the table-based schedulers (``simple``, ``ddim_uniform``, ``beta``).
    """

    def __init__(self, chroma_scale: float) -> None:
        super().__init__()
        self.sigma_data = 1.0
        self.chroma_scale = chroma_scale
        t = torch.arange(1, SCHEDULE_POINTS + 1, dtype=torch.float64) / SCHEDULE_POINTS
        sigmas = edm_sigma(t).float()  # (1000,) ascending; the last is SIGMA_MAX (t = 1)
        self.register_buffer("sigmas", sigmas)
        self.register_buffer("log_sigmas", sigmas.log())

    @property
    def sigma_min(self) -> Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> Tensor:
        return self.sigmas[-1]

    def timestep(self, sigma: Tensor) -> Tensor:
        return edm_time(sigma)

    def sigma(self, timestep: Tensor) -> Tensor:
        return edm_sigma(timestep)

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        return float(edm_sigma(torch.tensor(1.0 - percent, dtype=torch.float64)))

    def calculate_denoised(self, sigma: Tensor, model_output: Tensor, model_input: Tensor) -> Tensor:
        """The v-prediction clean estimate, clipped to the RGB cube [-1, 1] as the toy's DDIM does."""
        denoised = super().calculate_denoised(sigma, model_output, model_input)
        return to_model_space(to_rgb(denoised, self.chroma_scale).clamp(-1, 1), self.chroma_scale)


class _ComfySeams(BlockSeams):
    """Calls the UNet patches in ``transformer_options`` where ComfyUI's own UNet calls them."""

    def __init__(self, transformer_options: dict) -> None:
        self.options = transformer_options
        self.patches = transformer_options.get("patches", {})

    def enter(self, stage: str, index: int) -> None:
        self.options["block"] = (stage, index)

    def after_input(self, index: int, h: Tensor) -> tuple[Tensor, Tensor]:
        for patch in self.patches.get("input_block_patch", ()):
            h = patch(h, self.options)
        skip = h
        for patch in self.patches.get("input_block_patch_after_skip", ()):
            h = patch(h, self.options)
        return skip, h

    def before_output(self, index: int, h: Tensor, skip: Tensor) -> tuple[Tensor, Tensor]:
        for patch in self.patches.get("output_block_patch", ()):
            h, skip = patch(h, skip, self.options)
        return h, skip


class ToyDiffusionModel(torch.nn.Module):
    """The toy UNet behind ComfyUI's diffusion-model call ``(x, t, context=, transformer_options=)``."""

    def __init__(self, unet: ToyUNet) -> None:
        super().__init__()
        self.unet = unet

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.conv_in.weight.dtype

    @property
    def input_blocks(self) -> torch.nn.ModuleList:
        """The three input blocks (for hook-point lookup: ``unet.input.N``)."""
        return torch.nn.ModuleList(torch.nn.ModuleList(block) for block in self.unet.input_blocks)

    @property
    def middle_block(self) -> torch.nn.Module:
        """The bottleneck (``unet.middle``)."""
        return self.unet.middle

    @property
    def output_blocks(self) -> torch.nn.ModuleList:
        """The three output blocks (``unet.output.N``)."""
        return torch.nn.ModuleList(torch.nn.ModuleList(block) for block in self.unet.output_blocks)

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor | None = None, control=None,
                transformer_options: dict | None = None, **kwargs) -> Tensor:  # fmt: skip
        """x: (B, 3, S, S) scaled model input, timesteps: (B,) toy time, context: (B, 2, 32) -> v."""
        if context is None:
            raise ValueError(
                "the toy model needs a prompt: connect a CLIP Text Encode of the toy world's CLIP"
            )
        options = transformer_options if transformer_options is not None else {}
        options["original_shape"] = list(x.shape)
        return self.unet.denoise(x, timesteps.to(x.dtype), context.to(x.dtype), _ComfySeams(options))


class ToyWorldModel(comfy.model_base.BaseModel):
    """ComfyUI's BaseModel (v-prediction) around the toy UNet, with the toy's schedule and latent."""

    def __init__(self, unet: ToyUNet, device=None) -> None:
        super().__init__(Toy(Toy.unet_config), comfy.model_base.ModelType.V_PREDICTION, device=device)
        chroma = unet.config.chroma_scale
        self.diffusion_model = ToyDiffusionModel(unet)
        self.model_sampling = ToyModelSampling(chroma)
        self.latent_format = ToyLatentFormat(chroma)
        self.model_config.latent_format = self.latent_format


# ------------------------------------------------------------------------------------------- CLIP
class ToyTokenizer:
    """Reads a toy prompt ("a circle", "a red square"): at most one colour word and one shape word.

    An empty prompt (e.g. an unused negative) gives no tokens; it encodes to zeros.
    """

    def __init__(self, embedding_directory=None, tokenizer_data=None) -> None:
        self.vocabulary = VOCAB

    def tokenize_with_weights(self, text: str, return_word_ids: bool = False, **kwargs) -> dict:
        if not text.strip():
            return {TOKENS_KEY: [[]]}
        try:
            ids = parse_prompt(text).tolist()
        except ValueError as error:
            raise ValueError(f"the toy world's CLIP reads words of {VOCAB[1:]}: {error}") from None
        pairs = [(i, 1.0, n) if return_word_ids else (i, 1.0) for n, i in enumerate(ids)]
        return {TOKENS_KEY: [pairs]}

    def untokenize(self, token_weight_pair: dict) -> list:
        return [(pair, VOCAB[pair[0]]) for pair in token_weight_pair[TOKENS_KEY][0]]

    def state_dict(self) -> dict:
        return {}


class ToyTextEncoder(torch.nn.Module):
    """The toy's prompt embedding (token + position) as ComfyUI's text-encoder model."""

    def __init__(self, text_dim: int = 32, dtype=None, device=None, model_options=None) -> None:
        super().__init__()
        self.token_embedding = torch.nn.Embedding(len(VOCAB), text_dim)
        self.position_embedding = torch.nn.Parameter(torch.zeros(PROMPT_LENGTH, text_dim))
        self.dtypes = {torch.float32}

    def reset_clip_options(self) -> None:
        """Nothing to reset: the toy encoder has no layer options."""

    def set_clip_options(self, options: dict) -> None:
        """Clip-skip and pooled-output options do not apply to the toy encoder."""

    def encode_token_weights(self, token_weight_pairs: dict) -> tuple[Tensor, Tensor]:
        """-> (cond (1, PROMPT_LENGTH, text_dim), pooled (1, text_dim)); an empty prompt gives zeros."""
        pairs = token_weight_pairs[TOKENS_KEY][0]
        device = self.position_embedding.device
        if not pairs:
            cond = torch.zeros(1, PROMPT_LENGTH, self.position_embedding.shape[1], device=device)
        else:
            ids = torch.tensor([[pair[0] for pair in pairs]], device=device)  # (1, T)
            cond = embed_tokens(self.token_embedding, self.position_embedding, ids)
        return cond.float(), cond.mean(1).float()

    def load_sd(self, sd: dict):
        return self.load_state_dict(sd, strict=False)


def _clip(unet: ToyUNet) -> comfy.sd.CLIP:
    target = comfy.supported_models_base.ClipTarget(ToyTokenizer, ToyTextEncoder)
    target.params = {"text_dim": unet.config.text_dim}
    clip = comfy.sd.CLIP(target=target, parameters=unet.token_embedding.weight.numel())
    clip.cond_stage_model.load_state_dict(
        {
            "token_embedding.weight": unet.token_embedding.weight.detach().clone(),
            "position_embedding": unet.position_embedding.detach().clone(),
        }
    )
    clip.cond_stage_model.requires_grad_(False)
    return clip


# -------------------------------------------------------------------------------------------- VAE
class ToyVAE(comfy.sd.VAE):
    """Model space <-> RGB pictures (nearest, ``DISPLAY_SCALE`` pixels per world pixel). No weights."""

    def __init__(self, chroma_scale: float) -> None:  # no super().__init__: there is no network to load
        self.chroma_scale = chroma_scale
        self.downscale_ratio = self.upscale_ratio = DISPLAY_SCALE
        self.latent_channels = 3
        self.latent_dim = 2
        self.output_channels = 3
        self.working_dtypes = [torch.float32]
        self.disable_offload = True
        self.not_video = True
        self.crop_input = False
        self.downscale_index_formula = self.upscale_index_formula = None
        self.extra_1d_channel = None
        self.device = self.output_device = torch.device("cpu")
        self.vae_dtype = torch.float32
        self.first_stage_model = torch.nn.Identity()
        self.patcher = comfy.model_patcher.ModelPatcher(self.first_stage_model, self.device, self.device)

    def decode(self, samples_in: Tensor, vae_options: dict | None = None) -> Tensor:
        """(B, 3, h, w) latent -> (B, 8h, 8w, 3) pictures in [0, 1]."""
        return latent_to_picture(samples_in.cpu(), self.chroma_scale)

    def decode_tiled(self, samples: Tensor, *args, **kwargs) -> Tensor:
        return self.decode(samples)

    def encode(self, pixel_samples: Tensor) -> Tensor:
        """(B, H, W, 3) pictures in [0, 1] -> (B, 3, H/8, W/8) latent."""
        return picture_to_latent(pixel_samples.cpu(), self.chroma_scale)

    def encode_tiled(self, pixel_samples: Tensor, *args, **kwargs) -> Tensor:
        return self.encode(pixel_samples)

    def get_sd(self) -> dict:
        return {}


def toy_world(unet: ToyUNet) -> tuple[comfy.model_patcher.ModelPatcher, comfy.sd.CLIP, ToyVAE]:
    """MODEL, CLIP and VAE of a toy UNet (the caller's UNet is copied, never changed)."""
    unet = copy.deepcopy(unet).eval().requires_grad_(False)
    load = comfy.model_management.get_torch_device()
    offload = comfy.model_management.unet_offload_device()
    model = ToyWorldModel(unet, device=offload)
    patcher = comfy.model_patcher.ModelPatcher(
        model, load_device=load, offload_device=offload, size=4 * count_parameters(unet)
    )
    return patcher, _clip(unet), ToyVAE(unet.config.chroma_scale)


__all__ = [
    "SIGMA_MAX",
    "Toy",
    "ToyDiffusionModel",
    "ToyModelSampling",
    "ToyTextEncoder",
    "ToyTokenizer",
    "ToyVAE",
    "ToyWorldModel",
    "toy_world",
]
