"""Empty stand-in for torchvision.transforms (test-only)."""
