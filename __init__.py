"""diffbias: ComfyUI entry point. The nodes live in ``nodes/``; the math in ``diffbias_core/``.

ComfyUI imports this file as a package. Outside ComfyUI (pytest, plain Python) the import of
ComfyUI's API fails and this module exports nothing, so the core stays usable on its own.
"""

try:
    from .nodes import comfy_entrypoint  # noqa: F401
except ImportError as error:  # ComfyUI is not importable here: the core library still works.
    if "comfy" not in str(error):
        raise
