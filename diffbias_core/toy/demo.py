"""The embedded demo: dissect, attribute, intervene and measure on the toy model, on CPU.

Stages (each with a progress bar on stderr):

1. baseline: ``samples`` images per shape from the neutral prompts ("a circle", ...);
2. attribution captures: paired prompts naming each colour from the same noise, bottleneck at every step;
3. SAE: the shipped one (or one trained here when the world changed or ``train_sae`` is set);
4. per-step probes and integrated-gradients attribution -> FeatureSet (plus the random control);
5. intervention: every image gets a colour class (stratified, uniform target) and the SAE edit of that
   class's top features, from the same noise as its baseline twin;
6. controls: random SAE features of the same count, the class-mean difference map added without
   the SAE, and prompting with the assigned colour named;
7. measure with the oracles; report (JSON), picture grid and charts (PNG).

Tuned defaults (on the shipped model, 150-500 images per shape): ``add`` 2.5 to the top 30 IG
features of the assigned colour at every bottleneck position, other classes' features kept, over
steps 10%-90% of the schedule. The toy model settles colour late (``UNetConfig.chroma_scale``), so
the edit has to last until near the end; a shorter window (e.g. 20%-70%) keeps shapes slightly
better but flips fewer images (hit rate ~0.93), a stronger edit (3.0) flips every image but costs
twin masks (~0.90 kept) and ``others="ablate"`` costs shape accuracy without raising the hit rate.
Shape accuracy moves by churn, not by a trend: on seeds 0-5 it changes by -0.5 to +0.3 points; on seeds 3-5
the edit misreads the shape of 12-17 of the 1,500 images (mostly squares read as circles) and reads 10-16
misread ones right. Windows 10%-80% or 20%-90% churn as much; 20 features instead of 30 churn less but
leave FD at 0.02 (strength 3.0) to 0.08 (2.5).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..attribute.attribution import AttributionConfig, attribute
from ..attribute.features import FeatureSet
from ..attribute.probes import ProbeConfig, fit_probes
from ..base.progress import Progress
from ..dissect.activations import MemorySource, make_batch
from ..intervene.intervention import EditSpec, assign_classes
from ..sae.model import SparseAutoencoder
from . import world as W
from .diffusion import initial_noise
from .dissect import SAE_FILE, ToySaeConfig, load_toy_sae, train_toy_sae
from .edits import Window, class_mean_directions, direction_edit, feature_edit
from .measure import summarize
from .model import ToyUNet
from .oracles import read
from .sampling import HOOK, Captured, EditFn, Recorder, generate
from .train import WEIGHTS_DIR, ToyTrainConfig, load_model, train_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    """Settings of the demo; the defaults are the tuned ones the README quotes."""

    seed: int = 0
    """Seed of the noise, the class assignment and the random control."""
    samples: int = 500
    """Images per shape for the baseline, the intervention and each control (>= 3)."""
    steps: int = 10
    """DDIM steps of every generation (>= 2)."""
    skew: tuple[tuple[float, ...], ...] | None = None
    """A new per-shape colour skew: the world is regenerated and the shipped model fine-tuned to it."""
    finetune_steps: int = 1500
    """Fine-tuning steps when ``skew`` is given."""
    pairs: int = 48
    """Attribution: initial noises per shape, each generated with every colour named (>= 4)."""
    top_k: int = 30
    """Features per class edited (and random features per class in the control)."""
    mode: str = "add"
    """Edit mode of the intervention (see EditSpec)."""
    strength: float = 2.5
    """Edit strength (the amount added to each selected latent for mode "add")."""
    others: str = "keep"
    """What happens to the other classes' selected features ("keep" or "ablate")."""
    window: Window = field(default_factory=lambda: Window(0.1, 0.9))
    """Fraction of the schedule edited (SAE edit and the mean-difference control)."""
    direction_scale: float = 1.0
    """Multiple of the class-mean difference map added by the mean-difference control."""
    train_sae: bool = False
    """Train a new SAE here instead of loading the shipped one."""
    chunk: int = 500
    """Images sampled at once (memory vs speed)."""
    show_progress: bool = True
    """Progress bars on stderr."""

    def __post_init__(self) -> None:
        if self.samples < 3 or self.steps < 2 or self.pairs < 4:
            raise ValueError(f"need samples >= 3, steps >= 2, pairs >= 4; got samples={self.samples}, "
                             f"steps={self.steps}, pairs={self.pairs}")  # fmt: skip
        if self.finetune_steps < 1 or self.top_k < 1 or self.chunk < 1:
            raise ValueError(f"need finetune_steps, top_k, chunk >= 1; got {self.finetune_steps}, {self.top_k}, "
                             f"{self.chunk}")  # fmt: skip
        EditSpec(mode=self.mode, strength=self.strength, top_k=self.top_k, others=self.others)  # type: ignore[arg-type]
        if self.skew is not None:
            W.WorldConfig(skew=self.skew)

    @property
    def spec(self) -> EditSpec:
        """The intervention's EditSpec."""
        return EditSpec(mode=self.mode, strength=self.strength, top_k=self.top_k, others=self.others)  # type: ignore[arg-type]


class DemoResult(NamedTuple):
    """What the demo produced."""

    report: dict[str, Any]
    """The JSON report (see :func:`run_demo`)."""
    images: dict[str, Tensor]
    """Generated images per run ("before", "after", "random_features", "mean_difference",
    "prompting"): (3 * samples, 3, S, S) in [-1, 1], shape-major order."""
    shape: Tensor
    """(3 * samples,) prompted shape of every image."""
    assigned: Tensor
    """(3 * samples,) colour class assigned to every image."""


class _Stage:
    """Times the stages and draws one progress bar each."""

    def __init__(self, show: bool) -> None:
        self.show = show
        self.seconds: dict[str, float] = {}

    def generate(self, name: str, model: ToyUNet, prompt: Tensor, noise: Tensor, steps: int, chunk: int,
                 edit: EditFn | None = None, capture: Recorder | None = None) -> Tensor:  # fmt: skip
        with Progress(prompt.shape[0], name, enabled=self.show) as bar:
            images = generate(model, prompt, noise, steps, edit=edit, capture=capture, chunk=chunk,
                              on_chunk_done=bar.update)  # fmt: skip
        self.seconds[name] = round(bar.elapsed, 2)
        return images


def _model_and_sae(
    config: DemoConfig, stage: _Stage
) -> tuple[ToyUNet, W.WorldConfig, SparseAutoencoder, str]:
    model, world = load_model()
    source = "shipped"
    if config.skew is not None:
        world = replace(world, skew=config.skew)
        start = time.perf_counter()
        tune = ToyTrainConfig(
            steps=config.finetune_steps, seed=config.seed + 17, world=world, unet=model.config
        )
        model = train_model(tune, init=model, show_progress=config.show_progress)
        stage.seconds["fine-tune"] = round(time.perf_counter() - start, 2)
        source = f"fine-tuned {config.finetune_steps} steps"
    if config.skew is not None or config.train_sae:
        start = time.perf_counter()
        sae = train_toy_sae(model, ToySaeConfig(images_per_prompt=60, epochs=2, seed=config.seed),
                            show_progress=config.show_progress)  # fmt: skip
        stage.seconds["train SAE"] = round(time.perf_counter() - start, 2)
        return model, world, sae, source + ", SAE trained here"
    return model, world, load_toy_sae(WEIGHTS_DIR / SAE_FILE), source + ", shipped SAE"


def _attribution_data(
    model: ToyUNet, config: DemoConfig, stage: _Stage
) -> tuple[MemorySource, Captured, Tensor]:
    """Paired prompts: ``pairs`` noises per shape, each with every colour named; every step captured."""
    n_col, n_shape, m = len(W.COLOURS), len(W.SHAPES), config.pairs
    shape = torch.arange(n_shape).repeat_interleave(n_col * m)  # (3 * 3 * m,)
    colour = torch.arange(n_col).repeat_interleave(m).repeat(n_shape)
    sample = torch.arange(m).repeat(n_col * n_shape) + m * shape  # same id = same noise
    noise = initial_noise(n_shape * m, model.config.image_size, config.seed + 1)[sample]
    recorder = Recorder(shape.shape[0], config.steps, model.config.bottleneck_shape)
    stage.generate("attribution capture", model, W.tokens(shape, colour), noise, config.steps, config.chunk,
                   capture=recorder)  # fmt: skip
    captured = recorder.result()
    maps = captured.activations.flatten(0, 1)  # (N * steps, C, H, W), image-major
    steps = torch.arange(config.steps).repeat(shape.shape[0])
    batch = make_batch(maps, steps, label=colour.repeat_interleave(config.steps),
                       sample=sample.repeat_interleave(config.steps),
                       timestep=captured.t.repeat(shape.shape[0]))  # fmt: skip
    return MemorySource(batch, hook=HOOK, classes=W.COLOURS), captured, colour


def _attribute(sae: SparseAutoencoder, source: MemorySource, config: DemoConfig,
               stage: _Stage) -> tuple[FeatureSet, FeatureSet, dict[str, Any]]:  # fmt: skip
    start = time.perf_counter()
    with Progress(config.steps, "probes", enabled=config.show_progress) as bar:
        probes = fit_probes(source, ProbeConfig(seed=config.seed), progress=lambda d, t: bar.update())
    with Progress(config.steps, "attribution (IG)", enabled=config.show_progress) as bar:
        features = attribute(
            sae, source, AttributionConfig(top_k=100), probes, progress=lambda d, t: bar.update()
        )
    random = attribute(sae, source, AttributionConfig(method="random", top_k=100, seed=config.seed))
    stage.seconds["probes + attribution"] = round(time.perf_counter() - start, 2)
    facts = {
        "probe_accuracy": [round(float(a), 4) for a in probes.accuracy],
        "features": {c: features.ids[i][: config.top_k].tolist() for i, c in enumerate(W.COLOURS)},
        "random_features": {c: random.ids[i][: config.top_k].tolist() for i, c in enumerate(W.COLOURS)},
        "ig_error_share": features.provenance.get("error_share"),
    }
    return features, random, facts


FEATURES_FILE = "toy_world.colour.features.safetensors"
"""File name of the shipped colour feature set (on the shipped SAE) in the weights folder."""


def attribute_colours(config: DemoConfig = DemoConfig()) -> FeatureSet:
    """The colour features the demo finds (top 100 per colour by integrated gradients) on its model and SAE.

    ``python -m diffbias_core.toy features`` writes them for the shipped model and SAE as FEATURES_FILE.
    """
    stage = _Stage(config.show_progress)
    model, _, sae, _ = _model_and_sae(config, stage)
    source, _, _ = _attribution_data(model, config, stage)
    features, _, _ = _attribute(sae, source, config, stage)
    facts = {"source": "diffbias_core.toy.demo.attribute_colours", "seed": str(config.seed),
             "pairs_per_shape": str(config.pairs), "sampling_steps": str(config.steps)}  # fmt: skip
    return replace(features, provenance={**features.provenance, **facts})


def run_demo(config: DemoConfig = DemoConfig()) -> DemoResult:
    """Run every stage and return the report and the images.

    The report has ``fd_before``, ``fd_after``, ``shape_accuracy_before``, ``shape_accuracy_after``,
    ``twin_mask_kept``, ``assignment_hit_rate`` (overall), ``per_shape`` (the same per shape),
    ``controls`` (``random_features``, ``mean_difference``, ``prompting``, each with ``fd_after``,
    ``shape_accuracy_after``, ``twin_mask_kept``, ``assignment_hit_rate`` and ``per_shape``), and the
    full figures of every run under ``runs``.
    """
    stage = _Stage(config.show_progress)
    start = time.perf_counter()
    model, world, sae, source_note = _model_and_sae(config, stage)
    n, size = config.samples, model.config.image_size
    shape = torch.arange(len(W.SHAPES)).repeat_interleave(n)  # (3n,) shape-major
    assigned = torch.cat([assign_classes(n, [1.0] * len(W.COLOURS), seed=config.seed * 101 + k)
                          for k in range(len(W.SHAPES))])  # fmt: skip
    noise = initial_noise(shape.shape[0], size, config.seed)
    neutral = W.tokens(shape)

    images = {"before": stage.generate("baseline", model, neutral, noise, config.steps, config.chunk)}
    source, captured, labels = _attribution_data(model, config, stage)
    features, random, facts = _attribute(sae, source, config, stage)
    runs: dict[str, EditFn | None] = {
        "after": feature_edit(sae, features, assigned, config.spec, config.window),
        "random_features": feature_edit(sae, random, assigned, config.spec, config.window),
        "mean_difference": direction_edit(
            class_mean_directions(captured, labels, len(W.COLOURS)),
            assigned,
            config.window,
            config.direction_scale,
        ),  # fmt: skip
    }
    titles = {
        "after": "intervention",
        "random_features": "control: random",
        "mean_difference": "control: mean-diff",
    }
    for name, edit in runs.items():
        images[name] = stage.generate(
            titles[name], model, neutral, noise, config.steps, config.chunk, edit=edit
        )
    images["prompting"] = stage.generate("control: prompting", model, W.tokens(shape, assigned), noise,
                                         config.steps, config.chunk)  # fmt: skip

    readings = {name: read(batch) for name, batch in images.items()}
    before = summarize(readings["before"], shape, assigned)
    figures = {
        name: summarize(readings[name], shape, assigned, readings["before"])
        for name in images
        if name != "before"
    }
    report = _report(config, world, before, figures, facts, source_note)
    report["seconds"] = {**stage.seconds, "total": round(time.perf_counter() - start, 2)}
    return DemoResult(report, images, shape, assigned)


def _headline(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    return {
        "fd_before": before["fd"],
        "fd_after": after["fd"],
        "shape_accuracy_before": before["shape_accuracy"],
        "shape_accuracy_after": after["shape_accuracy"],
        "twin_mask_kept": after["twin_mask_kept"],
        "assignment_hit_rate": after["assignment_hit_rate"],
    }


def _report(config: DemoConfig, world: W.WorldConfig, before: dict[str, Any], figures: dict[str, dict[str, Any]],
            facts: dict[str, Any], source_note: str) -> dict[str, Any]:  # fmt: skip
    after = figures["after"]
    per_shape = {
        name: _headline(before["per_shape"][name], after["per_shape"][name]) for name in before["per_shape"]
    }
    controls = {}
    for name in ("random_features", "mean_difference", "prompting"):
        run = figures[name]
        controls[name] = {
            **{
                k: v
                for k, v in _headline(before, run).items()
                if k not in ("fd_before", "shape_accuracy_before")
            },
            "per_shape": {s: {"fd_after": run["per_shape"][s]["fd"]} for s in run["per_shape"]},
        }
    return {
        **_headline(before, after),
        "per_shape": per_shape,
        "controls": controls,
        "runs": {"before": before, **figures},
        "attribution": facts,
        "settings": {
            "seed": config.seed,
            "samples_per_shape": config.samples,
            "steps": config.steps,
            "pairs_per_shape": config.pairs,
            "edit": {
                "mode": config.mode,
                "strength": config.strength,
                "top_k": config.top_k,
                "others": config.others,
                "window": [config.window.start, config.window.end],
            },
            "direction_scale": config.direction_scale,
            "skew": [list(r) for r in world.skew],
            "model": source_note,
            "hook": HOOK,
            "target": "uniform",
        },  # fmt: skip
    }


__all__ = ["FEATURES_FILE", "DemoConfig", "DemoResult", "attribute_colours", "run_demo"]
