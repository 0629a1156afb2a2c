"""Restore a lesioned vertebra in the label map (and the CT): slice by slice, level by level, on the input grid."""

from __future__ import annotations

import dataclasses
import time
import warnings

import numpy as np
from scipy import ndimage

from SpineInpaintLib import SpineInpaintError
from SpineInpaintLib.core import io
from SpineInpaintLib.core.labels import VERTEBRA_IDS, spine_mask, vertebra_mask
from SpineInpaintLib.inpainting.crops import (
    CROP_FOV_MM,
    CROP_SIZE,
    CROP_WINDOW,
)
from SpineInpaintLib.inpainting.methods import (
    CONTEXT_Z_SIGMA_MM,
    GAN_METHODS,
    METHODS,
    ModelCache,
    _blend,
    _crop,
    _grey,
    _neighbour_prior,
    biharmonic_fill,
    inpaint_crops,
    level_geometry,
    nearest_slice_fill,
)

__all__ = ["InpaintingResult", "restore_mask", "restore_ct"]


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
    vertebrae = vertebra_mask(labels)
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
        present = [v for v in np.unique(lab).tolist() if v in VERTEBRA_IDS]
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
            new_labels[mask & (restored_l == 0) & vertebra_mask(new_labels)] = 0
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
