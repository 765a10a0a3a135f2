"""Attribute: per-step linear probes on SAE codes and integrated gradients that rank the features of each class;
the ranked feature set and its file format."""
