"""Plain-torch forward hooks on a named module: capture its outputs, or edit them.

For diffusers pipelines, the embedded toy model, or any ``nn.Module`` outside ComfyUI::

    with capture_outputs(unet, "mid_block") as cap:
        unet(x, t, text)
    h = cap.stacked()                      # (calls * B, C, H, W)

    with edit_outputs(unet, "mid_block", lambda h: h + delta):
        unet(x, t, text)

Modules that return tuples (many transformer blocks) are handled through ``output_index``: that element
is captured or replaced, the others pass through unchanged. Hooks are always removed on exit, also when
the forward pass raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


def get_module(model: nn.Module, name: str) -> nn.Module:
    """``model``'s sub-module called ``name`` ("" = the model itself); KeyError listing the names."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
        raise KeyError(
            f"{type(model).__name__} has no sub-module {name!r}; its modules are: {shown}"
        ) from None


def _select(output, index: int, module_name: str) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if (
        isinstance(output, (tuple, list))
        and -len(output) <= index < len(output)
        and isinstance(output[index], Tensor)
    ):
        return output[index]
    raise TypeError(
        f"module {module_name!r} returned {type(output).__name__}; expected a tensor or a tuple with a tensor "
        f"at output_index {index}"
    )


class Capture:
    """Outputs recorded by :func:`capture_outputs`: one tensor per forward call, in call order."""

    def __init__(self) -> None:
        self.outputs: list[Tensor] = []

    def stacked(self) -> Tensor:
        """All captured outputs concatenated along dim 0: (sum of batch sizes, ...)."""
        if not self.outputs:
            raise ValueError("nothing was captured: the hooked module never ran")
        return torch.cat(self.outputs)


@contextmanager
def capture_outputs(
    model: nn.Module,
    name: str = "",
    *,
    output_index: int = 0,
    callback: Callable[[Tensor], None] | None = None,
    device: torch.device | str | None = "cpu",
) -> Iterator[Capture]:
    """Record the output of ``model``'s module ``name`` at every forward call.

    Each output is detached and copied to ``device`` (None: left where it is, still copied). With
    ``callback`` the tensor is handed to it instead of being kept (streaming, bounded memory).
    """
    module = get_module(model, name)
    capture = Capture()

    def hook(_module: nn.Module, _inputs, output) -> None:
        tensor = _select(output, output_index, name).detach()
        tensor = tensor.to(device=device, copy=True) if device is not None else tensor.clone()
        if callback is not None:
            callback(tensor)
        else:
            capture.outputs.append(tensor)

    handle = module.register_forward_hook(hook)
    try:
        yield capture
    finally:
        handle.remove()


@contextmanager
def edit_outputs(
    model: nn.Module,
    name: str,
    fn: Callable[[Tensor], Tensor],
    *,
    output_index: int = 0,
) -> Iterator[None]:
    """Replace the output h of ``model``'s module ``name`` by ``fn(h)`` at every forward call.

    ``fn`` must return a tensor of h's shape (ValueError otherwise); tuple outputs keep their other
    elements.
    """
    module = get_module(model, name)

    def hook(_module: nn.Module, _inputs, output):
        h = _select(output, output_index, name)
        edited = fn(h)
        if not isinstance(edited, Tensor) or edited.shape != h.shape:
            found = tuple(edited.shape) if isinstance(edited, Tensor) else type(edited).__name__
            raise ValueError(
                f"edit of module {name!r} must return a tensor of shape {tuple(h.shape)}, got {found}"
            )
        if isinstance(output, Tensor):
            return edited
        items = list(output)
        items[output_index] = edited
        return type(output)(items) if isinstance(output, list) else tuple(items)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


__all__ = ["Capture", "capture_outputs", "edit_outputs", "get_module"]
