import json
import math

import pytest
import torch

from diffbias_core.toy import diffusion, oracles
from diffbias_core.toy import world as W
from diffbias_core.toy.model import ToyUNet, UNetConfig, hook_module
from diffbias_core.toy.train import (
    MODEL_FILE,
    REPORT_FILE,
    WEIGHTS_DIR,
    ToyTrainConfig,
    load_model,
    save_model,
    train_model,
)

TINY = UNetConfig(widths=(8, 16, 16), text_dim=8, time_dim=16, heads=2)


@pytest.fixture(autouse=True)
def one_thread():
    # Small convolutions run far faster on one thread than on threads fighting for busy cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _inputs(n, seed=0, size=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    t = torch.rand(n, generator=g)
    prompt = W.tokens(torch.randint(3, (n,), generator=g), torch.randint(-1, 3, (n,), generator=g))
    return x, t, prompt


def test_forward_shapes_and_bottleneck_hook():
    torch.manual_seed(0)
    model = ToyUNet(TINY).eval()
    x, t, prompt = _inputs(5)
    seen = []
    handle = hook_module(model, "unet.middle").register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        out = model(x, t, prompt)
    handle.remove()
    assert out.shape == x.shape
    assert seen == [torch.Size([5, *TINY.bottleneck_shape])]
    with pytest.raises(ValueError, match="unet.output.3"):
        hook_module(model, "unet.output.3")


def test_prompt_reaches_the_output_only_through_the_bottleneck():
    torch.manual_seed(1)
    model = ToyUNet(TINY).eval()
    x, t, prompt = _inputs(4, seed=2)
    other = prompt.flip(0)
    fixed = torch.randn(4, *TINY.bottleneck_shape, generator=torch.Generator().manual_seed(3))
    handle = hook_module(model, "unet.middle").register_forward_hook(lambda m, i, o: fixed)
    with torch.no_grad():
        a, b = model(x, t, prompt), model(x, t, other)
    handle.remove()
    torch.testing.assert_close(a, b)
    with torch.no_grad():
        assert not torch.allclose(model(x, t, prompt), model(x, t, other))


def test_schedule_is_variance_preserving_and_monotone():
    t = torch.linspace(0, 1, 101)
    alpha, sigma = diffusion.alpha_sigma(t)
    torch.testing.assert_close(alpha.pow(2) + sigma.pow(2), torch.ones(101))
    assert (alpha[1:] <= alpha[:-1]).all() and alpha[-1] < 1e-6 and alpha[0] > 0.999


def test_ddim_is_deterministic_reports_every_step_and_stays_in_range():
    torch.manual_seed(4)
    model = ToyUNet(TINY).eval()
    _, _, prompt = _inputs(3)
    noise = diffusion.initial_noise(3, 16, seed=7)
    calls = []
    a = diffusion.ddim_sample(model, prompt, noise, 4, callback=lambda i, t: calls.append((i, t)))
    b = diffusion.sample_in_chunks(model, prompt, noise, 4, chunk=2)
    assert [i for i, _ in calls] == [0, 1, 2, 3] and calls[0][1] == 1.0
    torch.testing.assert_close(a, b)
    assert a.abs().max() <= 1


@pytest.mark.parametrize("gamma", [1.0, 0.4])
def test_ddim_with_the_exact_v_of_an_image_returns_that_image(gamma):
    x0 = torch.rand(2, 3, 16, 16) * 1.6 - 0.8  # RGB, inside the clipping range
    y0 = diffusion.to_model_space(x0, gamma)
    noise = diffusion.initial_noise(2, 16, seed=1)

    class Exact(torch.nn.Module):
        config = UNetConfig(chroma_scale=gamma)

        def forward(self, x, t, prompt):
            alpha, sigma = (a.view(-1, 1, 1, 1) for a in diffusion.alpha_sigma(t))
            eps = (x - alpha * y0) / sigma.clamp_min(1e-8)
            return alpha * eps - sigma * y0

    out = diffusion.ddim_sample(Exact(), torch.zeros(2, 2, dtype=torch.long), noise, 3)
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)


def test_model_space_is_brightness_plus_scaled_chroma_and_inverts():
    rgb = torch.randn(3, 3, 4, 4)
    y = diffusion.to_model_space(rgb, 0.25)
    torch.testing.assert_close(y[:, 0], rgb.sum(1) / 3**0.5)  # brightness axis, unscaled
    torch.testing.assert_close(y[:, 1], 0.25 * (rgb[:, 0] - rgb[:, 1]) / 2**0.5)
    torch.testing.assert_close(diffusion.to_rgb(y, 0.25), rgb, atol=1e-5, rtol=1e-5)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(5)
    model = ToyUNet(TINY).eval()
    world = W.WorldConfig(skew=W.skew_from_majority(0.7))
    save_model(model, world, tmp_path / "m.safetensors")
    loaded, loaded_world = load_model(tmp_path / "m.safetensors")
    assert loaded_world == world and loaded.config == TINY
    x, t, prompt = _inputs(2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, prompt), model(x, t, prompt))
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(FileNotFoundError, match="missing"):
        load_model(tmp_path / "missing.safetensors")


def test_saved_model_records_digests_and_a_damaged_file_is_refused(tmp_path):
    from diffbias_core.sae.formats import FormatError, digest_status, read_header

    torch.manual_seed(6)
    path = tmp_path / "m.safetensors"
    save_model(ToyUNet(TINY).eval(), W.WorldConfig(), path)
    assert digest_status(path) == "ok"
    header, _ = read_header(path)
    name = sorted(header)[0]
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little") + header[name]["data_offsets"][0]
    data[start] ^= 0xFF  # one byte of the first tensor's data
    path.write_bytes(bytes(data))
    with pytest.raises(FormatError, match=rf"m.safetensors.*{name}.*does not match the recorded digest"):
        load_model(path)


def test_shipped_model_file_records_digests():
    from diffbias_core.sae.formats import digest_status

    assert digest_status(WEIGHTS_DIR / MODEL_FILE) == "ok"


def test_a_few_training_steps_reduce_the_loss_of_a_tiny_model():
    config = ToyTrainConfig(steps=30, batch_size=16, lr=3e-3, warmup=5, ema_decay=0.0, unet=TINY)
    g = torch.Generator().manual_seed(9)
    scenes = W.sample_training_scenes(config.world, 64, g)
    x0 = W.render(scenes, 16)
    prompt = W.tokens(scenes.shape, torch.where(scenes.named, scenes.colour, -1))
    torch.manual_seed(config.seed)
    before = ToyUNet(TINY).requires_grad_(False)  # as load_model returns it: fine-tuning must still work
    trained = train_model(config, init=before, show_progress=False)

    def loss(m):
        return diffusion.v_loss(m, x0, prompt, torch.Generator().manual_seed(10)).item()

    assert loss(trained) < 0.8 * loss(before)


def test_train_config_validation():
    with pytest.raises(ValueError, match="steps"):
        ToyTrainConfig(steps=0)
    with pytest.raises(ValueError, match="image_size"):
        ToyTrainConfig(unet=UNetConfig(image_size=24))


def test_shipped_weights_are_small_and_learned_the_skew():
    path = WEIGHTS_DIR / MODEL_FILE
    assert path.stat().st_size <= 10 * 2**20
    report = json.loads((WEIGHTS_DIR / REPORT_FILE).read_text())
    assert set(report) >= {"train_config", "learned_bias"}
    model, world = load_model()
    n = 60
    shape = torch.arange(3).repeat_interleave(n)
    images = diffusion.sample_in_chunks(model, W.tokens(shape), diffusion.initial_noise(3 * n, 16, 11), 10)
    reading = oracles.read(images)
    assert (reading.shape == shape).float().mean() >= 0.9
    for k, row in enumerate(world.skew):
        majority = max(range(3), key=lambda c: row[c])
        share = (reading.colour[shape == k] == majority).float().mean().item()
        # Binomial margin of 4 standard errors around the skew the world was trained with.
        assert share >= row[majority] - 4 * math.sqrt(row[majority] * (1 - row[majority]) / n) - 0.1, (
            k,
            share,
        )


def test_shipped_sae_fits_the_bottleneck_of_the_shipped_model():
    from diffbias_core.sae.model import fvu
    from diffbias_core.toy.dissect import SAE_FILE, load_toy_sae
    from diffbias_core.toy.sampling import Recorder, generate

    sae = load_toy_sae(WEIGHTS_DIR / SAE_FILE)
    model, _ = load_model()
    assert (sae.hook, sae.model_family, sae.d_in) == ("unet.middle", "toy", model.config.bottleneck_shape[0])
    prompt = W.tokens(torch.arange(3).repeat(8), torch.arange(-1, 3).repeat_interleave(6))
    recorder = Recorder(24, 10, model.config.bottleneck_shape)
    generate(model, prompt, diffusion.initial_noise(24, 16, 12), 10, capture=recorder)
    x = sae.map_to_inputs(recorder.result().activations.flatten(0, 1))  # (24 * 10, 16, 64)
    assert fvu(x, sae(x)) < 0.3


def test_direction_edit_adds_the_class_difference_only_inside_the_window():
    from diffbias_core.toy.edits import Window, class_mean_directions, direction_edit
    from diffbias_core.toy.sampling import Captured, StepContext

    g = torch.Generator().manual_seed(13)
    acts = torch.randn(6, 4, 8, 2, 2, generator=g)  # (N, steps, C, H, W)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    directions = class_mean_directions(Captured(acts, torch.linspace(1, 0.25, 4)), labels, 3)
    for step in range(4):
        means = [acts[labels == c, step].mean(0) for c in range(3)]
        grand = sum(means) / 3
        for c in range(3):
            torch.testing.assert_close(directions[step, c], means[c] - grand)
    classes = torch.tensor([2, -1, 0])
    edit = direction_edit(directions, classes, Window(0.25, 0.75), scale=2.0)
    h = torch.randn(3, 8, 2, 2, generator=g)
    inside = edit(h, StepContext(slice(0, 3), 1, 0.75, 4))
    torch.testing.assert_close(inside[0], h[0] + 2 * directions[1, 2])
    torch.testing.assert_close(inside[1], h[1])
    torch.testing.assert_close(inside[2], h[2] + 2 * directions[1, 0])
    assert edit(h, StepContext(slice(0, 3), 3, 0.25, 4)) is h


def test_feature_edit_is_the_identity_for_a_neutral_spec_and_adds_decoder_rows_otherwise():
    from diffbias_core.attribute.features import FeatureSet
    from diffbias_core.intervene.intervention import EditSpec
    from diffbias_core.sae.model import SparseAutoencoder
    from diffbias_core.toy.edits import Window, feature_edit
    from diffbias_core.toy.sampling import StepContext

    torch.manual_seed(14)
    sae = SparseAutoencoder(8, 32, 4)
    ids = (torch.tensor([3, 5]), torch.tensor([7, 9]))
    features = FeatureSet(
        ("a", "b"), ids, (torch.ones(2), torch.ones(2)), sae.fingerprint(), sae.hook, "test"
    )
    h = torch.randn(2, 8, 2, 2)
    ctx = StepContext(slice(0, 2), 0, 1.0, 4)
    classes = torch.tensor([1, -1])
    neutral = feature_edit(sae, features, classes, EditSpec(mode="add", strength=0.0, top_k=2), Window(0, 1))
    assert neutral(h, ctx) is h
    edit = feature_edit(sae, features, classes, EditSpec(mode="add", strength=0.5, top_k=2), Window(0, 1))
    expected = h.clone()
    expected[0] += 0.5 * (sae.W_dec[7] + sae.W_dec[9]).detach().view(8, 1, 1)  # class 1, every position
    torch.testing.assert_close(edit(h, ctx), expected)
