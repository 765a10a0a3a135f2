"""What the stages stand on: atomic file writes, safetensors header reading, memory estimates, progress and
cancellation, and plain-torch forward hooks."""
