"""Semantic inpainting (Yeh et al. z search, context generator), blending, baselines, paste-back and bad holes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from SpineInpaintLib import SpineInpaintError
from SpineInpaintLib.core import io
from SpineInpaintLib.core.weights import save_weights
from SpineInpaintLib.evaluation.inpainting import score_binary
from SpineInpaintLib.evaluation.metrics import overlap as metrics
from SpineInpaintLib.inpainting import methods as inpainting
from SpineInpaintLib.inpainting import networks as gan
from SpineInpaintLib.inpainting.crops import CROP_FOV_MM
from SpineInpaintLib.inpainting.restore import restore_ct, restore_mask
from SpineInpaintLib.training.gan import GANTrainConfig, _gan_metadata
from SpineInpaintLib.training.holes import case_training_arrays


# --- fixtures: a synthetic spine on an oblique-free but flipped (RAS) grid ------------------------------
def _spine_volume(direction=np.diag([-1.0, -1.0, 1.0])) -> tuple[io.Volume, io.Volume]:
    """Three stacked elliptic 'vertebrae' (L4 below, L3, L2 above), 1 mm pixels, 2 mm slices."""
    nz, ny, nx = 30, 110, 110
    labels = np.zeros((nz, ny, nx), np.uint8)
    yy, xx = np.mgrid[0:ny, 0:nx]
    body = ((yy - 55) / 14.0) ** 2 + ((xx - 55) / 18.0) ** 2 < 1.0
    for level, (z0, z1) in ((28, (1, 9)), (29, (11, 19)), (30, (21, 29))):
        labels[z0:z1][:, body] = level
    ct = np.where(labels > 0, 400.0, 40.0).astype(np.float32)
    ct += np.linspace(0, 50, nx)[None, None, :].astype(np.float32)  # a ramp: orientation mistakes show
    geometry = dict(spacing=(1.0, 1.0, 2.0), origin=(10.0, -20.0, 5.0), direction=direction)
    return io.Volume(ct, **geometry), io.Volume(labels, **geometry)


class _Ones(nn.Module):
    """A stand-in context generator that fills every hole with 1 (bone)."""

    width = 1

    def forward(self, x):
        return torch.ones_like(x[:, :1])


class _FakeCache(inpainting.ModelCache):
    def context(self, kind):
        return _Ones(), {}


# --- Eq. 3 weights, prior loss, z search ---------------------------------------------------------------
def test_contextual_weights_plain_mask_and_near_hole_importance():
    hole = torch.zeros(1, 1, 16, 16)
    hole[..., 6:10, 6:10] = 1
    plain = inpainting.contextual_weights(hole)
    assert torch.equal(plain, 1 - hole)
    weighted = inpainting.contextual_weights(hole, near_weight=1.0)
    assert float(weighted[0, 0, 7, 7]) == 0.0  # inside the hole
    assert float(weighted[0, 0, 0, 0]) == 1.0  # far from it: the plain weight
    assert float(weighted[0, 0, 7, 5]) > float(weighted[0, 0, 7, 3]) > 1.0  # the closer, the heavier


def test_prior_loss_is_minus_critic_score_for_wgan_and_log_one_minus_d_otherwise():
    critic = lambda x: x.flatten(1).mean(1) * 4 - 1  # noqa: E731
    x = torch.rand(3, 1, 8, 8)
    score = critic(x)
    assert torch.allclose(inpainting._prior_loss(critic, "wgan-gp", x), -score)
    assert torch.allclose(inpainting._prior_loss(critic, "dcgan", x), torch.log(1 - torch.sigmoid(score)), atol=1e-6)


class _Brightness(nn.Module):
    """G(z) = sigmoid(z_0) * template: the z search must find the brightness of the known pixels."""

    latent_dim = 4

    def __init__(self):
        super().__init__()
        self.template = torch.zeros(1, 1, 64, 64)
        self.template[..., 16:48, 16:48] = 1.0
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, z):
        return torch.sigmoid(z[:, :1, None, None]) * self.template


class _NoPrior(nn.Module):
    def forward(self, x):
        return torch.zeros(x.shape[0])


def test_z_search_fills_the_hole_consistently_with_the_known_pixels():
    g = _Brightness()
    critic = _NoPrior()
    known = np.stack([0.8 * g.template[0, 0].numpy(), 0.3 * g.template[0, 0].numpy()])
    hole = np.zeros_like(known)
    hole[:, 24:40, 24:40] = 1
    generated, loss = inpainting.optimise_latent(g, critic, "wgan-gp", known * (1 - hole), hole, restarts=3,
                                                 steps=120, lr=0.2, seed=0)
    assert generated[0, 30, 30] == pytest.approx(0.8, abs=0.01)
    assert generated[1, 30, 30] == pytest.approx(0.3, abs=0.01)
    assert loss.shape == (2,) and np.all(loss < 0.05 * 32 * 32)


# --- blending and baselines ---------------------------------------------------------------------------
def test_poisson_blend_keeps_the_generated_gradients_and_the_known_boundary():
    ramp = np.tile(np.linspace(0.1, 0.7, 32, dtype=np.float32), (32, 1))
    hole = np.zeros((32, 32), np.float32)
    hole[8:20, 10:25] = 1
    out = inpainting.poisson_blend(ramp, ramp + 0.2, hole)  # same gradients, offset by 0.2
    np.testing.assert_allclose(out, ramp, atol=1e-5)
    plain = inpainting._blend(ramp[None], (ramp + 0.2)[None], hole[None], "plain")[0]
    assert plain[10, 12] == pytest.approx(ramp[10, 12] + 0.2) and plain[0, 0] == ramp[0, 0]


def test_biharmonic_reproduces_a_linear_image_and_nearest_interpolates_along_z():
    z, y, x = np.mgrid[0:5, 0:20, 0:20].astype(np.float32)
    image = 2.0 * x + y
    hole = np.zeros(image.shape, bool)
    hole[2, 5:12, 6:14] = True
    filled = inpainting.biharmonic_fill(np.where(hole, 0, image), hole)
    np.testing.assert_allclose(filled[hole], image[hole], atol=1e-3)
    stack = np.zeros((5, 4, 4), np.float32) + np.arange(5, dtype=np.float32)[:, None, None] * 10
    hole = np.zeros(stack.shape, bool)
    hole[1:3, 1:3, 1:3] = True
    out = inpainting.nearest_slice_fill(np.where(hole, -1, stack), hole)
    assert out[1, 1, 1] == pytest.approx(10.0) and out[2, 2, 2] == pytest.approx(20.0)


# --- volume restoration: geometry, paste-back scaling, degenerate holes --------------------------------
def test_restore_mask_keeps_the_grid_and_restores_an_intact_cortex_hole():
    ct, labels = _spine_volume()
    hole = np.zeros(labels.shape, np.uint8)
    hole[13:17, 51:59, 47:57] = 1  # inside L3's body
    truth = labels.array > 0
    for method in ("biharmonic", "nearest"):
        result = restore_mask(labels, labels.with_array(hole), method=method)
        assert result.restored.same_grid(labels) and result.levels == [29]
        assert np.array_equal(result.restored.array > 0, truth)  # bone inside, nothing moved outside
        assert np.array_equal(result.restored_labels.array, labels.array)


def test_context_paste_back_maps_crop_pixels_to_millimetres():
    ct, labels = _spine_volume()
    hole = np.zeros(labels.shape, np.uint8)
    hole[14, 47:63, 55:110] = 1  # from the body's centre to 55 mm towards the array's +x edge
    result = restore_mask(labels, labels.with_array(hole), method="context", models=_FakeCache())
    filled = result.restored.array[14] > 0
    # the crop spans 96 mm (+-48 mm) around the vertebra's centre (1 mm grid): a generator
    # output of 1 reaches as far as the crop, the rest of the hole (beyond its field of view) becomes 0
    known = (labels.array == 29) & (hole == 0)
    centre = np.average(np.nonzero(known)[2])  # the crop's centre column (the level's known voxels)
    reach = CROP_FOV_MM / 2 - 0.5 * CROP_FOV_MM / 64  # to the centre of the crop's last pixel
    columns = np.nonzero(filled[55])[0]
    last = int(np.floor(centre + reach))
    assert columns.max() == last and filled[55, 55:last + 1].all()
    assert result.info["hole_voxels_outside_crop"] > 0
    assert np.array_equal(filled[hole[14] == 0], labels.array[14][hole[14] == 0] > 0)


def test_restore_ct_fills_only_the_hole_and_keeps_dtype_and_geometry():
    ct, labels = _spine_volume(direction=np.eye(3))
    hole = np.zeros(labels.shape, np.uint8)
    hole[13:17, 51:59, 47:57] = 1
    lesioned = ct.with_array(np.where(hole > 0, 1500.0, ct.array).astype(np.float32))
    result = restore_ct(lesioned, labels, labels.with_array(hole), method="biharmonic")
    assert result.restored.same_grid(ct) and result.restored.array.dtype == np.float32
    assert np.array_equal(result.restored.array[hole == 0], ct.array[hole == 0])
    inside = result.restored.array[hole > 0]
    assert np.all(np.abs(inside - ct.array[hole > 0]) < 30)  # bone HU plus the ramp, no lesion left


def test_empty_hole_and_hole_outside_the_spine_are_no_ops_with_a_warning():
    ct, labels = _spine_volume()
    empty = np.zeros(labels.shape, np.uint8)
    with pytest.warns(UserWarning, match="empty"):
        result = restore_mask(labels, empty, method="biharmonic")
    assert result.noop == "the hole mask is empty" and np.array_equal(result.restored.array, labels.array > 0)
    far = np.zeros(labels.shape, np.uint8)
    far[14, 0:4, 0:4] = 1  # in the corner, 45 mm from any vertebra
    with pytest.warns(UserWarning, match="outside the spine"):
        result = restore_ct(ct, labels, far, method="context", models=_FakeCache())
    assert result.noop and np.array_equal(result.restored.array, ct.array)


def test_a_hole_covering_the_whole_crop_leaves_nothing_to_condition_on():
    ct, labels = _spine_volume()
    hole = np.zeros(labels.shape, np.uint8)
    hole[14] = 1  # the whole slice (110 x 110 mm > the crop's 96 mm)
    with pytest.raises(SpineInpaintError, match="nothing left to condition on"):
        restore_mask(labels, hole, method="context", models=_FakeCache())
    stack = np.zeros((1, 3, 64, 64), np.float32)
    with pytest.raises(SpineInpaintError, match="nothing left to condition on"):
        inpainting.inpaint_crops(stack, np.ones_like(stack), method="wgan-gp", models=_FakeCache())


def test_bad_inputs_are_user_errors():
    ct, labels = _spine_volume()
    with pytest.raises(SpineInpaintError, match="unknown inpainting method"):
        restore_mask(labels, np.zeros(labels.shape), method="diffusion")
    with pytest.raises(SpineInpaintError, match="has shape"):
        restore_mask(labels, np.zeros((3, 3, 3)))
    with pytest.raises(SpineInpaintError, match="unknown blending"):
        restore_mask(labels, np.zeros(labels.shape), blend="alpha")
    with pytest.raises(SpineInpaintError, match="same grid"):
        shifted = io.Volume(ct.array, spacing=(2.0, 1.0, 2.0))
        restore_ct(shifted, labels, np.zeros(labels.shape))


def test_z_optimisation_runs_batched_with_a_real_gan(tmp_path):
    """All slices and restarts in one batch, with randomly initialised nets saved like the shipped ones."""
    cfg = GANTrainConfig(model="wgan-gp", width=4, critic_width=4).resolved()
    g, d = gan.build_gan("wgan-gp", 4, critic_width=4)
    for part, net in (("generator", g), ("critic", d)):
        save_weights(net, tmp_path / gan.default_weights_path("wgan-gp", "binary", part).name,
                              _gan_metadata(cfg, g, d, part, {}))
    ct, labels = _spine_volume()
    hole = np.zeros(labels.shape, np.uint8)
    hole[12:18, 37:59, 47:63] = 1  # breaks the outline of L3's body
    result = restore_mask(labels, hole, method="wgan-gp", models=inpainting.ModelCache(tmp_path),
                                     steps=3, restarts=2, keep_crops=True)
    assert result.slices == 6 and result.crops["restored"].shape == (6, 64, 64)
    unchanged = hole == 0
    assert np.array_equal(result.restored.array[unchanged], (labels.array > 0)[unchanged])


def test_scores_on_hand_made_masks():
    truth = np.zeros((6, 20, 20), bool)
    truth[1:5, 5:15, 5:15] = True
    hole = np.zeros_like(truth)
    hole[2:4, 8:18, 8:18] = True
    perfect = score_binary(truth.copy(), truth, hole, (2.0, 1.0, 1.0))
    assert perfect["dice_in"] == 1.0 and perfect["hd95_in"] == 0.0 and perfect["dice_around"] == 1.0
    missing = truth & ~hole
    worse = score_binary(missing, truth, hole, (2.0, 1.0, 1.0))
    assert worse["dice_in"] == 0.0 and worse["hd95_in"] == float("inf")
    assert worse["dice_around"] == pytest.approx(metrics.dice(missing & ~np.zeros_like(hole), truth), abs=0.2)


def test_training_arrays_match_the_dataset_crops():
    from SpineInpaintLib.data import cases as datasets

    case = datasets.phantom_case(5, lesion_types=None, shape_xy=(160, 160), levels=("L2", "L3"), n_slices=40)
    arrays = case_training_arrays(case, lesions_per_level=0)
    crops, meta = datasets.vertebra_crops(case, binary=True)
    assert np.array_equal(arrays["binary"].astype(np.float32), crops)
    assert [m["z"] for m in meta] == arrays["z"].tolist()
    # the prior of a slice is the neighbour vertebra's crop at the same relative height (never itself)
    assert arrays["prior_binary"].shape == arrays["binary"].shape and arrays["prior_binary"].max() > 0
