"""diffbias: ComfyUI entry point. The nodes live in ``nodes/``; the math in ``diffbias_core/``.

ComfyUI imports this file as a package and calls ``comfy_entrypoint``. Outside ComfyUI (pytest, plain
Python) ComfyUI's modules are missing, this module exports nothing, and the core stays usable on its own.
"""

_COMFYUI_MODULES = {"comfy", "comfy_api", "comfy_execution", "folder_paths", "server", "latent_preview"}

try:
    from .nodes import comfy_entrypoint  # noqa: F401
except ModuleNotFoundError as error:  # not inside ComfyUI: the core library still works
    if (error.name or "").split(".")[0] not in _COMFYUI_MODULES:
        raise
