"""The embedded default: a tiny biased diffusion model on a synthetic world of coloured shapes.

world (scenes, rendering, prompt vocabulary), oracles (exact colour/shape/mask readers), model (the
UNet with its ``unet.middle`` bottleneck), diffusion (schedule, DDIM), train (``python -m
diffbias_core.toy train``), demo (``python -m diffbias_core demo``).
"""
