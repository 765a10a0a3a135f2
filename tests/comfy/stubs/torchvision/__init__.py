"""Test-only stand-in for torchvision: ComfyUI imports it at module level; SD1.x/SDXL/Flux sampling never calls it."""
