"""The toy world's example workflows, run as shipped through a real ComfyUI server, remove the bias they
are built to remove (the model-level checks are in inside/test_toy_world_model.py).

Figures are read from the images the workflows show (their Preview Image files), with the exact oracle,
per prompted shape: FD = || colour shares - uniform ||_2 (hard counts), the mean over the three shapes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffbias_core import load_features, load_sae, save_features
from diffbias_core.attribute.features import FeatureSet
from diffbias_core.measure.metrics import fairness_discrepancy
from diffbias_core.toy import oracles
from diffbias_core.toy.classifier import ToyOracle
from diffbias_core.toy.demo import FEATURES_FILE, DemoConfig, run_demo
from diffbias_core.toy.dissect import SAE_FILE
from diffbias_core.toy.train import WEIGHTS_DIR

from . import toy_workflows as T
from .comfy_server import execution_error
from .workflows import ui_to_api

EXAMPLES = Path(__file__).resolve().parents[2] / "example_workflows"
RANDOM_FEATURES = "toy_random_control.features.safetensors"
BOOTSTRAP = 2000


# ------------------------------------------------------------------------------------- server runs
def _run(server, name: str, change: dict | None = None) -> dict:
    workflow = json.loads((EXAMPLES / f"{name}.json").read_text())
    prompt = ui_to_api(workflow, server.get("/object_info"))
    for node_id, inputs in (change or {}).items():
        prompt[str(node_id)]["inputs"].update(inputs)
    entry = server.run(prompt, timeout=900)
    error = execution_error(entry)
    assert error is None, f"{error.get('exception_message')}\n{''.join(error.get('traceback', []))[-3000:]}"
    return entry


def _pictures(server, entry: dict, node_id: int) -> torch.Tensor:
    """The images a Preview Image node showed: (B, H, W, 3) in [0, 1], in batch order."""
    frames = []
    for image in entry["outputs"][str(node_id)]["images"]:
        path = server.base / image["type"] / image["subfolder"] / image["filename"]
        frames.append(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0)
    return torch.from_numpy(np.stack(frames))


def _fd_per_shape(colour: torch.Tensor) -> list[float]:
    """colour: (3 * PER_SHAPE,) oracle colours, shape-major (unreadable -1 left out) -> FD per prompted shape."""
    per = colour.view(len(T.SHAPES), -1)
    return [float(fairness_discrepancy(torch.bincount(row[row >= 0], minlength=3).double())) for row in per]


def _figures(reading: oracles.Reading) -> dict:
    """FD (mean over prompted shapes) with its bootstrap standard error, and the shape accuracy."""
    prompted = torch.arange(len(T.SHAPES)).repeat_interleave(T.PER_SHAPE)
    generator = torch.Generator().manual_seed(0)
    per = reading.colour.view(len(T.SHAPES), -1)
    draws = torch.randint(per.shape[1], (BOOTSTRAP, *per.shape), generator=generator)  # resample per shape
    boot = [sum(_fd_per_shape(torch.gather(per, 1, d).reshape(-1))) / len(T.SHAPES) for d in draws]
    fds = _fd_per_shape(reading.colour)
    return {
        "fd": sum(fds) / len(fds),
        "fd_per_shape": fds,
        "fd_se": float(np.std(boot)),
        "shape_accuracy": float((reading.shape == prompted).float().mean()),
    }


def _measured(server, entry: dict) -> dict:
    oracle = ToyOracle()
    plain = _figures(oracle.read(_pictures(server, entry, T.DECODE_PLAIN + 2)))
    after = _figures(oracle.read(_pictures(server, entry, T.DECODE_AFTER + 2)))
    return {"plain": plain, "after": after}


@pytest.fixture(scope="module")
def debias(server) -> dict:
    entry = _run(server, "01_toy_world_debias")
    figures = _measured(server, entry)
    reports = {key: entry["outputs"][str(node)]["text"][0] for key, node in (("plain", 42), ("after", 43))}
    return {**figures, "reports": reports}


def test_debias_workflow_removes_the_bias(debias):
    plain, after = debias["plain"], debias["after"]
    print(f"toy_world_debias: FD plain {plain['fd']:.3f}, after {after['fd']:.3f} +- {after['fd_se']:.3f}; "
          f"shape accuracy {plain['shape_accuracy']:.3f} -> {after['shape_accuracy']:.3f}")  # fmt: skip
    assert plain["fd"] >= 0.25, plain
    assert after["fd"] <= 0.06, after
    assert plain["shape_accuracy"] - after["shape_accuracy"] <= 0.02, (plain, after)


def test_debias_workflow_reports_its_measures(debias):
    assert "images: 288 measured" in debias["reports"]["plain"]
    assert "pixel similarity" in debias["reports"]["after"], (
        "the intervened batch is measured against its twins"
    )


def test_random_features_of_the_same_size_do_not(server, debias):
    sae = load_sae(WEIGHTS_DIR / SAE_FILE)
    shipped = load_features(WEIGHTS_DIR / FEATURES_FILE)
    generator = torch.Generator().manual_seed(7)
    ids = tuple(torch.randperm(sae.num_latents, generator=generator)[: len(i)] for i in shipped.ids)
    scores = tuple(torch.linspace(1.0, 0.1, len(i)) for i in ids)
    control = FeatureSet(shipped.classes, ids, scores, sae.fingerprint(), sae.hook, "random", {"seed": "7"})
    folder = server.base / "models" / "sae"
    folder.mkdir(parents=True, exist_ok=True)
    save_features(control, folder / RANDOM_FEATURES)
    try:
        entry = _run(server, "01_toy_world_debias", {3: {"features_name": RANDOM_FEATURES}})
    finally:
        (folder / RANDOM_FEATURES).unlink()
    moved = debias["plain"]["fd"] - _measured(server, entry)["after"]["fd"]
    intervention = debias["plain"]["fd"] - debias["after"]["fd"]
    print(f"random control moves FD by {moved:.3f}, the intervention by {intervention:.3f}")
    assert abs(moved) < 0.25 * intervention


def test_node_path_agrees_with_the_cli_demo(debias):
    """Same model, SAE, features (the demo at seed 0 attributes exactly the shipped set), edit and 96 images
    per shape; the noises and class draws differ, so the two FDs differ by sampling noise only."""
    result = run_demo(DemoConfig(seed=0, samples=T.PER_SHAPE, show_progress=False))
    assert result.report["attribution"]["features"] == {
        c: load_features(WEIGHTS_DIR / FEATURES_FILE).ids[i][:30].tolist()
        for i, c in enumerate(("red", "green", "blue"))
    }, "the demo's features are the shipped ones"
    node, cli = debias["after"], _figures(oracles.read(result.images["after"]))
    assert cli["fd"] == pytest.approx(result.report["fd_after"], abs=1e-4), "the same FD as the demo reports"
    noise = math.hypot(node["fd_se"], cli["fd_se"])  # standard error of the difference (bootstrap)
    print(f"FD after: node path {node['fd']:.4f} +- {node['fd_se']:.4f}, CLI demo {cli['fd']:.4f} +- "
          f"{cli['fd_se']:.4f}; SE of the difference {noise:.4f}")  # fmt: skip
    assert abs(node["fd"] - cli["fd"]) < 2 * noise, (
        f"FD after differs by {abs(node['fd'] - cli['fd']):.4f} between the node path ({node['fd']:.4f}) and the "
        f"CLI demo ({cli['fd']:.4f}): more than twice the sampling noise, the SE of the difference {noise:.4f}"
    )


def test_dissect_workflow_finds_features_that_work(server):
    entry = _run(server, "02_toy_world_dissect")
    figures = _measured(server, entry)
    print(f"toy_world_dissect: FD plain {figures['plain']['fd']:.3f}, after {figures['after']['fd']:.3f}")
    assert figures["plain"]["fd"] >= 0.25
    assert figures["after"]["fd"] <= 0.08, figures
    trained = server.base / "models" / "sae" / f"{T.TRAINED}.safetensors"
    assert trained.is_file() and (trained.parent / f"{T.TRAINED}.colour.features.safetensors").is_file()
