"""Leaving ComfyUI's inference mode where the core must make tensors that autograd can use.

ComfyUI runs every prompt under ``torch.inference_mode()``; tensors made there can never be trained or
differentiated. The core's fitting code (the SAE trainer, the probes, integrated gradients, the image
classifier) works inside a ComfyUI node by making its tensors inside :func:`trainable`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def trainable() -> Iterator[None]:
    """Leave ``torch.inference_mode()`` and ``torch.no_grad()``: tensors made inside can enter autograd.

    Inference tensors made outside (a ComfyUI node's inputs) can still be read inside; clone them first to
    differentiate with respect to them.
    """
    with torch.inference_mode(False), torch.enable_grad():
        yield


__all__ = ["trainable"]
