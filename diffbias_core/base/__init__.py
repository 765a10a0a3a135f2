"""What the stages stand on: the map/token/row layouts, safetensors files (the one header reader, checked and
atomic I/O), memory estimates, progress and cancellation, leaving inference mode, and plain-torch forward hooks."""
