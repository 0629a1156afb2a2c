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

import numpy as np
import torch
import torch.nn.functional as F

from SpineInpaintLib import SpineInpaintError
from SpineInpaintLib.inpainting import networks as gan
from SpineInpaintLib.inpainting.crops import (
    CROP_FOV_MM,
    CROP_SIZE,
    CROP_WINDOW,
    crop_slice,
)

__all__ = [
    "METHODS", "GAN_METHODS", "context_input", "contextual_weights", "optimise_latent", "poisson_blend",
    "ModelCache", "inpaint_crops", "biharmonic_fill", "nearest_slice_fill", "MIN_AREA_FRACTION",
    "CONTEXT_Z_SIGMA_MM", "LevelGeometry", "level_geometry",
]

#: Every method :func:`restore_mask` / :func:`restore_ct` knows.
METHODS: tuple[str, ...] = ("context", "wgan-gp", "dcgan", "pggan", "biharmonic", "nearest")

#: The paper's z-optimisation methods.
GAN_METHODS: tuple[str, ...] = ("wgan-gp", "dcgan", "pggan")

#: Fraction of a level's largest slice area below which a slice is not part of the level's crop stack
#: (as :func:`SpineInpaintLib.datasets.vertebra_crops`).
MIN_AREA_FRACTION = 0.25


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
            self._models[key] = gan.load_gan(model, kind, self.directory)
        return self._models[key]

    def context(self, kind: str):
        key = ("context", kind)
        if key not in self._models:
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
