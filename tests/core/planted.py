"""Planted problems: activations built from a known dictionary, with class-specific atoms.

Used by the trainer tests (does the SAE recover the dictionary?) and the attribution tests (are the
planted class atoms ranked first?). Everything is drawn from a seeded ``torch.Generator``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from diffbias_core.dissect.activations import ActivationBatch, make_batch


def unit_dictionary(atoms: int, width: int, generator: torch.Generator) -> Tensor:
    """(atoms, width) random unit rows."""
    d = torch.randn(atoms, width, generator=generator)
    return d / d.norm(dim=1, keepdim=True)


def sparse_codes(rows: int, atoms: int, k: int, generator: torch.Generator, low: float = 0.5,
                 high: float = 2.5) -> Tensor:  # fmt: skip
    """(rows, atoms) codes with exactly k active atoms per row, values uniform in [low, high)."""
    idx = torch.rand(rows, atoms, generator=generator).argsort(1)[:, :k]  # (rows, k)
    vals = low + (high - low) * torch.rand(rows, k, generator=generator)
    return torch.zeros(rows, atoms).scatter(1, idx, vals)


def planted_rows(seed: int, width: int, atoms: int, k: int, rows: int, noise: float,
                 offset: float = 1.0) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Rows x = code @ dictionary + offset + noise: returns (x (rows, width), dictionary (atoms, width))."""
    g = torch.Generator().manual_seed(seed)
    dictionary = unit_dictionary(atoms, width, g)
    center = offset * torch.randn(width, generator=g)
    x = sparse_codes(rows, atoms, k, g) @ dictionary + center + noise * torch.randn(rows, width, generator=g)
    return x, dictionary


def best_cosine(dictionary: Tensor, learned: Tensor) -> Tensor:
    """For every true atom (A, n), the best cosine with any learned row (L, n): (A,)."""
    learned = learned / learned.norm(dim=1, keepdim=True)
    return (dictionary @ learned.T).max(1).values


class PlantedMaps(NamedTuple):
    """Paired class-labelled activation maps.

    dictionary: (atoms, width) unit rows; atoms 0 .. classes*per_class-1 are class atoms, class c owning
    ``class_atoms[c]``; the rest are shared background atoms. batch: activations (N, width, size, size);
    for every sample and step there is one map per class from the same background (the pairing).
    """

    dictionary: Tensor
    class_atoms: tuple[Tensor, ...]
    classes: tuple[str, ...]
    batch: ActivationBatch


def planted_maps(seed: int, *, width: int = 24, atoms: int = 20, classes: int = 2, per_class: int = 2,
                 background_k: int = 2, samples: int = 12, steps: int = 2, size: int = 2,
                 noise: float = 0.02, presence: float = 0.6) -> PlantedMaps:  # fmt: skip
    """Maps whose class is carried only by the class atoms (each present at about 60% of the positions by default,
    independently, so that every class atom is evidence of its own; ``presence`` sets that share)."""
    g = torch.Generator().manual_seed(seed)
    dictionary = unit_dictionary(atoms, width, g)
    n_class_atoms = classes * per_class
    background_atoms = atoms - n_class_atoms
    positions = size * size
    maps, step_ids, labels, sample_ids = [], [], [], []
    for sample in range(samples):
        for step in range(steps):
            background = torch.zeros(positions, atoms)  # shared by the classes: same "initial noise"
            background[:, n_class_atoms:] = sparse_codes(positions, background_atoms, background_k, g)
            for c in range(classes):
                code = background.clone()
                for atom in range(c * per_class, (c + 1) * per_class):  # each atom is separate evidence
                    where = torch.rand(positions, generator=g) < presence
                    where[torch.randint(positions, (1,), generator=g)] = True
                    code[where, atom] = 1.0 + torch.rand(int(where.sum()), generator=g)
                x = code @ dictionary + noise * torch.randn(positions, width, generator=g)  # (P, width)
                maps.append(x.T.reshape(width, size, size))  # (width, H, W)
                step_ids.append(step)
                labels.append(c)
                sample_ids.append(sample)
    batch = make_batch(torch.stack(maps), torch.tensor(step_ids), label=torch.tensor(labels),
                       sample=torch.tensor(sample_ids))  # fmt: skip
    class_atoms = tuple(torch.arange(c * per_class, (c + 1) * per_class) for c in range(classes))
    return PlantedMaps(dictionary, class_atoms, tuple(f"class{c}" for c in range(classes)), batch)


def oracle_sae(dictionary: Tensor, k: int, hook: str = "test.hook"):
    """An SAE whose decoder is the planted dictionary (latent j = atom j) and whose encoder is its dual
    basis (pseudo-inverse), so codes are recovered exactly when there are no more atoms than dimensions."""
    from diffbias_core.sae.model import SparseAutoencoder

    atoms, width = dictionary.shape
    encoder = torch.linalg.pinv(dictionary).T.contiguous()  # (atoms, width): encoder[j] . atom[i] = [i == j]
    return SparseAutoencoder.from_weights(encoder, torch.zeros(atoms), dictionary.clone(), torch.zeros(width), k,
                                          hook=hook)  # fmt: skip
