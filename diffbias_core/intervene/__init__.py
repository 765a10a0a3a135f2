"""Intervene: edit the listed features of each image's SAE code while sampling (add, scale, set, ablate) and write
the edited activations back."""
