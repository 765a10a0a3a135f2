"""Every model family of the README's hook table, as a tiny random model of ComfyUI's own classes
(families.py), sampled by ComfyUI's sampler with Apply Feature Intervention at each hook kind it offers.

What the hook really is comes from the model itself, not from the plugin: a torch forward hook on the
block module the hook point names, and an observer installed at ComfyUI's patch point after the
plugin's patch (the UNet's block patches, the DiT's block replace patches), which sees the activation
as the rest of the model will.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import pytest
import torch
from torch import Tensor

from .families import FAMILIES, REFUSED, Family, build, conditioning, empty_latent
from .harness import assert_differs, assert_identical
from .observe import Call, block_module, cloned, first_step, parse, rows_of, watch, width_of

BATCH = 4
"""Images per run: two per class of the two-class feature set."""
CFG = 4.0
"""Guidance above 1, so every model call holds a cond and an uncond chunk."""
STEPS = 2
STRENGTH = 8.0
"""The Apply node's ``add`` strength of the real edits."""
TOP_K = 6

PROBES = [
    pytest.param(family, hook, id=f"{family.name}-{hook}") for family in FAMILIES for hook in family.probes
]
BY_FAMILY = [pytest.param(family, id=family.name) for family in FAMILIES]


class Plain(NamedTuple):
    """One unpatched run of a family's model."""

    model: Any
    """The family's ModelPatcher."""
    output: Tensor
    """The sampled latent."""
    calls: dict[str, list[Call]]
    """Per probe hook point, what the observer saw."""
    module_out: dict[str, Any]
    """Per probe hook point, the first output of the block module it names (a tensor or a tuple)."""


class Edited(NamedTuple):
    """One run of the Apply node's model (add STRENGTH, balance over two classes, cond only)."""

    output: Tensor
    """The sampled latent."""
    calls: list[Call]
    """What the observer after the plugin's patch saw at the hook point."""
    sae: Any
    """The SAE of the edit (the hook's real width)."""
    features: Any
    """Its two-class feature set, TOP_K features per class."""


def conds(family: Family) -> tuple[list, list]:
    return conditioning(family, seed=1), conditioning(family, seed=2)


class Runs:
    """The sampler runs the tests compare, each made once per module: a plain run per family (observed at
    every probe hook point, with forward hooks on the named block modules) and an edited run per probe."""

    def __init__(self, sample, make_sae, make_features, apply_intervention) -> None:
        self.sample, self.make_sae, self.make_features = sample, make_sae, make_features
        self.apply_intervention = apply_intervention
        self._plain: dict[str, Plain] = {}
        self._edited: dict[tuple[str, str], Edited] = {}

    def run(self, model, family: Family, batch: int = BATCH, steps: int = STEPS) -> Tensor:
        return self.sample(model, *conds(family), empty_latent(family, batch), steps=steps, cfg=CFG)

    def sae_and_features(self, family: Family, hook: str, width: int, sae_family: str | None = None):
        sae = self.make_sae(width, hook, sae_family or family.family)
        return sae, self.make_features(sae, per_class=TOP_K)

    def plain(self, family: Family) -> Plain:
        if family.name not in self._plain:
            model = build(family)
            calls = {hook: [] for hook in family.probes}
            module_out: dict[str, Any] = {}
            watched = model
            for hook in family.probes:
                watched = watch(watched, hook, calls[hook])
            net = model.get_model_object("diffusion_model")

            def keep_first(hook):
                def forward_hook(module, args, out) -> None:
                    if hook not in module_out:
                        module_out[hook] = cloned(out)

                return forward_hook

            handles = [
                block_module(family, net, hook).register_forward_hook(keep_first(hook))
                for hook in family.probes
            ]
            try:
                output = self.run(watched, family)
            finally:
                for handle in handles:
                    handle.remove()
            self._plain[family.name] = Plain(model, output, calls, module_out)
        return self._plain[family.name]

    def width(self, family: Family, hook: str) -> int:
        """The width of the activation at ``hook`` in the plain run."""
        return width_of(family, first_step(self.plain(family).calls[hook])[0].img)

    def edited(self, family: Family, hook: str) -> Edited:
        key = (family.name, hook)
        if key not in self._edited:
            sae, features = self.sae_and_features(family, hook, self.width(family, hook))
            patched = self.apply_intervention(
                self.plain(family).model, sae, features, strength=STRENGTH, top_k=TOP_K
            )
            calls: list[Call] = []
            self._edited[key] = Edited(self.run(watch(patched, hook, calls), family), calls, sae, features)
        return self._edited[key]


@pytest.fixture(scope="module")
def runs(sample, make_sae, make_features, apply_intervention) -> Runs:
    return Runs(sample, make_sae, make_features, apply_intervention)


def hook_width(plugin, model, hook: str) -> int | None:
    model_info = plugin.module("nodes.model_info")
    return model_info.hook_width(model, model_info.parse_hook(hook))


def force_edit(plugin, core, model, hook: str, sae, features, strength: float, cond_only: bool):
    """``intervention_run.add_intervention`` called directly: the patch installed whatever the nodes would say."""
    return plugin.module("nodes.intervention_run").add_intervention(
        model,
        plugin.module("nodes.model_info").parse_hook(hook),
        sae,
        features,
        core.EditSpec(mode="add", strength=strength, top_k=TOP_K),
        weights=(1.0, 1.0),
        fixed=None,
        seed=0,
        window=(0.0, 1.0),
        cond_only=cond_only,
    )


# ------------------------------------------------------------------------------------------- detection
@pytest.mark.parametrize("family", BY_FAMILY)
def test_family_and_every_hook_point_are_detected_and_fire(family, plugin, runs):
    """describe() names the family and exactly the model's hook points; the plugin's recorder at every one
    of them fires while sampling, with the width hook_width() reports."""
    model_info = plugin.module("nodes.model_info")
    recorder = plugin.module("nodes.recorder")
    model = runs.plain(family).model
    info = model_info.describe(model)
    assert info.family == family.family, f"{family.name}: family detected as {info.family!r}"
    assert info.architecture == ("unet" if family.blocks == "" else "dit"), info
    assert model_info.compact_hooks(info.hooks) == family.hooks, f"{family.name}: hooks {info.hooks}"

    seen: dict[str, int] = {}
    recording = model
    for hook in info.hooks:
        sink = lambda captured, hook=hook: seen.setdefault(hook, width_of(family, captured.activations))  # noqa: E731
        recording = recorder.add_recorder(recording, model_info.parse_hook(hook), sink, cond_only=False)
    runs.run(recording, family, batch=2, steps=1)
    expected = {hook: hook_width(plugin, model, hook) for hook in info.hooks}
    assert seen == expected, f"{family.name}: widths seen while sampling {seen}, reported {expected}"


@pytest.mark.parametrize(("family", "hook"), PROBES)
def test_hook_point_is_the_named_block_output_with_the_reported_width(family, hook, plugin, runs):
    plain = runs.plain(family)
    call = first_step(plain.calls[hook])[0]
    truth = plain.module_out[hook]
    kind, index = parse(hook)
    if kind == "single":  # the block's output: text tokens, then image tokens
        assert_identical(torch.cat([call.txt, call.img], dim=1), truth, f"{family.name} {hook}: block output")
    elif isinstance(truth, Tensor):
        assert_identical(call.img, truth, f"{family.name} {hook}: the block's output")
    else:  # a DiT block returning (img, txt) or (txt, img)
        assert any(
            isinstance(t, Tensor) and t.shape == call.img.shape and torch.equal(t, call.img) for t in truth
        ), (
            f"{family.name} {hook}: the image tokens at the patch point are none of the outputs of "
            f"{family.blocks}[{index}] (shapes {[getattr(t, 'shape', None) for t in truth]})"
        )
    width = width_of(family, call.img)
    assert hook_width(plugin, plain.model, hook) == width, f"{family.name} {hook}: real width {width}"


# -------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(("family", "hook"), PROBES)
def test_wrong_width_and_wrong_family_saes_are_refused_before_sampling(
    family, hook, runs, apply_intervention
):
    model, width = runs.plain(family).model, runs.width(family, hook)
    wrong = width + 8
    with pytest.raises(ValueError) as refused:
        apply_intervention(model, *runs.sae_and_features(family, hook, wrong))
    message = str(refused.value)
    assert str(wrong) in message and str(width) in message, f"{family.name} {hook}: {message}"

    other = next(f.family for f in FAMILIES if f.family != family.family)
    with pytest.raises(ValueError) as refused:
        apply_intervention(model, *runs.sae_and_features(family, hook, width, sae_family=other))
    message = str(refused.value)
    assert repr(other) in message and repr(family.family) in message, f"{family.name} {hook}: {message}"


# ------------------------------------------------------------------------------------------------ edits
@pytest.mark.parametrize(("family", "hook"), PROBES)
def test_neutral_edit_is_bit_identical(family, hook, plugin, core, runs, apply_intervention):
    plain = runs.plain(family)
    sae, features = runs.sae_and_features(family, hook, runs.width(family, hook))
    for edit, strength in (("add", 0.0), ("scale", 1.0)):
        neutral = apply_intervention(plain.model, sae, features, edit=edit, strength=strength)
        assert neutral is plain.model, f"{family.name} {hook}: {edit} {strength} returned a patched copy"
    forced = force_edit(plugin, core, plain.model, hook, sae, features, strength=0.0, cond_only=False)
    calls: list[Call] = []
    output = runs.run(watch(forced, hook, calls), family)
    where = f"{family.name} {hook}"
    assert_identical(calls[0].img, plain.calls[hook][0].img, f"{where}: the activation after a neutral edit")
    assert_identical(output, plain.output, f"{where}: the sample with a neutral edit")


@pytest.mark.parametrize(("family", "hook"), PROBES)
def test_edit_changes_the_image_tokens_of_cond_rows_only(family, hook, runs):
    plain, edited = runs.plain(family), runs.edited(family, hook)
    where = f"{family.name} {hook}"
    assert_differs(edited.output, plain.output, f"{where}: the sample")
    before = plain.calls[hook]
    assert_identical(rows_of(edited.calls, 1), rows_of(before, 1), f"{where}: the uncond rows (cond_only)")
    cond, cond_plain = rows_of(edited.calls, 0), rows_of(before, 0)
    changed = (cond != cond_plain).flatten(2).any(-1) if family.blocks == "" else (cond != cond_plain).any(-1)
    assert changed.all(), f"{where}: {(~changed).sum()} of {changed.numel()} positions of cond rows unedited"
    if family.blocks:  # DiT: the text tokens leave the block bit-identical
        for kind in (0, 1):
            assert_identical(
                rows_of(edited.calls, kind, "txt"), rows_of(before, kind, "txt"), f"{where}: text"
            )


@pytest.mark.parametrize(("family", "hook"), PROBES)
def test_each_image_gets_its_class_and_the_batch_follows_the_target(family, hook, plugin, runs):
    """Each cond row moves by exactly STRENGTH * (sum of the decoder rows of its class's features), the
    classes in the run state are two of each, and the rows say which."""
    patching = plugin.module("nodes.patching")
    edited = runs.edited(family, hook)
    states = [v for k, v in edited.calls[0].options.items() if k.startswith(patching.INTERVENTION_KEY)]
    assert len(states) == 1, f"run states in transformer_options: {states}"
    classes = states[0].image_class.tolist()
    assert sorted(classes) == [0, 0, 1, 1], f"{family.name} {hook}: classes {classes} for a uniform target"

    decoder = edited.sae.w_dec_flat.detach()  # (latents, width)
    shift = torch.stack(
        [STRENGTH * decoder[edited.features.ids[c][:TOP_K]].sum(0) for c in range(2)]
    )  # (2, width)
    assert (shift[0] - shift[1]).abs().max() > 1.0, "the two classes' edits are too alike to tell apart"
    before, after = rows_of(runs.plain(family).calls[hook], 0), rows_of(edited.calls, 0)
    delta = after - before
    if family.blocks == "":
        delta = delta.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C)
    expected = shift[torch.tensor(classes)][:, None, :].expand_as(delta)  # (B, positions, width)
    tolerance = 1e-5 * (1.0 + float(before.abs().max()))
    torch.testing.assert_close(
        delta,
        expected,
        rtol=0,
        atol=tolerance,
        msg=lambda m: f"{family.name} {hook}: the change of the rows does not follow classes {classes}: {m}",
    )


# ------------------------------------------------------------------------------------------ refused models
@pytest.mark.parametrize("refused", [pytest.param(r, id=r.family.name) for r in REFUSED])
def test_refused_model_has_no_hook_points_and_the_nodes_say_why(refused, plugin, runs, apply_intervention):
    family = refused.family
    model = build(family)
    info = plugin.module("nodes.model_info").describe(model)
    assert (info.family, info.hooks) == (family.family, ()), f"{family.name}: {info}"
    for hook in family.probes:
        with pytest.raises(ValueError) as stopped:
            apply_intervention(model, *runs.sae_and_features(family, hook, 64))
        message = str(stopped.value)
        assert family.family in message and refused.says in message, f"{family.name} {hook}: {message}"


@pytest.mark.parametrize(
    "family", [pytest.param(r.family, id=r.family.name) for r in REFUSED if "transformer_options" in r.says]
)
def test_refused_variant_really_lacks_the_seam(family, plugin, core, runs):
    """The patch installed anyway (the nodes would refuse) meets blocks that pass no transformer_options."""
    model = build(family)
    width = model.get_model_object("diffusion_model").dim
    for hook in family.probes:
        forced = force_edit(
            plugin, core, model, hook, *runs.sae_and_features(family, hook, width), STRENGTH, True
        )
        with pytest.raises(RuntimeError, match="without transformer_options"):
            runs.run(forced, family, batch=2, steps=1)
