"""GANs of healthy vertebrae (Miao et al. Table II), the gradient penalty, training, resume and shipped weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from SpineInpaintLib import SpineInpaintError, cli
from SpineInpaintLib.core.weights import sha256_of
from SpineInpaintLib.evaluation.inpainting import kmmd
from SpineInpaintLib.inpainting import networks as gan
from SpineInpaintLib.training.context import ContextTrainConfig, train_context
from SpineInpaintLib.training.gan import (
    _TABLE_II,
    GANTrainConfig,
    _pggan_schedule,
    gradient_penalty,
    load_crop_dataset,
    train_gan,
)

REPO = Path(__file__).resolve().parents[1]


def _disc_crops(rng: np.random.Generator, n: int) -> np.ndarray:
    yy, xx = np.mgrid[0:64, 0:64]
    out = np.zeros((n, 64, 64), np.float32)
    for k in range(n):
        cy, cx, r = rng.uniform(24, 40), rng.uniform(24, 40), rng.uniform(8, 16)
        out[k] = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r).astype(np.float32)
    return out


def _write_case(path, split: str, rng: np.random.Generator, n: int = 12) -> None:
    binary = _disc_crops(rng, n)
    holes = np.zeros((4, 64, 64), np.uint8)
    holes[:, 20:36, 20:36] = 1
    np.savez(path, binary=binary.astype(np.uint8), grey=(0.8 * binary).astype(np.float16),
             prior_binary=binary[::-1].astype(np.float16), prior_grey=(0.7 * binary[::-1]).astype(np.float16),
             level=np.full(n, 29), z=np.arange(n), prev=np.maximum(np.arange(n) - 1, 0),
             next=np.minimum(np.arange(n) + 1, n - 1), holes=holes, hole_crop=np.arange(4),
             hole_prev=np.array([-1, 0, 1, 2]), hole_next=np.array([1, 2, 3, -1]),
             hole_destructive=np.ones(4, bool), split=np.array(split))


@pytest.fixture
def crop_cache(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "cache"
    root.mkdir()
    _write_case(root / "a.npz", "train", rng)
    _write_case(root / "b.npz", "train", rng)
    _write_case(root / "c.npz", "val", rng)
    return root


# --- Table II architectures ---------------------------------------------------------------------------
def test_wgan_gp_is_four_5x5_transposed_convolutions_relu_sigmoid_without_batch_norm():
    g, d = gan.build_gan("wgan-gp", width=8, critic_width=8)
    deconvs = [m for m in g.modules() if isinstance(m, nn.ConvTranspose2d)]
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert len(deconvs) == 4 and all(m.kernel_size == (5, 5) and m.stride == (2, 2) for m in deconvs)
    assert len(convs) == 4 and all(m.kernel_size == (5, 5) and m.stride == (2, 2) for m in convs)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in list(g.modules()) + list(d.modules()))
    with torch.no_grad():
        x = g(torch.randn(3, gan.LATENT_DIM) * 10)
    assert x.shape == (3, 1, 64, 64) and float(x.min()) >= 0 and float(x.max()) <= 1
    assert d(x).shape == (3,)


def test_dcgan_has_batch_norm_and_tanh_output_mapped_to_unit_range():
    g, d = gan.build_gan("dcgan", width=8, critic_width=8)
    assert any(isinstance(m, nn.BatchNorm2d) for m in g.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in d.modules())
    assert all(m.kernel_size == (5, 5) for m in g.modules() if isinstance(m, nn.ConvTranspose2d))
    g.eval()
    # the last layer's tanh(t) maps to (t + 1) / 2: a zero pre-activation gives exactly 0.5
    nn.init.zeros_(g.convs[-1].weight)
    nn.init.zeros_(g.convs[-1].bias)
    assert torch.allclose(g(torch.randn(2, gan.LATENT_DIM)), torch.full((2, 1, 64, 64), 0.5))
    p = d.eval().probability(torch.rand(2, 1, 64, 64))
    assert p.shape == (2,) and bool(((p > 0) & (p < 1)).all())


def test_pggan_grows_from_4_to_64_pixels_with_3x3_convolutions():
    g, d = gan.build_gan("pggan", width=4, critic_width=4)
    kernels = {m.weight.shape[-1] for m in g.modules() if isinstance(m, gan._EqConv)}
    assert kernels == {1, 3}  # 3x3 features, 1x1 to-image heads
    z = torch.randn(2, gan.LATENT_DIM)
    for stage in range(5):
        img = g(z, stage, 0.5)
        assert img.shape == (2, 1, 4 * 2**stage, 4 * 2**stage)
        assert d(img, stage, 0.5).shape == (2,)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in g.modules())


def test_pggan_schedule_fades_each_new_stage_in_then_holds_it():
    total = 900
    stages = [_pggan_schedule(s, total) for s in range(total)]
    assert stages[0] == (0, 1.0) and stages[-1][0] == 4
    assert [s for s, _ in stages] == sorted(s for s, _ in stages)
    start4 = next(i for i, (s, _) in enumerate(stages) if s == 4)
    assert stages[start4][1] == pytest.approx(0.0, abs=0.01)
    assert stages[-1][1] == 1.0


def test_at_equal_width_wgan_gp_is_the_lightest_of_the_three():
    # the paper: "WGAN-GP with a lighter architecture has fewer parameters than the other two"
    counts = {m: tuple(gan.count_parameters(n) for n in gan.build_gan(m, 16, critic_width=16)) for m in gan.GAN_MODELS}
    assert sum(counts["wgan-gp"]) < sum(counts["dcgan"])
    assert sum(counts["wgan-gp"]) < sum(counts["pggan"])


def test_unknown_model_or_kind_is_a_user_error():
    with pytest.raises(SpineInpaintError, match="unknown GAN 'stylegan'"):
        gan.build_gan("stylegan")
    with pytest.raises(SpineInpaintError, match="unknown image kind"):
        gan.default_weights_path("wgan-gp", "colour")


# --- gradient penalty ------------------------------------------------------------------------------
def test_gradient_penalty_of_a_linear_critic_is_the_squared_norm_gap():
    w = torch.full((1, 1, 4, 4), 0.5)  # ||w|| = sqrt(16 * 0.25) = 2 -> penalty (2 - 1)^2 = 1

    def critic(x):
        return (x * w).flatten(1).sum(1)

    gp = gradient_penalty(critic, torch.rand(5, 1, 4, 4), torch.rand(5, 1, 4, 4))
    assert float(gp.detach()) == pytest.approx(1.0, rel=1e-6)


def test_gradient_penalty_takes_the_norm_per_sample_over_all_pixels():
    # D(x) = ||x||^2 / 2 has gradient x; with real == fake every interpolate is x itself.
    x = torch.zeros(2, 1, 3, 3)
    x[0].fill_(1.0)  # norm 3
    x[1, 0, 0, 0] = 0.5  # norm 0.5

    def critic(t):
        return 0.5 * (t ** 2).flatten(1).sum(1)

    gp = gradient_penalty(critic, x, x.clone())
    expected = ((3.0 - 1.0) ** 2 + (0.5 - 1.0) ** 2) / 2  # not the norm over the whole batch
    assert float(gp.detach()) == pytest.approx(expected, rel=1e-6)


def test_paper_settings_of_each_gan():
    w = GANTrainConfig(model="wgan-gp").resolved()
    assert (w.n_critic, w.lr, w.betas, w.gp_lambda) == (5, 1e-4, (0.0, 0.9), 10.0)
    d = GANTrainConfig(model="dcgan").resolved()
    assert (d.n_critic, d.lr, d.betas) == (1, 2e-4, (0.5, 0.999))
    p = GANTrainConfig(model="pggan").resolved()
    assert (p.n_critic, p.lr, p.betas) == (1, 1e-3, (0.0, 0.99))


# --- KMMD ------------------------------------------------------------------------------------------
def test_kmmd_is_zero_for_the_same_set_and_positive_for_different_sets():
    rng = np.random.default_rng(1)
    a = _disc_crops(rng, 20)
    same = kmmd(a, a.copy())
    assert same["kmmd2_biased"] == pytest.approx(0.0, abs=1e-12)
    other = kmmd(a, np.zeros_like(a) + rng.random(a.shape).astype(np.float32))
    assert other["kmmd2_unbiased"] > 0.1 and other["n_x"] == 20


# --- training, resume, weights ------------------------------------------------------------------------
def test_train_wgan_gp_writes_outputs_and_resumes(crop_cache, tmp_path):
    out = tmp_path / "run"
    cfg = GANTrainConfig(model="wgan-gp", data=str(crop_cache), out=str(out), epochs=2, iters_per_epoch=2,
                             batch_size=4, width=4, critic_width=4, n_critic=2, progress=False)
    summary = train_gan(cfg)
    assert (out / "checkpoint.pt").exists() and (out / "samples" / "epoch_002.png").exists()
    assert (out / "curves.png").exists() and (out / "wgan-gp_samples.png").exists()
    meta = json.loads((out / "wgan-gp_generator.json").read_text())
    assert meta["sha256"] == sha256_of(out / "wgan-gp_generator.safetensors")
    assert meta["architecture"]["table_ii"]["batch_norm"] is False and meta["seed"] == 0
    assert "kmmd2_unbiased" in summary["metrics"]["val_kmmd"]
    # resume: two more epochs continue from epoch 2
    train_gan(GANTrainConfig(**{**cfg.__dict__, "epochs": 4, "resume": True}))
    rows = (out / "metrics.csv").read_text().strip().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4"]
    g, d, meta = gan.load_gan("wgan-gp", "binary", out)
    assert meta["epochs_done"] == 4 and g(torch.randn(1, gan.LATENT_DIM)).shape == (1, 1, 64, 64)


def test_training_is_repeatable_with_a_seed(crop_cache, tmp_path):
    weights = []
    for k in range(2):
        cfg = GANTrainConfig(model="dcgan", data=str(crop_cache), out=str(tmp_path / f"r{k}"), epochs=1,
                                 iters_per_epoch=2, batch_size=4, width=4, critic_width=4, seed=3, progress=False)
        train_gan(cfg)
        g, _, _ = gan.load_gan("dcgan", "binary", tmp_path / f"r{k}")
        weights.append(torch.cat([p.flatten() for p in g.parameters()]))
    assert torch.equal(weights[0], weights[1])


@pytest.mark.slow
def test_pggan_and_context_train_and_save(crop_cache, tmp_path):
    train_gan(GANTrainConfig(model="pggan", data=str(crop_cache), out=str(tmp_path / "p"), epochs=1,
                                     iters_per_epoch=5, batch_size=4, width=2, critic_width=2, progress=False))
    g, _, meta = gan.load_gan("pggan", "binary", tmp_path / "p")
    # 5 iterations of 5 finish stage 4's fade-in; the shipped generator keeps what growth reached
    assert meta["pggan_growth"]["resolution"] == 64 and (g.stage, g.alpha) == (4, meta["pggan_growth"]["alpha"])
    assert g(torch.randn(2, gan.LATENT_DIM)).shape == (2, 1, 64, 64)
    summary = train_context(ContextTrainConfig(data=str(crop_cache), out=str(tmp_path / "c"), epochs=1,
                                                       iters_per_epoch=2, batch_size=4, width=4, critic_width=4,
                                                       progress=False))
    assert summary["architecture"]["in_channels"] == gan.CONTEXT_CHANNELS
    net, meta = gan.load_context("binary", tmp_path / "c")
    assert net(torch.zeros(2, gan.CONTEXT_CHANNELS, 64, 64)).shape == (2, 1, 64, 64)


def test_missing_cache_or_weights_is_a_user_error(tmp_path):
    with pytest.raises(SpineInpaintError, match="no cached crops"):
        load_crop_dataset(tmp_path)
    with pytest.raises(SpineInpaintError, match="no binary dcgan weights"):
        gan.load_gan("dcgan", "binary", tmp_path)


def test_cli_train_gan_rejects_bad_arguments(capsys):
    assert cli.main(["train", "gan", "--model", "biggan", "--phantoms", "0"]) == 2
    assert "unknown GAN 'biggan'" in capsys.readouterr().err


# --- shipped weights ---------------------------------------------------------------------------------
@pytest.mark.parametrize("model", gan.GAN_MODELS)
def test_shipped_binary_gans_load_verify_and_sample(model):
    path = gan.default_weights_path(model, "binary")
    if not path.exists():
        pytest.skip(f"{path.name} not shipped")
    g, d, meta = gan.load_gan(model, "binary")
    assert path.stat().st_size < 40e6 and gan.default_weights_path(model, "binary", "critic").stat().st_size < 40e6
    images = gan.sample(g, 8, seed=0)
    assert images.shape == (8, 64, 64) and images.min() >= 0 and images.max() <= 1
    assert meta["kind"] == "binary" and meta["architecture"]["table_ii"] == _TABLE_II[model]


@pytest.mark.slow
def test_torchrun_two_processes_train_one_model(crop_cache, tmp_path):
    out = tmp_path / "ddp"
    code = ("import sys; from SpineInpaintLib.training import gan; gan.train_gan(gan.GANTrainConfig(model='wgan-gp', "
            f"data=r'{crop_cache}', out=r'{out}', epochs=1, iters_per_epoch=2, batch_size=4, width=4, "
            "critic_width=4, n_critic=1, device='cpu', threads=1, progress=False))")
    script = tmp_path / "run.py"
    script.write_text(code)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           "29517", str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "wgan-gp_generator.safetensors").exists()
