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


_PLAIN: dict[str, Plain] = {}
_EDITED: dict[tuple[str, str], tuple[Tensor, list[Call], Any, Any]] = {}


def conds(family: Family) -> tuple[list, list]:
    return conditioning(family, seed=1), conditioning(family, seed=2)


def plain_run(family: Family, sample) -> Plain:
    """The unpatched model's run, observed at every probe hook point (built and sampled once per family)."""
    if family.name not in _PLAIN:
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
            block_module(family, net, hook).register_forward_hook(keep_first(hook)) for hook in family.probes
        ]
        try:
            output = sample(watched, *conds(family), empty_latent(family, BATCH), steps=STEPS, cfg=CFG)
        finally:
            for handle in handles:
                handle.remove()
        _PLAIN[family.name] = Plain(model, output, calls, module_out)
    return _PLAIN[family.name]


def hook_width(plugin, model, hook: str) -> int | None:
    model_info = plugin.module("nodes.model_info")
    return model_info.hook_width(model, model_info.parse_hook(hook))


def real_width(family: Family, plain: Plain, hook: str) -> int:
    return width_of(family, first_step(plain.calls[hook])[0].img)


def features_for(make_sae, make_features, family: Family, hook: str, width: int):
    sae = make_sae(width, hook, family.family)
    return sae, make_features(sae, per_class=TOP_K)


def edited_run(family, hook, sample, plugin, make_sae, make_features, apply_intervention):
    """The Apply node's model (add STRENGTH, balance over two classes, cond only) sampled and observed."""
    key = (family.name, hook)
    if key not in _EDITED:
        plain = plain_run(family, sample)
        sae, features = features_for(make_sae, make_features, family, hook, real_width(family, plain, hook))
        patched = apply_intervention(plain.model, sae, features, strength=STRENGTH, top_k=TOP_K)
        calls: list[Call] = []
        output = sample(
            watch(patched, hook, calls), *conds(family), empty_latent(family, BATCH), steps=STEPS, cfg=CFG
        )
        _EDITED[key] = (output, calls, sae, features)
    return _EDITED[key]


# ------------------------------------------------------------------------------------------- detection
@pytest.mark.parametrize("family", BY_FAMILY)
def test_family_and_every_hook_point_are_detected_and_fire(family, plugin, sample):
    """describe() names the family and exactly the model's hook points; the plugin's recorder at every one
    of them fires while sampling, with the width hook_width() reports."""
    model_info = plugin.module("nodes.model_info")
    patching = plugin.module("nodes.patching")
    model = plain_run(family, sample).model
    info = model_info.describe(model)
    assert info.family == family.family, f"{family.name}: family detected as {info.family!r}"
    assert info.architecture == ("unet" if family.blocks == "" else "dit"), info
    assert model_info.compact_hooks(info.hooks) == family.hooks, f"{family.name}: hooks {info.hooks}"

    seen: dict[str, int] = {}
    recording = model
    for hook in info.hooks:
        sink = lambda captured, hook=hook: seen.setdefault(hook, width_of(family, captured.activations))  # noqa: E731
        recording = patching.add_recorder(recording, model_info.parse_hook(hook), sink, cond_only=False)
    sample(recording, *conds(family), empty_latent(family, 2), steps=1, cfg=CFG)
    expected = {hook: hook_width(plugin, model, hook) for hook in info.hooks}
    assert seen == expected, f"{family.name}: widths seen while sampling {seen}, reported {expected}"


@pytest.mark.parametrize(("family", "hook"), PROBES)
def test_hook_point_is_the_named_block_output_with_the_reported_width(family, hook, plugin, sample):
    plain = plain_run(family, sample)
    call = first_step(plain.calls[hook])[0]
    truth = plain.module_out[hook]
    kind, _ = parse(hook)
    if kind == "single":  # the block's output: text tokens, then image tokens
        assert_identical(torch.cat([call.txt, call.img], dim=1), truth, f"{family.name} {hook}: block output")
    elif isinstance(truth, Tensor):
        assert_identical(call.img, truth, f"{family.name} {hook}: the block's output")
    else:  # a DiT block returning (img, txt) or (txt, img)
        assert any(
            isinstance(t, Tensor) and t.shape == call.img.shape and torch.equal(t, call.img) for t in truth
        ), (
            f"{family.name} {hook}: the image tokens at the patch point are none of the outputs of "
            f"{family.blocks}[{parse(hook)[1]}] (shapes {[getattr(t, 'shape', None) for t in truth]})"
        )
    width = width_of(family, call.img)
    assert hook_width(plugin, plain.model, hook) == width, f"{family.name} {hook}: real width {width}"


# -------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(("family", "hook"), PROBES)
def test_wrong_width_and_wrong_family_saes_are_refused_before_sampling(
    family, hook, plugin, sample, make_sae, make_features, apply_intervention
):
    plain = plain_run(family, sample)
    width = real_width(family, plain, hook)
    wrong = width + 8
    sae, features = features_for(make_sae, make_features, family, hook, wrong)
    with pytest.raises(ValueError) as refused:
        apply_intervention(plain.model, sae, features)
    message = str(refused.value)
    assert str(wrong) in message and str(width) in message, f"{family.name} {hook}: {message}"

    other = next(f.family for f in FAMILIES if f.family != family.family)
    sae = make_sae(width, hook, other)
    with pytest.raises(ValueError) as refused:
        apply_intervention(plain.model, sae, make_features(sae, per_class=TOP_K))
    message = str(refused.value)
    assert repr(other) in message and repr(family.family) in message, f"{family.name} {hook}: {message}"


# ------------------------------------------------------------------------------------------------ edits
@pytest.mark.parametrize(("family", "hook"), PROBES)
def test_neutral_edit_is_bit_identical(
    family, hook, plugin, core, sample, make_sae, make_features, apply_intervention
):
    plain = plain_run(family, sample)
    sae, features = features_for(make_sae, make_features, family, hook, real_width(family, plain, hook))
    for edit, strength in (("add", 0.0), ("scale", 1.0)):
        neutral = apply_intervention(plain.model, sae, features, edit=edit, strength=strength)
        assert neutral is plain.model, f"{family.name} {hook}: {edit} {strength} returned a patched copy"
    forced = plugin.module("nodes.patching").add_intervention(  # installed although neutral
        plain.model,
        plugin.module("nodes.model_info").parse_hook(hook),
        sae,
        features,
        core.EditSpec(mode="add", strength=0.0, top_k=TOP_K),
        weights=(1.0, 1.0),
        fixed=None,
        seed=0,
        window=(0.0, 1.0),
        cond_only=False,
    )
    calls: list[Call] = []
    output = sample(
        watch(forced, hook, calls), *conds(family), empty_latent(family, BATCH), steps=STEPS, cfg=CFG
    )
    assert len(calls) == len(plain.calls[hook]), (
        f"{family.name} {hook}: the patched model called the hook differently"
    )
    assert_identical(
        calls[0].img, plain.calls[hook][0].img, f"{family.name} {hook}: the activation after a neutral edit"
    )
    assert_identical(output, plain.output, f"{family.name} {hook}: the sample with a neutral edit")


@pytest.mark.parametrize(("family", "hook"), PROBES)
def test_edit_changes_the_image_tokens_of_cond_rows_only(
    family, hook, plugin, sample, make_sae, make_features, apply_intervention
):
    plain = plain_run(family, sample)
    output, calls, _, _ = edited_run(
        family, hook, sample, plugin, make_sae, make_features, apply_intervention
    )
    where = f"{family.name} {hook}"
    assert_differs(output, plain.output, f"{where}: the sample")
    assert_identical(
        rows_of(calls, 1), rows_of(plain.calls[hook], 1), f"{where}: the uncond rows (cond_only)"
    )
    cond, cond_plain = rows_of(calls, 0), rows_of(plain.calls[hook], 0)
    changed = (cond != cond_plain).flatten(2).any(-1) if family.blocks == "" else (cond != cond_plain).any(-1)
    assert changed.all(), (
        f"{where}: image tokens / channels left unedited in cond rows: {(~changed).sum()} of {changed.numel()}"
    )
    if family.blocks:  # DiT: the text tokens leave the block bit-identical
        for kind in (0, 1):
            assert_identical(
                rows_of(calls, kind, "txt"), rows_of(plain.calls[hook], kind, "txt"), f"{where}: text tokens"
            )


@pytest.mark.parametrize(("family", "hook"), PROBES)
def test_each_image_gets_its_class_and_the_batch_follows_the_target(
    family, hook, plugin, sample, make_sae, make_features, apply_intervention
):
    """Each cond row moves by exactly STRENGTH * (sum of the decoder rows of its class's features), the
    classes in the run state are two of each, and the rows say which."""
    patching = plugin.module("nodes.patching")
    plain = plain_run(family, sample)
    _, calls, sae, features = edited_run(
        family, hook, sample, plugin, make_sae, make_features, apply_intervention
    )
    states = [v for k, v in calls[0].options.items() if k.startswith(patching.INTERVENTION_KEY)]
    assert len(states) == 1, f"run states in transformer_options: {states}"
    classes = states[0].image_class.tolist()
    assert sorted(classes) == [0, 0, 1, 1], f"{family.name} {hook}: classes {classes} for a uniform target"

    decoder = sae.w_dec_flat.detach()  # (latents, width)
    shift = torch.stack([STRENGTH * decoder[features.ids[c][:TOP_K]].sum(0) for c in range(2)])  # (2, width)
    assert (shift[0] - shift[1]).abs().max() > 1.0, "the two classes' edits are too alike to tell apart"
    before, after = rows_of(plain.calls[hook], 0), rows_of(calls, 0)
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


# ------------------------------------------------------------------------------------ refused models
@pytest.mark.parametrize("refused", [pytest.param(r, id=r.family.name) for r in REFUSED])
def test_refused_model_has_no_hook_points_and_the_nodes_say_why(
    refused, plugin, make_sae, make_features, apply_intervention
):
    family = refused.family
    model_info = plugin.module("nodes.model_info")
    model = build(family)
    info = model_info.describe(model)
    assert (info.family, info.hooks) == (family.family, ()), f"{family.name}: {info}"
    for hook in family.probes:
        sae = make_sae(64, hook, family.family)
        with pytest.raises(ValueError) as stopped:
            apply_intervention(model, sae, make_features(sae, per_class=TOP_K))
        message = str(stopped.value)
        assert repr(family.family) in message or f" {family.family} " in message, f"{family.name}: {message}"
        assert refused.says in message, f"{family.name} {hook}: {message}"


@pytest.mark.parametrize(
    "family", [pytest.param(r.family, id=r.family.name) for r in REFUSED if "transformer_options" in r.says]
)
def test_refused_variant_really_lacks_the_seam(family, plugin, core, sample, make_sae, make_features):
    """The patch installed anyway (the nodes would refuse) meets blocks that pass no transformer_options."""
    model_info = plugin.module("nodes.model_info")
    model = build(family)
    net = model.get_model_object("diffusion_model")
    for hook in family.probes:
        sae = make_sae(net.dim, hook, family.family)
        forced = plugin.module("nodes.patching").add_intervention(
            model,
            model_info.parse_hook(hook),
            sae,
            make_features(sae, per_class=TOP_K),
            core.EditSpec(mode="add", strength=STRENGTH, top_k=TOP_K),
            weights=(1.0, 1.0),
            fixed=None,
            seed=0,
            window=(0.0, 1.0),
            cond_only=True,
        )
        with pytest.raises(RuntimeError, match="without transformer_options"):
            sample(forced, *conds(family), empty_latent(family, 2), steps=1, cfg=CFG)
