"""Semantic inpainting of lesioned vertebrae (Miao et al. section II.D, after Yeh et al. 2017) and baselines.

Two tasks, on volumes in any orientation (work is done on LPS-oriented axial slices, results are
returned on the input's grid):

- *binary* (:func:`restore_mask`, the paper's): restore the vertebra mask inside the hole;
- *grey* (:func:`restore_ct`, our addition): restore the CT's HU inside the hole.

The hole (the lesion region to replace) is given as a mask; the spine labels locate the affected
vertebra. Each affected axial slice is cut to the GAN's 64x64 crop (a fixed 96 mm field of view
centred on the vertebra, :func:`SpineInpaintLib.datasets.crop_slice`), all slices of a lesion are
inpainted in one batch, and the result is pasted back into the full-resolution slice by sampling
the crop at each hole voxel's crop coordinate (bilinear), so the 1.5 mm crop pixels meet the
scan's own pixel size exactly.

Methods (``method=``)
    ``'context'`` (default; our improvement)
        :class:`~SpineInpaintLib.gan.ContextGenerator`: one forward pass from the known pixels of
        the slice and its two neighbours (2.5D) and a shape prior from the adjacent healthy
        vertebrae at the same relative height (HealthiVert-GAN's idea), trained against a WGAN-GP
        critic; predictions are smoothed along z inside the hole to keep neighbouring slices
        consistent in 3D.
    ``'wgan-gp'``, ``'dcgan'``, ``'pggan'`` (the paper's)
        Yeh et al.'s semantic inpainting with the unconditional GAN: optimise z (Adam, several
        restarts per slice in the batch dimension) for the contextual loss (Eq. 3, L1 on the known
        pixels, optionally weighted near the hole) plus lambda x a prior loss, then blend (Eq. 2).
        The prior loss fits each GAN: Eq. 4's ``log(1 - D(G(z)))`` for DCGAN and PGGAN, whose
        discriminators end in a sigmoid; a WGAN critic gives a score, not a probability, so
        ``log(1 - D)`` does not apply and ``-D(G(z))`` (the generator's own WGAN loss) is used.
    ``'biharmonic'``
        :func:`skimage.restoration.inpaint_biharmonic` on each full-resolution slice.
    ``'nearest'``
        Linear interpolation along z between the nearest slices above and below that the hole
        does not touch.

Blending: ``'plain'`` (Eq. 2) or ``'poisson'`` (the generated gradients inside the hole, the
known pixels as the boundary condition; Perez et al. 2003).

Degenerate holes: an empty hole is a no-op (the input comes back, ``result.noop`` says why, and a
:class:`UserWarning` is issued); a hole that touches no vertebra is a no-op too; a hole that
covers a whole crop leaves nothing to condition on and raises :class:`SpineInpaintError`.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from SpineInpaintLib import SpineInpaintError, io
from SpineInpaintLib.datasets import CROP_FOV_MM, CROP_SIZE, CROP_WINDOW, crop_slice, spine_mask

__all__ = [
    "METHODS",
    "GAN_METHODS",
    "InpaintingResult",
    "restore_mask",
    "restore_ct",
    "inpaint_crops",
    "optimise_latent",
    "contextual_weights",
    "poisson_blend",
    "biharmonic_fill",
    "nearest_slice_fill",
    "context_input",
    "random_hole",
    "case_training_arrays",
    "ModelCache",
]

#: Every method :func:`restore_mask` / :func:`restore_ct` knows.
METHODS: tuple[str, ...] = ("context", "wgan-gp", "dcgan", "pggan", "biharmonic", "nearest")
#: The paper's z-optimisation methods.
GAN_METHODS: tuple[str, ...] = ("wgan-gp", "dcgan", "pggan")
#: Fraction of a level's largest slice area below which a slice is not part of the level's crop stack
#: (as :func:`SpineInpaintLib.datasets.vertebra_crops`).
MIN_AREA_FRACTION = 0.25
_VERTEBRA_IDS = tuple(range(25, 51))
#: Gaussian sigma (mm) along z with which the context generator's fills are smoothed inside the hole
#: (0, 1.5 and 3 mm were compared: 3 mm gave the best Dice/HD95 and a slice-to-slice change closest
#: to the healthy truth's).
CONTEXT_Z_SIGMA_MM = 3.0


# --------------------------------------------------------------------------------------------
# Geometry: a vertebra's crop stack
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class LevelGeometry:
    """Where a vertebra's crops are cut (on the LPS-oriented arrays).

    ``centre_rc`` is the in-plane centroid of the level's label over all its slices (voxels in the
    hole left out); ``slices`` are the slices whose area is at least :data:`MIN_AREA_FRACTION` of
    the largest; ``z0``/``z1`` their first and last.
    """

    level: int
    centre_rc: tuple[float, float]
    slices: np.ndarray

    @property
    def z0(self) -> int:
        return int(self.slices.min())

    @property
    def z1(self) -> int:
        return int(self.slices.max())

    def relative_height(self, z: int) -> float:
        return float(np.clip((z - self.z0) / max(1, self.z1 - self.z0), 0.0, 1.0))


def level_geometry(labels: np.ndarray, level: int, hole: np.ndarray | None = None) -> LevelGeometry | None:
    """The crop geometry of ``level`` in a (z, y, x) LPS label array, or ``None`` if the level is absent.

    The hole's voxels count towards the level's area (a destroyed slice still belongs to it) but
    not towards its centre.
    """
    mask = labels == level
    if not mask.any():
        return None
    known = mask & ~hole if hole is not None else mask
    if not known.any():
        known = mask
    rows, cols = np.nonzero(known.any(axis=0))
    weights = known.sum(axis=0)[rows, cols]
    centre = (float(np.average(rows, weights=weights)), float(np.average(cols, weights=weights)))
    area_mask = mask | _hole_near(hole, mask) if hole is not None else mask
    areas = area_mask.reshape(area_mask.shape[0], -1).sum(axis=1)
    return LevelGeometry(level, centre, np.nonzero(areas >= MIN_AREA_FRACTION * areas.max())[0])


def _hole_near(hole: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The part of the hole within the in-plane bounding box of ``mask`` (the level's destroyed bone)."""
    rows, cols = np.nonzero(mask.any(axis=0))
    out = np.zeros_like(hole, dtype=bool)
    out[:, rows.min():rows.max() + 1, cols.min():cols.max() + 1] = hole[:, rows.min():rows.max() + 1,
                                                                        cols.min():cols.max() + 1]
    return out


def _crop(image2d: np.ndarray, geo: LevelGeometry, spacing_yx, order: int = 1, cval: float = 0.0) -> np.ndarray:
    return crop_slice(image2d, geo.centre_rc, spacing_yx, size=CROP_SIZE, fov_mm=CROP_FOV_MM, order=order, cval=cval)


def _grey(hu: np.ndarray) -> np.ndarray:
    lo, hi = CROP_WINDOW
    return np.clip((hu - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _neighbour_prior(levels: dict[int, LevelGeometry], level: int, z: int, spine: np.ndarray, grey_hu: np.ndarray | None,
                     spacing_yx, exclude: set[int] = frozenset()) -> tuple[np.ndarray, np.ndarray]:
    """Mean binary and grey crops of the adjacent vertebrae (level +- 1) at the same relative height.

    Zeros when neither neighbour is in the scan. Vertebrae are similar to their neighbours, so
    this is the patient's own best guess of the missing shape.
    """
    geo = levels[level]
    h = geo.relative_height(z)
    binary, grey = [], []
    for other in (level - 1, level + 1):
        g2 = levels.get(other)
        if g2 is None or other in exclude or other == 25 and level != 26:
            continue
        z2 = int(round(g2.z0 + h * (g2.z1 - g2.z0)))
        binary.append(_crop(spine[z2], g2, spacing_yx) >= 0.5)
        if grey_hu is not None:
            grey.append(_grey(_crop(grey_hu[z2], g2, spacing_yx, cval=-1000.0)))
    zeros = np.zeros((CROP_SIZE, CROP_SIZE), np.float32)
    return (np.mean(binary, axis=0).astype(np.float32) if binary else zeros,
            np.mean(grey, axis=0).astype(np.float32) if grey else zeros)


# --------------------------------------------------------------------------------------------
# Training arrays (used by gan.build_crop_cache)
# --------------------------------------------------------------------------------------------
def random_hole(rng: np.random.Generator, body: np.ndarray) -> np.ndarray:
    """A lesion-like hole (float32 0/1, 64x64) for training: a perturbed ellipse on or near the body outline,
    or one of the paper's 16x16 squares (20 %) inside the vertebra's bounding box."""
    size = body.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    rows, cols = np.nonzero(body)
    if rows.size == 0:
        rows, cols = np.array([size // 2]), np.array([size // 2])
    if rng.random() < 0.2:
        k = int(rng.integers(0, rows.size))
        r0 = int(np.clip(rows[k] - 8, 0, size - 16))
        c0 = int(np.clip(cols[k] - 8, 0, size - 16))
        hole = np.zeros((size, size), np.float32)
        hole[r0:r0 + 16, c0:c0 + 16] = 1.0
        return hole
    edge = body & ~ndimage.binary_erosion(body)
    er, ec = np.nonzero(edge)
    if er.size and rng.random() < 0.7:  # destructive-like: centred on the outline, mostly anterior
        anterior = er <= np.percentile(er, 50)
        pick = np.nonzero(anterior)[0] if rng.random() < 0.7 and anterior.any() else np.arange(er.size)
        k = int(rng.choice(pick))
        cy, cx = er[k] + rng.normal(0, 2), ec[k] + rng.normal(0, 2)
    else:  # inside the bone
        k = int(rng.integers(0, rows.size))
        cy, cx = rows[k], cols[k]
    a, b = rng.uniform(4, 15, 2)
    t = rng.uniform(0, np.pi)
    u = (xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)
    v = -(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)
    r = (u / a) ** 2 + (v / b) ** 2
    noise = ndimage.zoom(rng.normal(0, 0.25, (8, 8)), size / 8, order=1)
    hole = (r + noise < 1.0).astype(np.float32)
    if hole.sum() < 4:
        hole[int(np.clip(cy, 0, size - 1)), int(np.clip(cx, 0, size - 1))] = 1.0
    return hole


def case_training_arrays(case, *, lesions_per_level: int = 1, seed: int = 0, exclude_levels: Sequence[int] = (),
                         max_lesion_levels: int | None = None) -> dict[str, np.ndarray]:
    """Crops, priors, neighbour indices and simulated-lesion holes of one healthy case (see ``gan.build_crop_cache``).

    The crops are those of :func:`SpineInpaintLib.datasets.vertebra_crops` (same slices, centre and
    order); the holes are the masks of lesions simulated on the healthy case (70 % destructive,
    15 % with a collapse), cropped like the slices.
    """
    from SpineInpaintLib import lesions

    case = case.oriented("LPS")
    labels = case.labels.array
    spine = spine_mask(labels).astype(np.float32)
    hu = case.healthy_ct.array.astype(np.float32)
    spacing_yx = case.ct.spacing_zyx[1:]
    present = [v for v in np.unique(labels).tolist() if v in _VERTEBRA_IDS]
    levels = {v: level_geometry(labels, v) for v in present}
    rng = np.random.default_rng([seed, case.seed, 4242])
    lesion_levels = [v for v in sorted(present) if v != 25 and v not in exclude_levels]
    if max_lesion_levels is not None and len(lesion_levels) > max_lesion_levels:
        lesion_levels = sorted(rng.choice(lesion_levels, max_lesion_levels, replace=False).tolist())
    out: dict[str, list] = {k: [] for k in ("binary", "grey", "prior_binary", "prior_grey", "level", "z", "prev",
                                            "next", "holes", "hole_crop", "hole_prev", "hole_next",
                                            "hole_destructive")}
    for level in sorted(present):
        if level in exclude_levels:
            continue
        geo = levels[level]
        first = len(out["binary"])
        index = {int(z): first + k for k, z in enumerate(geo.slices)}
        for z in geo.slices:
            z = int(z)
            out["binary"].append((_crop(spine[z], geo, spacing_yx) >= 0.5).astype(np.uint8))
            out["grey"].append(_grey(_crop(hu[z], geo, spacing_yx, cval=-1000.0)).astype(np.float16))
            pb, pg = _neighbour_prior(levels, level, z, spine, hu, spacing_yx)
            out["prior_binary"].append(pb.astype(np.float16))
            out["prior_grey"].append(pg.astype(np.float16))
            out["level"].append(level)
            out["z"].append(z)
            out["prev"].append(index.get(z - 1, index[z]))
            out["next"].append(index.get(z + 1, index[z]))
        if level not in lesion_levels:
            continue
        for k in range(lesions_per_level):
            try:
                lesion = lesions.simulate_lesion(
                    case.healthy_ct, case.labels, level, str(rng.choice(["lytic", "sclerotic", "mixed"])),
                    bool(rng.random() < 0.7), size=float(rng.uniform(0.35, 0.8)),
                    collapse=float(rng.uniform(0.1, 0.3)) if rng.random() < 0.15 else 0.0,
                    seed=int(rng.integers(0, 2**31 - 1)))
            except SpineInpaintError:
                continue
            mask = lesion.mask.array > 0
            entries = {}
            for z in geo.slices:
                z = int(z)
                if not mask[z].any():
                    continue
                hole = _crop(mask[z].astype(np.float32), geo, spacing_yx) > 0.01
                if not hole.any() or hole.all():
                    continue
                entries[z] = len(out["holes"])
                out["holes"].append(hole.astype(np.uint8))
                out["hole_crop"].append(index[z])
                out["hole_destructive"].append(bool(lesion.destructive))
            for z, h in entries.items():
                out["hole_prev"].append(entries.get(z - 1, -1))
                out["hole_next"].append(entries.get(z + 1, -1))
    empty = np.zeros((0, CROP_SIZE, CROP_SIZE), np.float32)
    arrays = {k: (np.stack(v) if v else empty) if k in ("binary", "grey", "prior_binary", "prior_grey", "holes")
              else np.asarray(v, dtype=np.int64 if k != "hole_destructive" else bool) for k, v in out.items()}
    arrays["case_id"] = np.array(case.case_id)
    arrays["spacing_zyx"] = np.asarray(case.ct.spacing_zyx)
    return arrays


# --------------------------------------------------------------------------------------------
# Crop-level inpainting
# --------------------------------------------------------------------------------------------
def context_input(images: torch.Tensor, holes: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """The :class:`~SpineInpaintLib.gan.ContextGenerator` input (B, 7, H, W).

    ``images`` and ``holes`` are (B, 3, H, W) for slices z-1, z, z+1 (hole 1 = unknown; the image
    values there are ignored); ``prior`` is (B, H, W).
    """
    known = images * (1.0 - holes)
    parts = [t for k in range(3) for t in (known[:, k:k + 1], holes[:, k:k + 1])]
    return torch.cat(parts + [prior[:, None]], dim=1)


def contextual_weights(hole: torch.Tensor, window: int = 7, near_weight: float = 0.0) -> torch.Tensor:
    """Weights of the contextual loss (Eq. 3) on the known pixels, (B, 1, H, W).

    ``near_weight = 0`` gives the paper's plain mask ``M`` (1 on known pixels); otherwise Yeh et
    al.'s importance weighting is added: each known pixel gains ``near_weight`` x the fraction of
    hole pixels in its ``window`` x ``window`` neighbourhood, so the pixels that touch the hole
    count most.
    """
    known = 1.0 - hole
    if near_weight <= 0:
        return known
    frac = F.avg_pool2d(hole, window, stride=1, padding=window // 2, count_include_pad=False)
    return known * (1.0 + near_weight * frac * window * window / 8.0)


def _prior_loss(critic: torch.nn.Module, model: str, images: torch.Tensor) -> torch.Tensor:
    """Per-sample prior loss: ``-D(G(z))`` for the WGAN critic, ``log(1 - sigmoid(D))`` otherwise (Eq. 4)."""
    score = critic(images)
    if model == "wgan-gp":
        return -score
    return -F.softplus(score)  # log(1 - sigmoid(s)) = -softplus(s), numerically stable


def optimise_latent(generator: torch.nn.Module, critic: torch.nn.Module, model: str, known: np.ndarray,
                    hole: np.ndarray, *, restarts: int = 4, steps: int = 200, lr: float = 0.05,
                    prior_weight: float | None = None, near_weight: float = 0.0, shape_prior: np.ndarray | None = None,
                    shape_weight: float = 0.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Yeh et al.'s z search, batched over slices and restarts.

    Minimises, per slice and restart, ``L = sum W |G(z) - F| + lambda * prior(G(z))`` (Eqs. 3-5) with
    Adam on z; ``shape_weight > 0`` adds ``shape_weight * sum hole |G(z) - P|`` towards a shape prior
    ``P`` (the adjacent vertebrae; our option, off in the paper's method). Keeps the restart with the
    lowest final loss.

    Parameters
    ----------
    known, hole
        (N, 64, 64) images in [0, 1] and holes (1 = unknown).
    prior_weight
        lambda; default 0.003 (Yeh et al.) for the log-probability losses, 0.01 for the critic score.

    Returns
    -------
    generated
        (N, 64, 64) best G(z) per slice, in [0, 1].
    loss
        (N,) its final loss.
    """
    n = known.shape[0]
    if prior_weight is None:
        prior_weight = 0.01 if model == "wgan-gp" else 0.003
    gen = torch.Generator().manual_seed(int(seed))
    x = torch.as_tensor(known, dtype=torch.float32)[:, None].repeat_interleave(restarts, 0)
    h = torch.as_tensor(hole, dtype=torch.float32)[:, None].repeat_interleave(restarts, 0)
    w = contextual_weights(h, near_weight=near_weight)
    p = None
    if shape_prior is not None and shape_weight > 0:
        p = torch.as_tensor(shape_prior, dtype=torch.float32)[:, None].repeat_interleave(restarts, 0)
    z = torch.randn(n * restarts, generator.latent_dim, generator=gen).requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    for module in (generator, critic):
        for q in module.parameters():
            q.requires_grad_(False)
    raw = model == "pggan"  # PGGAN's eval output is clamped (no gradient outside [0, 1]): optimise the raw output
    generator.train(raw)
    try:
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            g = generator(z)
            loss = _latent_loss(g, x, w, h, p, shape_weight, critic, model, prior_weight)
            loss.sum().backward()
            opt.step()
        with torch.no_grad():
            g = generator(z)
            loss = _latent_loss(g, x, w, h, p, shape_weight, critic, model, prior_weight)
    finally:
        generator.eval()
        for module in (generator, critic):
            for q in module.parameters():
                q.requires_grad_(True)
    loss = loss.view(n, restarts)
    best = loss.argmin(dim=1)
    g = g.clamp(0, 1).view(n, restarts, *g.shape[1:])[torch.arange(n), best, 0]
    return g.numpy(), loss[torch.arange(n), best].numpy()


def _latent_loss(g, x, w, h, p, shape_weight, critic, model, prior_weight) -> torch.Tensor:
    contextual = (w * (g - x).abs()).flatten(1).sum(1)
    loss = contextual + prior_weight * _prior_loss(critic, model, g)
    if p is not None:
        loss = loss + shape_weight * (h * (g - p).abs()).flatten(1).sum(1)
    return loss


def poisson_blend(known: np.ndarray, generated: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """Poisson blending of one 2D image: inside the hole solve ``lap f = lap g`` with ``f = known`` outside.

    Pixels at the image border use the neighbours that exist (Neumann). Returns the blended image.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.linalg import spsolve

    hole = hole > 0.5
    out = np.where(hole, generated, known).astype(np.float64)
    if not hole.any():
        return out.astype(np.float32)
    idx = -np.ones(hole.shape, np.int64)
    rows, cols = np.nonzero(hole)
    idx[rows, cols] = np.arange(rows.size)
    a_rows, a_cols, a_vals = [], [], []
    b = np.zeros(rows.size)
    diag = np.zeros(rows.size)
    for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        r2, c2 = rows + dr, cols + dc
        inside = (r2 >= 0) & (r2 < hole.shape[0]) & (c2 >= 0) & (c2 < hole.shape[1])
        k = np.nonzero(inside)[0]
        r2, c2 = r2[k], c2[k]
        diag[k] += 1.0
        b[k] += generated[rows[k], cols[k]] - generated[r2, c2]  # guidance: the generated gradient
        unknown = hole[r2, c2]
        a_rows += k[unknown].tolist()
        a_cols += idx[r2[unknown], c2[unknown]].tolist()
        a_vals += [-1.0] * int(unknown.sum())
        b[k[~unknown]] += known[r2[~unknown], c2[~unknown]]  # boundary condition: the known pixel
    a_rows += list(range(rows.size))
    a_cols += list(range(rows.size))
    a_vals += diag.tolist()
    matrix = coo_matrix((a_vals, (a_rows, a_cols)), shape=(rows.size, rows.size)).tocsr()
    out[rows, cols] = spsolve(matrix, b)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _blend(known: np.ndarray, generated: np.ndarray, hole: np.ndarray, blend: str) -> np.ndarray:
    if blend == "plain":  # Eq. 2: F' = M * F + (1 - M) * G(z), with M = 1 - hole
        return np.where(hole > 0.5, generated, known).astype(np.float32)
    if blend == "poisson":
        return np.stack([poisson_blend(k, g, h) for k, g, h in zip(known, generated, hole)])
    raise SpineInpaintError(f"unknown blending '{blend}' (use plain or poisson)")


class ModelCache:
    """Loads each shipped generator/critic once (per kind) and keeps it for later calls."""

    def __init__(self, directory=None):
        self.directory = directory
        self._models: dict = {}

    def gan(self, model: str, kind: str):
        key = (model, kind)
        if key not in self._models:
            from SpineInpaintLib import gan

            self._models[key] = gan.load_gan(model, kind, self.directory)
        return self._models[key]

    def context(self, kind: str):
        key = ("context", kind)
        if key not in self._models:
            from SpineInpaintLib import gan

            self._models[key] = gan.load_context(kind, self.directory)
        return self._models[key]


_DEFAULT_CACHE = ModelCache()


def inpaint_crops(stack: np.ndarray, holes: np.ndarray, *, method: str = "context", kind: str = "binary",
                  prior: np.ndarray | None = None, models: ModelCache | None = None, blend: str = "plain",
                  restarts: int = 4, steps: int = 200, lr: float = 0.05, prior_weight: float | None = None,
                  near_weight: float = 0.0, shape_weight: float = 0.0, seed: int = 0) -> np.ndarray:
    """Fill the holes of a batch of 64x64 crops with a GAN method; returns ``(blended, generated)``, (N, 64, 64) each.

    Parameters
    ----------
    stack, holes
        (N, 3, 64, 64): the crops of slices z-1, z, z+1 in [0, 1] and their holes (1 = unknown). The
        z-optimisation methods use the middle slice only (the paper works slice by slice).
    prior
        (N, 64, 64) adjacent-vertebra prior (context generator input; ``shape_weight`` target).
    """
    if method not in ("context",) + GAN_METHODS:
        raise SpineInpaintError(f"unknown crop inpainting method '{method}' (use context or {', '.join(GAN_METHODS)})")
    stack, holes = np.asarray(stack, np.float32), (np.asarray(holes) > 0.5).astype(np.float32)
    if stack.ndim != 4 or stack.shape[1] != 3 or stack.shape != holes.shape:
        raise SpineInpaintError(f"stack and holes must both be (N, 3, 64, 64), got {stack.shape} and {holes.shape}")
    if holes[:, 1].reshape(len(holes), -1).all(axis=1).any():
        raise SpineInpaintError("the hole covers the whole 64x64 crop of a slice: nothing left to condition on")
    models = models or _DEFAULT_CACHE
    prior = np.zeros_like(stack[:, 1]) if prior is None else np.asarray(prior, np.float32)
    if method == "context":
        net, _ = models.context(kind)
        with torch.no_grad():
            out = []
            for s in range(0, len(stack), 128):
                inputs = context_input(torch.as_tensor(stack[s:s + 128]), torch.as_tensor(holes[s:s + 128]),
                                       torch.as_tensor(prior[s:s + 128]))
                out.append(net(inputs)[:, 0].numpy())
        generated = np.concatenate(out)
    else:
        g, d, _ = models.gan(method, kind)
        generated, _ = optimise_latent(g, d, method, stack[:, 1], holes[:, 1], restarts=restarts, steps=steps, lr=lr,
                                       prior_weight=prior_weight, near_weight=near_weight, shape_prior=prior,
                                       shape_weight=shape_weight, seed=seed)
    return _blend(stack[:, 1], generated, holes[:, 1], blend), generated


# --------------------------------------------------------------------------------------------
# Full-resolution baselines
# --------------------------------------------------------------------------------------------
def biharmonic_fill(image: np.ndarray, hole: np.ndarray, margin: int = 8) -> np.ndarray:
    """Biharmonic inpainting (scikit-image) of every slice of a (z, y, x) array, inside the hole's box + margin."""
    from skimage.restoration import inpaint_biharmonic

    out = image.astype(np.float32).copy()
    for z in np.nonzero(hole.reshape(hole.shape[0], -1).any(axis=1))[0]:
        rows, cols = np.nonzero(hole[z])
        r0, r1 = max(0, rows.min() - margin), min(hole.shape[1], rows.max() + margin + 1)
        c0, c1 = max(0, cols.min() - margin), min(hole.shape[2], cols.max() + margin + 1)
        region, region_hole = out[z, r0:r1, c0:c1], hole[z, r0:r1, c0:c1]
        if region_hole.all():
            raise SpineInpaintError(f"the hole covers its whole neighbourhood on slice {z}: nothing to interpolate from")
        out[z, r0:r1, c0:c1] = inpaint_biharmonic(np.where(region_hole, 0.0, region), region_hole)
    return out


def nearest_slice_fill(image: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """Fill each hole voxel by linear interpolation along z between the nearest hole-free slices.

    With a hole-free slice on one side only, that slice is copied; with none, the hole is left as is.
    """
    out = image.astype(np.float32).copy()
    touched = hole.reshape(hole.shape[0], -1).any(axis=1)
    free = np.nonzero(~touched)[0]
    if free.size == 0:
        return out
    for z in np.nonzero(touched)[0]:
        below, above = free[free < z], free[free > z]
        if below.size and above.size:
            z0, z1 = below.max(), above.min()
            t = (z - z0) / (z1 - z0)
            fill = (1 - t) * image[z0] + t * image[z1]
        else:
            fill = image[below.max()] if below.size else image[above.min()]
        out[z][hole[z]] = fill[hole[z]]
    return out


# --------------------------------------------------------------------------------------------
# Volume-level restoration
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class InpaintingResult:
    """What :func:`restore_mask` / :func:`restore_ct` return.

    Attributes
    ----------
    restored
        The restored volume on the input's grid: the spine mask (uint8) for ``kind='binary'``, HU
        (the input's dtype) for ``'grey'``.
    restored_labels
        For ``'binary'``: the input labels with the restored voxels of each level set to its id and
        removed voxels cleared; else ``None``.
    method, kind
        What ran.
    seconds
        Wall time of the inpainting (after loading the models).
    slices
        Number of axial slices inpainted.
    levels
        The vertebra ids the hole was assigned to.
    noop
        Why nothing was done (empty hole, hole outside the spine), else ``None``.
    crops
        Per slice (LPS-oriented): the 64x64 known crop, hole, restored crop and generated crop;
        for figures and KMMD.
    info
        Anything else worth recording (hole voxels outside the crop's field of view, options).
    """

    restored: io.Volume
    restored_labels: io.Volume | None
    method: str
    kind: str
    seconds: float
    slices: int
    levels: list[int]
    noop: str | None = None
    crops: dict = dataclasses.field(default_factory=dict)
    info: dict = dataclasses.field(default_factory=dict)


def restore_mask(labels: io.Volume, hole, *, method: str = "context", **options) -> InpaintingResult:
    """Restore the vertebra mask inside ``hole`` (the paper's binary task).

    Parameters
    ----------
    labels
        Vertebra labels (TotalSegmentator ids 25-50) of the scan; inside the hole they are ignored.
    hole
        The region to restore: a :class:`~SpineInpaintLib.io.Volume` or array on the labels' grid,
        non-zero = unknown.
    method
        One of :data:`METHODS`.
    options
        See :func:`_restore` (``blend``, ``restarts``, ``steps``, ``z_sigma_mm``, ``models``, ``seed``...).
    """
    return _restore("binary", None, labels, hole, method, **options)


def restore_ct(ct: io.Volume, labels: io.Volume, hole, *, method: str = "context", **options) -> InpaintingResult:
    """Restore the CT's HU inside ``hole`` (grayscale task); ``labels`` locate the vertebra. See :func:`restore_mask`."""
    return _restore("grey", ct, labels, hole, method, **options)


def _check_volumes(ct: io.Volume | None, labels: io.Volume, hole) -> np.ndarray:
    if not isinstance(labels, io.Volume):
        raise SpineInpaintError("labels must be a Volume (read it with SpineInpaintLib.io.read_volume)")
    if ct is not None and (not isinstance(ct, io.Volume) or not ct.same_grid(labels)):
        raise SpineInpaintError("the CT and the labels must be Volumes on the same grid")
    array = hole.array if isinstance(hole, io.Volume) else np.asarray(hole)
    if isinstance(hole, io.Volume) and not hole.same_grid(labels):
        raise SpineInpaintError("the hole mask and the labels are not on the same grid")
    if array.shape != labels.shape:
        raise SpineInpaintError(f"the hole mask has shape {array.shape}, the labels {labels.shape}")
    if not np.all(np.isfinite(array)):
        raise SpineInpaintError("the hole mask holds nan or inf")
    return array != 0


def _assign_levels(labels: np.ndarray, hole: np.ndarray, spacing_zyx, reach_mm: float = 3.0) -> dict[int, np.ndarray]:
    """Split the hole by the vertebra each 3D component touches most (within ``reach_mm`` of it)."""
    components, n = ndimage.label(hole)
    iterations = max(1, int(round(reach_mm / min(spacing_zyx))))
    vertebrae = (labels >= 25) & (labels <= 50)
    out: dict[int, np.ndarray] = {}
    for k, box in enumerate(ndimage.find_objects(components), start=1):
        pad = tuple(slice(max(0, s.start - iterations), s.stop + iterations) for s in box)
        comp = components[pad] == k
        ring = ndimage.binary_dilation(comp, iterations=iterations)
        values = labels[pad][ring & vertebrae[pad]]
        if values.size == 0:
            continue
        level = int(np.bincount(values.astype(np.int64)).argmax())
        full = out.setdefault(level, np.zeros(hole.shape, bool))
        full[pad] |= comp
    return out


def _restore(kind: str, ct: io.Volume | None, labels: io.Volume, hole, method: str, *, blend: str = "plain",
             restarts: int = 4, steps: int = 200, lr: float = 0.05, prior_weight: float | None = None,
             near_weight: float = 0.0, shape_weight: float = 0.0, z_sigma_mm: float | None = None,
             models: ModelCache | None = None, seed: int = 0, keep_crops: bool = False) -> InpaintingResult:
    """The shared body of :func:`restore_mask` and :func:`restore_ct`.

    ``z_sigma_mm``: Gaussian smoothing (mm) of the generated crops along z inside the hole (3D
    consistency); default :data:`CONTEXT_Z_SIGMA_MM` for ``'context'`` and 0 (slice by slice, as the
    paper) otherwise.
    """
    method = str(method).lower()
    if method not in METHODS:
        raise SpineInpaintError(f"unknown inpainting method '{method}' (use {', '.join(METHODS)})")
    if blend not in ("plain", "poisson"):
        raise SpineInpaintError(f"unknown blending '{blend}' (use plain or poisson)")
    hole_arr = _check_volumes(ct, labels, hole)
    source = labels if ct is None else ct
    start = time.perf_counter()

    def noop(reason: str) -> InpaintingResult:
        warnings.warn(f"inpainting skipped: {reason}", UserWarning, stacklevel=3)
        restored = labels.with_array(spine_mask(labels.array)) if kind == "binary" else ct.copy()
        return InpaintingResult(restored, labels.copy() if kind == "binary" else None, method, kind,
                                time.perf_counter() - start, 0, [], reason)

    if not hole_arr.any():
        return noop("the hole mask is empty")
    hole_vol = labels.with_array(hole_arr.astype(np.uint8))
    lab_l = io.reorient(labels, "LPS")
    hole_l = io.reorient(hole_vol, "LPS").array > 0
    lab = lab_l.array.astype(np.int64)
    spacing_zyx = lab_l.spacing_zyx
    groups = _assign_levels(lab, hole_l, spacing_zyx)
    if not groups:
        return noop("the hole touches no vertebra (it lies outside the spine)")
    if kind == "binary":
        image = spine_mask(lab).astype(np.float32)
        image[hole_l] = 0.0  # never let the values inside the hole leak into the result
    else:
        ct_l = io.reorient(ct, "LPS")
        image = ct_l.array.astype(np.float32).copy()
        image[hole_l] = 0.0
    covered = np.zeros_like(hole_l)
    for mask in groups.values():
        covered |= mask
    filled = image.copy()
    info: dict = {"hole_voxels": int(hole_l.sum()), "hole_voxels_without_level": int((hole_l & ~covered).sum())}
    crops: dict[str, list] = {}
    n_slices = 0
    if method == "biharmonic":
        filled = biharmonic_fill(image, covered)
        n_slices = int(covered.reshape(covered.shape[0], -1).any(axis=1).sum())
    elif method == "nearest":
        filled = nearest_slice_fill(image, covered)
        n_slices = int(covered.reshape(covered.shape[0], -1).any(axis=1).sum())
    else:
        present = [v for v in np.unique(lab).tolist() if v in _VERTEBRA_IDS]
        levels = {v: level_geometry(lab, v, hole_l) for v in present}
        spine = spine_mask(lab).astype(np.float32)
        spine[hole_l] = 0.0
        hu = None if kind == "binary" else image
        sigma = (CONTEXT_Z_SIGMA_MM if method == "context" else 0.0) if z_sigma_mm is None else float(z_sigma_mm)
        outside = 0
        for level, mask in groups.items():
            n, out_voxels = _restore_level(kind, method, image, spine, hu, mask, levels, level, lab_l.spacing_zyx,
                                           filled, crops, sigma, models, blend=blend, restarts=restarts, steps=steps,
                                           lr=lr, prior_weight=prior_weight, near_weight=near_weight,
                                           shape_weight=shape_weight, seed=seed)
            n_slices += n
            outside += out_voxels
        info["hole_voxels_outside_crop"] = outside
    seconds = time.perf_counter() - start
    if kind == "binary":
        restored_l = (filled >= 0.5).astype(np.uint8)
        new_labels = lab.copy()
        for level, mask in groups.items():
            new_labels[mask & (restored_l > 0)] = level
            new_labels[mask & (restored_l == 0) & (new_labels >= 25) & (new_labels <= 50)] = 0
        restored = _back(lab_l.with_array(restored_l), labels, np.uint8)
        restored_labels = _back(lab_l.with_array(new_labels.astype(labels.array.dtype)), labels, labels.array.dtype)
    else:
        values = np.where(covered, filled, ct_l.array.astype(np.float32))
        values = np.where(hole_l & ~covered, ct_l.array, values)  # holes away from the spine stay as they were
        restored = _back(ct_l.with_array(_as_dtype(values, ct.array.dtype)), ct, ct.array.dtype)
        restored_labels = None
    info.update({"blend": blend, "z_sigma_mm": None if method in ("biharmonic", "nearest") else z_sigma_mm,
                 "seed": seed})
    if method in GAN_METHODS:
        info.update({"restarts": restarts, "steps": steps, "lr": lr, "prior_weight": prior_weight,
                     "near_weight": near_weight, "shape_weight": shape_weight})
    result = InpaintingResult(restored, restored_labels, method, kind, seconds, n_slices, sorted(groups), None,
                              {k: np.stack(v) for k, v in crops.items()} if keep_crops and crops else {}, info)
    return result


def _as_dtype(values: np.ndarray, dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return values.astype(dtype)


def _back(volume_lps: io.Volume, reference: io.Volume, dtype) -> io.Volume:
    """An LPS-oriented result back on the input's grid (a pure permutation/flip: nearest neighbour is exact)."""
    if volume_lps.same_grid(reference):
        return reference.with_array(volume_lps.array.astype(dtype))
    back = io.resample_like(volume_lps, reference, labels=True)
    return reference.with_array(back.array.astype(dtype))


def _restore_level(kind, method, image, spine, hu, mask, levels, level, spacing_zyx, filled, crops, sigma, models,
                   **opts) -> tuple[int, int]:
    """Inpaint one level's part of the hole in place in ``filled``; returns (slices, hole voxels outside the crop)."""
    geo = levels[level]
    spacing_yx = spacing_zyx[1:]
    zs = np.nonzero(mask.reshape(mask.shape[0], -1).any(axis=1))[0]
    known_img = image if kind == "grey" else spine
    value = (lambda z: _grey(_crop(known_img[z], geo, spacing_yx, cval=-1000.0))) if kind == "grey" else \
        (lambda z: (_crop(known_img[z], geo, spacing_yx) >= 0.5).astype(np.float32))
    hole_crop = lambda z: (_crop(mask[z].astype(np.float32), geo, spacing_yx) > 0.01).astype(np.float32)  # noqa: E731
    in_range = set(geo.slices.tolist())
    cache_v, cache_h = {}, {}

    def get(z):
        if z not in cache_v:
            cache_v[z], cache_h[z] = value(z), hole_crop(z)
        return cache_v[z], cache_h[z]

    stack, holes, priors = [], [], []
    for z in zs:
        z = int(z)
        rows = []
        for dz in (-1, 0, 1):
            z2 = z + dz
            if dz and (z2 not in in_range or not 0 <= z2 < image.shape[0]):
                z2 = z
            rows.append(get(z2))
        stack.append(np.stack([r[0] for r in rows]))
        holes.append(np.stack([r[1] for r in rows]))
        pb, pg = _neighbour_prior(levels, level, z, spine, hu, spacing_yx)
        priors.append(pb if kind == "binary" else pg)
    stack, holes, priors = np.stack(stack), np.stack(holes), np.stack(priors)
    holes[:, 1] = np.maximum(holes[:, 1], 0)
    blended, generated = inpaint_crops(stack, holes, method=method, kind=kind, prior=priors, models=models, **opts)
    if sigma > 0 and len(zs) > 1:
        # 3D consistency: smooth the generated crops along z (the crops of one level are aligned)
        smooth = ndimage.gaussian_filter1d(generated, sigma / spacing_zyx[0], axis=0, mode="nearest")
        h = holes[:, 1] > 0.5
        generated = np.where(h, smooth, generated)
        blended = np.where(h, generated, stack[:, 1]) if opts.get("blend", "plain") == "plain" else \
            _blend(stack[:, 1], generated, holes[:, 1], "poisson")
    for key, arr in (("known", stack[:, 1]), ("hole", holes[:, 1]), ("restored", blended),
                     ("generated", generated), ("prior", priors)):
        crops.setdefault(key, []).extend(list(arr))
    crops.setdefault("level", []).extend([level] * len(zs))
    crops.setdefault("z", []).extend(zs.tolist())
    # paste back: sample the restored crop at each hole voxel's crop coordinate
    step = CROP_FOV_MM / CROP_SIZE
    outside = 0
    lo, hi = CROP_WINDOW
    for k, z in enumerate(zs):
        rows, cols = np.nonzero(mask[z])
        i = (rows - geo.centre_rc[0]) * spacing_yx[0] / step + (CROP_SIZE - 1) / 2.0
        j = (cols - geo.centre_rc[1]) * spacing_yx[1] / step + (CROP_SIZE - 1) / 2.0
        inside = (i >= 0) & (i <= CROP_SIZE - 1) & (j >= 0) & (j <= CROP_SIZE - 1)
        outside += int((~inside).sum())
        values = ndimage.map_coordinates(blended[k], [i, j], order=1, mode="nearest")
        if kind == "grey":
            values = lo + values * (hi - lo)
            if (~inside).any():  # beyond the crop's field of view: biharmonic at full resolution
                bh = biharmonic_fill(image[z:z + 1], mask[z:z + 1])[0]
                values[~inside] = bh[rows[~inside], cols[~inside]]
        else:
            values[~inside] = 0.0  # 48 mm or more from the vertebra's centre: soft tissue
        filled[z, rows, cols] = values
    return len(zs), outside


# --------------------------------------------------------------------------------------------
# Evaluation: python -m SpineInpaintLib evaluate inpainting
# --------------------------------------------------------------------------------------------
#: How far around the lesion (mm) the "around" scores reach.
AROUND_MM = 5.0


@dataclasses.dataclass
class EvalLesion:
    """One held-out simulated lesion with its healthy truth."""

    name: str
    source: str
    destructive: bool
    ct: io.Volume
    healthy_ct: io.Volume
    labels: io.Volume
    hole: io.Volume
    level: int


def test_phantom_seeds(n: int, start: int = 0) -> list[int]:
    """The first ``n`` phantom seeds (from ``start``) whose case falls in the fixed test split."""
    from SpineInpaintLib import datasets

    seeds, s = [], int(start)
    while len(seeds) < n:
        if datasets.split_of(f"phantom_{s:04d}") == "test":
            seeds.append(s)
        s += 1
    return seeds


def _save_lesions(items: list[EvalLesion], path) -> None:
    arrays = {}
    for k, e in enumerate(items):
        for name in ("ct", "healthy_ct", "labels", "hole"):
            arrays[f"{k}_{name}"] = getattr(e, name).array
        geo = e.ct
        arrays[f"{k}_geometry"] = np.concatenate([geo.spacing, geo.origin, np.asarray(geo.direction).ravel()])
        arrays[f"{k}_meta"] = np.array([e.name, e.source, str(int(e.destructive)), str(e.level)])
    np.savez_compressed(path, n=len(items), **arrays)


def _load_lesions(path) -> list[EvalLesion]:
    out = []
    with np.load(path) as data:
        for k in range(int(data["n"])):
            g = data[f"{k}_geometry"]
            vol = lambda a: io.Volume(a, spacing=tuple(g[0:3]), origin=tuple(g[3:6]), direction=g[6:].reshape(3, 3))  # noqa: E731
            name, source, destructive, level = data[f"{k}_meta"].tolist()
            out.append(EvalLesion(name, source, destructive == "1", vol(data[f"{k}_ct"]), vol(data[f"{k}_healthy_ct"]),
                                  vol(data[f"{k}_labels"]), vol(data[f"{k}_hole"]), int(level)))
    return out


def evaluation_lesions(n_phantoms: int = 8, lesions_per_case: int = 2, n_real: int = 4, seed: int = 0,
                       progress: bool = True, cache=None) -> list[EvalLesion]:
    """Held-out lesions: test-split phantoms (the GAN data's compact grid) and the real scan's held-out L2-L4.

    Lesion k of a case is destructive for even k and keeps the cortex intact for odd k; type, level
    and size (0.45-0.8 of the body) are drawn from ``seed``. ``cache`` (a folder) keeps the set as
    ``.npz`` for the next run with the same arguments.
    """
    from pathlib import Path

    if cache is not None:
        path = Path(cache) / f"lesions_p{n_phantoms}_l{lesions_per_case}_r{n_real}_s{seed}.npz"
        if path.exists():
            return _load_lesions(path)
        items = evaluation_lesions(n_phantoms, lesions_per_case, n_real, seed, progress, None)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".partial.npz")
        _save_lesions(items, tmp)
        tmp.replace(path)  # atomic: a reader never sees half a file
        return items
    from tqdm import tqdm

    from SpineInpaintLib import datasets, gan, lesions

    rng = np.random.default_rng([seed, 2718])
    out: list[EvalLesion] = []
    jobs = [("phantom", s) for s in test_phantom_seeds(n_phantoms)] + ([("real", "totalsegmentator")] if n_real else [])
    for source, key in tqdm(jobs, desc="test lesions", unit="case", disable=not progress):
        if source == "phantom":
            case = datasets.phantom_case(key, lesion_types=None, **gan.phantom_overrides(key))
            present = [v for v in np.unique(case.labels.array).tolist() if 26 <= v <= 50]
            voxel = float(np.prod(case.labels.spacing))
            counts = {v: int((case.labels.array == v).sum()) * voxel for v in present}
            candidates = [v for v in present if counts[v] > 0.6 * max(counts.values())]
            count = lesions_per_case
        else:
            case = datasets.real_case(key, seed=0, lesion_types=None)
            candidates = [28, 29, 30]
            count = n_real
        made = 0
        for k in range(count * 3):
            if made == count:
                break
            destructive = made % 2 == 0
            level = int(rng.choice(candidates))
            try:
                lesion = lesions.simulate_lesion(case.healthy_ct, case.labels, level,
                                                 str(rng.choice(["lytic", "sclerotic", "mixed"])), destructive,
                                                 size=float(rng.uniform(0.45, 0.8)), seed=int(rng.integers(0, 2**31 - 1)))
            except SpineInpaintError:
                continue
            out.append(EvalLesion(f"{case.case_id}_L{level}_{'destructive' if destructive else 'intact'}_{made}",
                                  source, destructive, lesion.ct, case.healthy_ct, case.labels, lesion.mask, level))
            made += 1
    return out


def _truth_crops(labels_lps: np.ndarray, hole_lps: np.ndarray, volume_lps: np.ndarray, level: int, spacing_zyx,
                 binary: bool) -> tuple[np.ndarray, np.ndarray]:
    """Crops (at the inpainting geometry) of ``volume_lps`` on every hole slice, and the crop holes."""
    geo = level_geometry(labels_lps, level, hole_lps)
    zs = np.nonzero(hole_lps.reshape(hole_lps.shape[0], -1).any(axis=1))[0]
    crops, holes = [], []
    for z in zs:
        if binary:
            crops.append((_crop(volume_lps[z].astype(np.float32), geo, spacing_zyx[1:]) >= 0.5).astype(np.float32))
        else:
            crops.append(_grey(_crop(volume_lps[z].astype(np.float32), geo, spacing_zyx[1:], cval=-1000.0)))
        holes.append(_crop(hole_lps[z].astype(np.float32), geo, spacing_zyx[1:]) > 0.01)
    return np.stack(crops), np.stack(holes)


def score_binary(restored: np.ndarray, truth: np.ndarray, hole: np.ndarray, spacing_zyx) -> dict[str, float]:
    """Dice and HD95 (mm) of the restored vertebra mask inside the hole and within :data:`AROUND_MM` of it."""
    from SpineInpaintLib import metrics

    iterations = [max(1, int(round(AROUND_MM / s))) for s in spacing_zyx]
    structure = np.zeros((3, 3, 3), bool)
    structure[1, 1, :] = structure[1, :, 1] = structure[:, 1, 1] = True
    around = hole.copy()
    # anisotropic dilation: a few steps along each axis by its own spacing
    for axis, it in enumerate(iterations):
        st = np.zeros((3, 3, 3), bool)
        st[1, 1, 1] = True
        idx = [1, 1, 1]
        for d in (0, 2):
            idx[axis] = d
            st[tuple(idx)] = True
        around = ndimage.binary_dilation(around, st, iterations=it)
    out = {}
    for name, roi in (("in", hole), ("around", around)):
        p, t = restored & roi, truth & roi
        out[f"dice_{name}"] = metrics.dice(p, t)
        out[f"hd95_{name}"] = metrics.hd95(p, t, spacing_zyx) if p.any() and t.any() else (
            0.0 if not p.any() and not t.any() else float("inf"))
    return out


def score_grey(restored: np.ndarray, truth: np.ndarray, hole: np.ndarray) -> dict[str, float]:
    """MAE (HU) inside the hole, and BraTS-normalised MAE/PSNR/SSIM on the hole's box (at least 11 voxels a side)."""
    from SpineInpaintLib import metrics

    mae_hu = float(np.abs(restored[hole].astype(np.float64) - truth[hole]).mean())
    zz, yy, xx = np.nonzero(hole)
    box = []
    for lo, hi, n in ((zz.min(), zz.max(), hole.shape[0]), (yy.min(), yy.max(), hole.shape[1]),
                      (xx.min(), xx.max(), hole.shape[2])):
        lo, hi = int(lo) - 4, int(hi) + 5
        grow = max(0, 11 - (hi - lo))
        lo, hi = max(0, lo - grow // 2 - grow % 2), min(n, hi + grow // 2)
        box.append(slice(lo, hi))
    box = tuple(box)
    q = metrics.inpainting_quality(restored[box].astype(np.float64), truth[box].astype(np.float64), hole[box],
                                   void_value=None)
    return {"mae_hu": mae_hu, "mae": q["mae"], "psnr": q["psnr"], "ssim": q["ssim"]}


def evaluate(lesions_: Sequence[EvalLesion], methods: Sequence[str], *, grey: bool = False, steps: int = 200,
             restarts: int = 4, models: ModelCache | None = None, seed: int = 0, progress: bool = True) -> dict:
    """Run every method on every lesion; per-lesion rows, per-group means and KMMD (see :func:`run_evaluate`)."""
    from tqdm import tqdm

    from SpineInpaintLib import gan

    models = models or _DEFAULT_CACHE
    rows: list[dict] = []
    crops: dict[str, dict[str, list]] = {}
    examples: dict[str, dict] = {}
    bar = tqdm(total=len(lesions_) * len(methods) * (2 if grey else 1), desc="inpainting", unit="run",
               disable=not progress)
    for lesion in lesions_:
        labels_l = io.reorient(lesion.labels, "LPS")
        hole_l = io.reorient(lesion.hole, "LPS").array > 0
        truth_l = spine_mask(labels_l.array) > 0
        spacing = labels_l.spacing_zyx
        truth_crops, crop_holes = _truth_crops(labels_l.array, hole_l, truth_l, lesion.level, spacing, True)
        crops.setdefault("truth", {}).setdefault("binary", []).append(truth_crops)
        for method in methods:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                res = restore_mask(lesion.labels, lesion.hole, method=method, steps=steps, restarts=restarts,
                                   models=models, seed=seed)
            restored_l = io.reorient(res.restored, "LPS").array > 0
            row = {"lesion": lesion.name, "source": lesion.source, "destructive": lesion.destructive,
                   "method": method, "kind": "binary", "slices": res.slices, "seconds": res.seconds,
                   "seconds_per_slice": res.seconds / max(1, res.slices),
                   **score_binary(restored_l, truth_l, hole_l, spacing)}
            rows.append(row)
            rc, _ = _truth_crops(labels_l.array, hole_l, restored_l, lesion.level, spacing, True)
            crops.setdefault(method, {}).setdefault("binary", []).append(rc)
            if lesion.destructive and lesion.name not in examples:
                examples[lesion.name] = {"truth": truth_crops, "hole": crop_holes}
            if lesion.name in examples:
                examples[lesion.name][method] = rc
            bar.update(1)
        if grey:
            ct_l = io.reorient(lesion.healthy_ct, "LPS").array
            truth_g, _ = _truth_crops(labels_l.array, hole_l, ct_l, lesion.level, spacing, False)
            crops["truth"].setdefault("grey", []).append(truth_g)
            for method in methods:
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", UserWarning)
                        res = restore_ct(lesion.ct, lesion.labels, lesion.hole, method=method, steps=steps,
                                         restarts=restarts, models=models, seed=seed)
                except SpineInpaintError as err:  # e.g. no grey weights for this GAN
                    rows.append({"lesion": lesion.name, "method": method, "kind": "grey", "error": str(err)})
                    bar.update(1)
                    continue
                restored_g = io.reorient(res.restored, "LPS").array
                rows.append({"lesion": lesion.name, "source": lesion.source, "destructive": lesion.destructive,
                             "method": method, "kind": "grey", "slices": res.slices, "seconds": res.seconds,
                             "seconds_per_slice": res.seconds / max(1, res.slices),
                             **score_grey(restored_g, ct_l, hole_l)})
                gc, _ = _truth_crops(labels_l.array, hole_l, restored_g, lesion.level, spacing, False)
                crops.setdefault(method, {}).setdefault("grey", []).append(gc)
                bar.update(1)
    bar.close()
    summary = _summarise(rows)
    kmmds = {}
    for method in methods:
        for kind, parts in crops.get(method, {}).items():
            restored = np.concatenate(parts)
            truth = np.concatenate(crops["truth"][kind])
            kmmds[f"{method}/{kind}"] = gan.kmmd(restored, truth, seed=seed)
    return {"rows": rows, "summary": summary, "kmmd": kmmds, "examples": examples}


def _summarise(rows: list[dict]) -> dict:
    """Means (and medians for HD95) per method, kind and group (destructive, intact, all)."""
    out: dict = {}
    keys = ("dice_in", "hd95_in", "dice_around", "hd95_around", "mae_hu", "mae", "psnr", "ssim", "seconds_per_slice")
    for row in rows:
        if "error" in row:
            continue
        for group in ("all", "destructive" if row["destructive"] else "intact"):
            cell = out.setdefault(row["kind"], {}).setdefault(group, {}).setdefault(row["method"], {"n": 0})
            cell["n"] += 1
            for k in keys:
                if k in row:
                    cell.setdefault(k, []).append(float(row[k]))
    for kind in out.values():
        for group in kind.values():
            for cell in group.values():
                for k in keys:
                    if k in cell:
                        values = np.asarray(cell.pop(k))
                        finite = values[np.isfinite(values)]
                        cell[k] = float(finite.mean()) if finite.size else float("inf")
                        if k.startswith("hd95"):
                            cell[k + "_median"] = float(np.median(values))
                            cell[k + "_inf"] = int((~np.isfinite(values)).sum())
    return out


def paired_wins(rows: list[dict], a: str, b: str, kind: str = "binary", destructive: bool = True) -> dict:
    """On the same lesions: how often method ``a`` beats ``b`` on Dice and HD95 inside the lesion."""
    by = {}
    for row in rows:
        if row.get("kind") == kind and row.get("destructive") == destructive and "error" not in row:
            by.setdefault(row["lesion"], {})[row["method"]] = row
    pairs = [(v[a], v[b]) for v in by.values() if a in v and b in v]
    return {"lesions": len(pairs),
            "dice_in_wins": int(sum(p["dice_in"] > q["dice_in"] for p, q in pairs)),
            "hd95_in_wins": int(sum(p["hd95_in"] < q["hd95_in"] for p, q in pairs)),
            "mean_dice_in": [float(np.mean([p["dice_in"] for p, _ in pairs])) if pairs else float("nan"),
                             float(np.mean([q["dice_in"] for _, q in pairs])) if pairs else float("nan")],
            "mean_hd95_in": [float(np.mean([p["hd95_in"] for p, _ in pairs])) if pairs else float("nan"),
                             float(np.mean([q["hd95_in"] for _, q in pairs])) if pairs else float("nan")]}


def figure6_check(methods: Sequence[str], *, n_crops: int = 48, steps: int = 200, restarts: int = 4,
                  models: ModelCache | None = None, seed: int = 0, n_phantoms: int = 2) -> dict:
    """The paper's Figure 6 check: 16x16 holes on healthy held-out crops, restored by each GAN method.

    Returns the crops (for the figure), Dice inside the squares and KMMD of restored vs original.
    """
    from SpineInpaintLib import datasets, gan

    models = models or _DEFAULT_CACHE
    rng = np.random.default_rng([seed, 6])
    parts = []
    for s in test_phantom_seeds(n_phantoms):
        case = datasets.phantom_case(s, lesion_types=None, **gan.phantom_overrides(s))
        parts.append(case_training_arrays(case, lesions_per_level=0))
    binary = np.concatenate([p["binary"] for p in parts]).astype(np.float32)
    prior = np.concatenate([p["prior_binary"] for p in parts]).astype(np.float32)
    offset = np.cumsum([0] + [len(p["binary"]) for p in parts])[:-1]
    prev = np.concatenate([p["prev"] + o for p, o in zip(parts, offset)])
    nxt = np.concatenate([p["next"] + o for p, o in zip(parts, offset)])
    pick = rng.choice(len(binary), min(n_crops, len(binary)), replace=False)
    holes = np.zeros((len(pick), 3, CROP_SIZE, CROP_SIZE), np.float32)
    for k, i in enumerate(pick):
        rows, cols = np.nonzero(binary[i] > 0.5)
        j = int(rng.integers(0, rows.size))
        r0, c0 = int(np.clip(rows[j] - 8, 0, 48)), int(np.clip(cols[j] - 8, 0, 48))
        holes[k, :, r0:r0 + 16, c0:c0 + 16] = 1.0  # the same square on the neighbour slices
    stack = np.stack([binary[prev[pick]], binary[pick], binary[nxt[pick]]], axis=1)
    out = {"original": binary[pick], "hole": holes[:, 1], "results": {}, "dice_in": {}, "kmmd": {}, "seconds": {},
           "healthy_test_crops": binary}
    for method in methods:
        if method not in ("context",) + GAN_METHODS:
            continue
        t0 = time.perf_counter()
        try:
            blended, _ = inpaint_crops(stack, holes, method=method, prior=prior[pick], models=models, steps=steps,
                                       restarts=restarts, seed=seed)
        except SpineInpaintError as err:  # no weights for this method: leave it out of the figure
            warnings.warn(f"Figure 6 check without {method}: {err}", UserWarning, stacklevel=2)
            continue
        out["seconds"][method] = (time.perf_counter() - t0) / len(pick)
        restored = (blended >= 0.5).astype(np.float32)
        out["results"][method] = restored
        h = holes[:, 1] > 0.5
        p, t = (restored > 0.5) & h, (binary[pick] > 0.5) & h
        out["dice_in"][method] = float(2 * (p & t).sum() / max(1, p.sum() + t.sum()))
        out["kmmd"][method] = gan.kmmd(restored, binary[pick], seed=seed)
    return out


def _figure6_png(check: dict, path, n: int = 8) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(check["results"])
    rows = ["input (16x16 hole)"] + methods + ["original"]
    fig, axes = plt.subplots(len(rows), n, figsize=(n * 1.1, len(rows) * 1.15))
    for j in range(n):
        shown = check["original"][j] * (1 - check["hole"][j]) + 0.5 * check["hole"][j]
        images = [shown] + [check["results"][m][j] for m in methods] + [check["original"][j]]
        for i, img in enumerate(images):
            axes[i, j].imshow(img, cmap="gray", vmin=0, vmax=1)
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            if j == 0:
                axes[i, j].set_ylabel(rows[i], fontsize=7)
    fig.suptitle("Figure 6 check: 16x16 holes on healthy held-out crops", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _examples_png(examples: dict, methods: Sequence[str], path, n: int = 3) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(examples)[:n]
    cols = ["input"] + list(methods) + ["truth"]
    fig, axes = plt.subplots(len(names), len(cols), figsize=(len(cols) * 1.3, len(names) * 1.4), squeeze=False)
    for i, name in enumerate(names):
        ex = examples[name]
        k = int(np.argmax(ex["hole"].reshape(len(ex["hole"]), -1).sum(1)))  # the slice with the largest hole
        hole = ex["hole"][k]
        images = [ex["truth"][k] * (1 - hole) + 0.5 * hole] + [ex[m][k] if m in ex else np.zeros_like(hole)
                                                               for m in methods] + [ex["truth"][k]]
        for j, img in enumerate(images):
            axes[i, j].imshow(img, cmap="gray", vmin=0, vmax=1)
            axes[i, j].contour(hole, levels=[0.5], colors="r", linewidths=0.5)
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            if i == 0:
                axes[i, j].set_title(cols[j], fontsize=7)
    fig.suptitle("destructive lesions (red: the hole), largest slice", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def gan_table(models: ModelCache, healthy: np.ndarray, seed: int = 0, n: int = 500) -> dict:
    """Per GAN: parameters (shipped and at width 64) and KMMD^2 of binarised samples vs ``healthy`` crops."""
    from SpineInpaintLib import gan

    table = {}
    for m in GAN_METHODS:
        g64, d64 = gan.build_gan(m, 64, critic_width=64)
        row = {"generator_parameters_w64": gan.count_parameters(g64), "critic_parameters_w64": gan.count_parameters(d64)}
        try:
            g, d, meta = models.gan(m, "binary")
        except SpineInpaintError:
            g, d = gan.build_gan(m)
            meta = None
        row.update({"generator_parameters": gan.count_parameters(g), "critic_parameters": gan.count_parameters(d)})
        if meta is not None:
            samples = (gan.sample(g, n, seed=seed) >= 0.5).astype(np.float32)
            row.update({k: v for k, v in gan.kmmd(samples, healthy, seed=seed).items()})
            row["train_seconds"] = meta.get("train_seconds")
            row["epochs_done"] = meta.get("epochs_done")
        table[m] = row
    return table


def gan_samples_png(models: ModelCache, healthy: np.ndarray, path, seed: int = 0, n: int = 12) -> None:
    """One row of samples per shipped GAN (binary), and a row of held-out healthy crops."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from SpineInpaintLib import gan

    rows = {}
    for m in GAN_METHODS:
        try:
            g, _, _ = models.gan(m, "binary")
        except SpineInpaintError:
            continue
        rows[m] = gan.sample(g, n, seed=seed)
    rng = np.random.default_rng(seed)
    rows["held-out crops"] = healthy[rng.choice(len(healthy), n, replace=False)]
    fig, axes = plt.subplots(len(rows), n, figsize=(n * 0.9, len(rows) * 1.0), squeeze=False)
    for i, (name, images) in enumerate(rows.items()):
        for j in range(n):
            axes[i, j].imshow(images[j], cmap="gray", vmin=0, vmax=1)
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
        axes[i, 0].set_ylabel(name, fontsize=7)
    fig.suptitle("64x64 binary samples of the shipped GANs (no threshold) and real held-out crops", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_summary(result: dict) -> str:
    """A plain-text table of :func:`evaluate`'s summary."""
    lines = []
    for kind, groups in result["summary"].items():
        for group in ("destructive", "intact", "all"):
            if group not in groups:
                continue
            lines.append(f"\n{kind} task, {group} lesions")
            if kind == "binary":
                lines.append(f"{'method':<12} {'n':>3} {'Dice in':>8} {'HD95 in':>8} {'(median)':>8} "
                             f"{'Dice ar':>8} {'HD95 ar':>8} {'s/slice':>8}")
                for m, c in groups[group].items():
                    lines.append(f"{m:<12} {c['n']:>3} {c['dice_in']:8.3f} {c['hd95_in']:8.2f} "
                                 f"{c['hd95_in_median']:8.2f} {c['dice_around']:8.3f} {c['hd95_around']:8.2f} "
                                 f"{c['seconds_per_slice']:8.3f}")
            else:
                lines.append(f"{'method':<12} {'n':>3} {'MAE HU':>8} {'MAE':>7} {'PSNR':>7} {'SSIM':>7} {'s/slice':>8}")
                for m, c in groups[group].items():
                    lines.append(f"{m:<12} {c['n']:>3} {c['mae_hu']:8.1f} {c['mae']:7.4f} {c['psnr']:7.2f} "
                                 f"{c['ssim']:7.4f} {c['seconds_per_slice']:8.3f}")
    errors = sorted({f"{r['kind']} {r['method']}: {r['error']}" for r in result["rows"] if "error" in r})
    lines += [f"skipped: {e}" for e in errors]
    lines.append("\nKMMD^2 (Gaussian kernel, median bandwidth) restored vs healthy crops of the lesion slices")
    for key, v in result["kmmd"].items():
        lines.append(f"{key:<20} unbiased {v['kmmd2_unbiased']:.6f}  biased {v['kmmd2_biased']:.6f}  (n={v['n_x']})")
    return "\n".join(lines)


def run_evaluate(args) -> int:
    """``evaluate inpainting``: every method on the same held-out lesions, plus the Figure 6 check."""
    import json
    from pathlib import Path

    if args.threads:
        torch.set_num_threads(int(args.threads))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SpineInpaintError(f"unknown method {', '.join(unknown)} (use {', '.join(METHODS)})")
    if args.phantoms < 0 or args.real < 0 or args.lesions_per_case < 1:
        raise SpineInpaintError("--phantoms and --real must be >= 0 and --lesions-per-case >= 1")
    models = ModelCache(args.weights_dir)
    lesions_ = evaluation_lesions(args.phantoms, args.lesions_per_case, args.real, args.seed, progress=not args.quiet,
                                  cache=args.cache or None)
    result = evaluate(lesions_, methods, grey=args.grey, steps=args.steps, restarts=args.restarts, models=models,
                      seed=args.seed, progress=not args.quiet)
    print(format_summary(result))
    gan_methods = [m for m in methods if m in ("context",) + GAN_METHODS]
    for a in gan_methods:
        if "biharmonic" in methods:
            w = paired_wins(result["rows"], a, "biharmonic")
            print(f"destructive, {a} vs biharmonic on the same {w['lesions']} lesions: Dice in better on "
                  f"{w['dice_in_wins']}, HD95 in better on {w['hd95_in_wins']}; mean Dice {w['mean_dice_in'][0]:.3f} "
                  f"vs {w['mean_dice_in'][1]:.3f}, mean HD95 {w['mean_hd95_in'][0]:.2f} vs {w['mean_hd95_in'][1]:.2f} mm")
            result.setdefault("paired", {})[f"{a}_vs_biharmonic"] = w
    fig6 = [m.strip() for m in (args.figure6 or ",".join(gan_methods)).split(",") if m.strip()]
    check = figure6_check(fig6, steps=args.steps, restarts=args.restarts, models=models, seed=args.seed)
    print("\nFigure 6 check (16x16 holes on healthy held-out crops; the paper's WGAN-GP KMMD: 0.001084)")
    for m in check["results"]:
        k = check["kmmd"][m]
        print(f"{m:<12} Dice in square {check['dice_in'][m]:.3f}  KMMD^2 unbiased {k['kmmd2_unbiased']:.6f} "
              f"biased {k['kmmd2_biased']:.6f}  {check['seconds'][m]:.3f} s/crop")
    table = gan_table(models, check["healthy_test_crops"], seed=args.seed)
    print("\nTable II reproduction: parameters (shipped width; at the papers' width 64) and KMMD^2 of 500 samples "
          "(binarised) vs the held-out healthy test crops")
    for m, row in table.items():
        print(f"{m:<8} G {row['generator_parameters']:>9,d} D {row['critic_parameters']:>9,d} | width-64 G "
              f"{row['generator_parameters_w64']:>10,d} D {row['critic_parameters_w64']:>10,d} | KMMD^2 unbiased "
              f"{row.get('kmmd2_unbiased', float('nan')):.6f} biased {row.get('kmmd2_biased', float('nan')):.6f}")
    result["gan_table"] = table
    if args.figures:
        folder = Path(args.figures)
        folder.mkdir(parents=True, exist_ok=True)
        gan_samples_png(models, check["healthy_test_crops"], folder / "gan_samples.png", seed=args.seed)
        folder.mkdir(parents=True, exist_ok=True)
        _figure6_png(check, folder / "inpainting_figure6.png")
        _examples_png(result["examples"], methods, folder / "inpainting_destructive.png")
        print(f"figures: {folder / 'inpainting_figure6.png'}, {folder / 'inpainting_destructive.png'}")
    if args.json:
        payload = {k: v for k, v in result.items() if k != "examples"}
        payload["figure6"] = {k: check[k] for k in ("dice_in", "kmmd", "seconds")}
        payload["paper_kmmd_wgan_gp"] = 0.001084
        payload["settings"] = {"methods": methods, "phantoms": args.phantoms, "lesions_per_case": args.lesions_per_case,
                               "real": args.real, "steps": args.steps, "restarts": args.restarts, "seed": args.seed,
                               "kmmd_estimator": "squared MMD, Gaussian kernel, median-heuristic bandwidth, "
                                                 "flattened 64x64 crops in [0, 1]; unbiased and biased"}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(payload, indent=2, default=float))
    return 0
