"""The sparse autoencoder itself: the TopK model (one encode, one copy), its native file format, and importers for
sparsify, SAELens and DiffLens folders."""
