"""The sparse autoencoder itself: the TopK model, its native file format, and importers for sparsify and SAELens files."""
