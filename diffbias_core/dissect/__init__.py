"""Dissect: capture a hidden layer's activations while sampling, store them in shards, and train the SAE on them
(config, step, trainer, loop; held-out checks, checkpoints and optional data-parallel training)."""
