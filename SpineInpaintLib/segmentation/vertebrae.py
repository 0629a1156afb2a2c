"""From a spine mask to numbered vertebrae: cleaning, flooding from the body cores, level numbering."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from SpineInpaintLib.segmentation.networks import CLASS_IDS

__all__ = ["clean_mask", "directional_flood", "number_chain", "split_vertebrae", "SKIP_COST"]

#: Cost of skipping a level when the vertebrae are numbered (:func:`number_chain`), in mean votes of a vertebra.
SKIP_COST = 1.0

#: Levels caudal to cranial as the numbering walks them: the sacrum and S1 (fused) first, then L5 ... C1.
_CHAIN: tuple[int, ...] = (26,) + tuple(range(27, 51))


# --- post-processing -----------------------------------------------------------------------------------
def clean_mask(mask: np.ndarray, spacing_zyx: Sequence[float], *, min_ml: float = 0.5, max_gap_mm: float = 12.0,
               keep_fraction: float = 0.2) -> np.ndarray:
    """Remove stray components of a 3D spine mask.

    Starting from the largest connected component, keeps every component of at least ``min_ml``
    millilitres whose bounding box comes within ``max_gap_mm`` of a kept one (transitively, so a
    column of vertebrae separated by discs stays whole), and any component at least
    ``keep_fraction`` of the largest (a spine segment beyond a wider gap). Specks in ribs, pelvis,
    bowel contrast or the table go.
    """
    mask = np.asarray(mask) > 0
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if n <= 1:
        return mask
    spacing = np.asarray(spacing_zyx, float)
    sizes = np.bincount(labels.ravel())[1:] * float(np.prod(spacing)) / 1000.0
    boxes = ndimage.find_objects(labels)
    lo = np.array([[sl.start for sl in box] for box in boxes], float) * spacing
    hi = np.array([[sl.stop - 1 for sl in box] for box in boxes], float) * spacing
    largest = int(np.argmax(sizes))
    keep = np.zeros(n, bool)
    keep[largest] = True
    keep |= sizes >= keep_fraction * sizes[largest]
    candidates = sizes >= min_ml
    changed = True
    while changed:
        changed = False
        for k in np.nonzero(candidates & ~keep)[0]:
            # Per-axis gap between box k and every kept box (0 where they overlap).
            gap = np.maximum(0.0, np.maximum(lo[keep] - hi[k], lo[k] - hi[keep]))
            if (np.sqrt((gap ** 2).sum(axis=1)) <= max_gap_mm).any():
                keep[k] = changed = True
    return np.concatenate([[False], keep])[labels]


def directional_flood(seeds: np.ndarray, mask: np.ndarray, *, upward_cost: int = 1) -> np.ndarray:
    """Hand every voxel of ``mask`` to the seed it reaches at the least cost (multi-source shortest path).

    Steps are face-connected; a step in-plane or to the slice below (z - 1) costs 1, a step to the
    slice above (z + 1) costs ``upward_cost`` (integers: Dial's bucket queue, exact). With
    ``upward_cost=1`` this is breadth-first flooding. Ties go to the seed whose front got there first
    in a fixed order of directions (deterministic).

    Parameters
    ----------
    seeds
        int (z, y, x) labels, 0 = not a seed; seeds outside ``mask`` are ignored.
    mask
        Binary (z, y, x) region to flood.

    Returns
    -------
    int32 labels of the seeds on ``mask`` (0 where no seed is reachable and outside ``mask``).
    """
    if int(upward_cost) < 1:
        raise ValueError(f"upward_cost must be an integer >= 1, got {upward_cost}")
    mask = np.asarray(mask) > 0
    seeds = np.where(mask, np.asarray(seeds), 0).astype(np.int32)
    out = np.zeros(mask.shape, np.int32)
    if not seeds.any():
        return out
    box = ndimage.find_objects(mask.astype(np.uint8))[0]
    # A one-voxel frame of False around the box, so that neighbour offsets of flat indices never wrap.
    region = np.pad(mask[box], 1)
    labels = np.pad(seeds[box], 1).ravel()
    inside = region.ravel()
    strides = np.array(region.strides) // region.itemsize
    moves = ((int(strides[0]), int(upward_cost)), (-int(strides[0]), 1), (int(strides[1]), 1),
             (-int(strides[1]), 1), (int(strides[2]), 1), (-int(strides[2]), 1))
    unreached = np.iinfo(np.int64).max
    dist = np.where(labels > 0, 0, unreached).astype(np.int64)
    buckets: dict[int, list[np.ndarray]] = {0: [np.flatnonzero(labels)]}
    while buckets:
        t = min(buckets)
        front = np.unique(np.concatenate(buckets.pop(t)))
        front = front[dist[front] == t]  # entries improved since they were queued are stale
        for offset, cost in moves:
            target = front + offset
            better = inside[target] & (dist[target] > t + cost)
            target, source = target[better], front[better]
            target, first = np.unique(target, return_index=True)
            dist[target] = t + cost
            labels[target] = labels[source[first]]
            if target.size:
                buckets.setdefault(t + cost, []).append(target)
    labels[dist == unreached] = 0
    out[box] = labels.reshape(region.shape)[1:-1, 1:-1, 1:-1]
    return out


def number_chain(votes: np.ndarray, *, skip_cost: float = SKIP_COST) -> list[int]:
    """Chain positions of vertebrae ordered caudal to cranial, from their votes for each position.

    ``votes`` (n, positions): the network's summed level probability of each vertebra for each
    position of the chain (sacrum-and-S1, L5, L4, ...). Consecutive vertebrae take consecutive
    positions, or skip one where two vertebrae came out as one piece (a missed disc): a skip costs
    ``skip_cost`` times the mean vote mass of a vertebra, so one merge no longer shifts every level
    above it. Without skips this is the best offset of a consecutive run. Dynamic programming, exact.
    """
    votes = np.asarray(votes, float)
    n, m = votes.shape
    if n == 0:
        return []
    if n > m:  # more pieces than levels: the extra ones get position m (no level)
        return number_chain(votes[:m], skip_cost=skip_cost) + [m] * (n - m)
    penalty = skip_cost * float(votes.sum()) / n
    best = np.full((n, m), -np.inf)
    came_from = np.zeros((n, m), int)
    best[0] = votes[0]
    for k in range(1, n):
        for p in range(k, m):
            options = [(best[k - 1, p - 1], p - 1)]
            if p >= 2:
                options.append((best[k - 1, p - 2] - penalty, p - 2))
            value, previous = max(options)
            best[k, p] = value + votes[k, p]
            came_from[k, p] = previous
    positions = [int(np.argmax(best[n - 1]))]
    for k in range(n - 1, 0, -1):
        positions.append(int(came_from[k, positions[-1]]))
    return positions[::-1]


def split_vertebrae(mask: np.ndarray, level_scores: np.ndarray, spacing_zyx: Sequence[float], *,
                    core_mm: float = 5.0, min_core_ml: float = 0.8, max_lateral_mm: float = 35.0,
                    flood: str = "geodesic", attach_mm: float = 6.0, keep_ml: float = 5.0,
                    contact_erosion: int = 1, upward_cost: int = 4, fill: np.ndarray | None = None) -> np.ndarray:
    """Split a 3D spine mask (LPS grid, slices inferior to superior) into numbered vertebrae.

    The vertebral bodies are the thick parts of the mask: the connected components of the voxels deeper
    than ``core_mm`` inside it, separated by the discs, seed a flooding (``flood``: ``'geodesic'``,
    breadth-first inside the mask, default; or ``'distance'``, a watershed of the distance map) that
    hands every mask voxel connected to them to one vertebra (cores more than ``max_lateral_mm`` from
    the column's mid-line, e.g. an iliac wing taken for spine, seed nothing). The vertebrae, ordered
    along the slices, get TotalSegmentator ids (sacrum with S1, L5, L4, ...) that agree best with the
    network's per-voxel level scores, consecutive but for a level skipped where that pays more than a
    vertebra's votes (two vertebrae merged into one piece; :func:`number_chain`); inside the
    sacrum-and-S1 segment each voxel takes the better of the two ids. Pieces of the mask that no body
    reaches take the nearest vertebra when they come within ``attach_mm`` of one, or hold ``keep_ml`` or
    more within ``max_lateral_mm`` of the column, and are left out (0) otherwise. The geodesic flooding
    first runs inside the mask eroded ``contact_erosion`` times (6-connected), so that the thin contacts
    between neighbours (facet joints, touching spinous processes) are no path, and a step to the slice
    above costs ``upward_cost`` times a step in-plane or down (a vertebra's lamina, inferior articular
    and spinous processes hang below its pedicles, so bone is reached from the body above it rather than
    climbed into from the body below); the rim left by the erosion is filled last. ``fill`` (e.g. a
    known lesion) counts as bone while the bodies are found and flooded, so that a body or pedicle the
    lesion destroyed still joins the vertebra's parts; it gets no label itself.

    Parameters
    ----------
    mask
        Binary (z, y, x) mask.
    level_scores
        float (N_CLASSES, z, y, x) per-voxel class probabilities (:data:`CLASS_IDS`).
    spacing_zyx
        Voxel size (mm).

    Returns
    -------
    uint8 (z, y, x) label map with TotalSegmentator v2 ids (0 outside the mask).
    """
    mask = np.asarray(mask) > 0
    out = np.zeros(mask.shape, np.uint8)
    if not mask.any():
        return out
    fill = _as_fill(fill, mask.shape)
    if fill is not None:
        # Split the mask with the lesion counted as bone, then take the lesion's voxels back out.
        out = split_vertebrae(mask | fill, level_scores, spacing_zyx, core_mm=core_mm, min_core_ml=min_core_ml,
                              max_lateral_mm=max_lateral_mm, flood=flood, attach_mm=attach_mm,
                              keep_ml=keep_ml, contact_erosion=contact_erosion, upward_cost=upward_cost)
        out[~mask] = 0
        return out
    scores = np.asarray(level_scores)
    dist = ndimage.distance_transform_edt(mask, sampling=spacing_zyx)
    cores, n = _body_cores(mask, dist, spacing_zyx, core_mm=core_mm, min_core_ml=min_core_ml,
                           max_lateral_mm=max_lateral_mm)
    if n == 0:
        return _network_levels(mask, scores)
    segments = _flood_from_cores(mask, cores, dist, flood=flood, contact_erosion=contact_erosion,
                                 upward_cost=upward_cost)
    segments = _attach_unreached(segments, mask, cores, spacing_zyx, attach_mm=attach_mm, keep_ml=keep_ml,
                                 max_lateral_mm=max_lateral_mm)
    out = _number_segments(segments, mask, cores, n, scores)
    return _split_sacrum(out, scores)


def _as_fill(fill: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
    """``fill`` as a boolean mask of ``shape``, or None when there is none or it is empty.

    Raises
    ------
    ValueError
        ``fill`` is not on the mask's grid.
    """
    if fill is None:
        return None
    if np.shape(fill) != shape:
        raise ValueError(f"fill has shape {np.shape(fill)}, the mask {shape}")
    fill = np.asarray(fill) > 0
    return fill if fill.any() else None


def _body_cores(mask: np.ndarray, dist: np.ndarray, spacing_zyx: Sequence[float], *, core_mm: float,
                min_core_ml: float, max_lateral_mm: float) -> tuple[np.ndarray, int]:
    """Seeds of the vertebral bodies: the thick parts of the mask near the column's mid-line.

    Parameters
    ----------
    mask
        Binary (z, y, x) spine mask.
    dist
        Distance (mm) of each mask voxel to the outside of the mask.
    spacing_zyx
        Voxel size (mm).
    core_mm, min_core_ml, max_lateral_mm
        As in :func:`split_vertebrae`.

    Returns
    -------
    (cores, n)
        int32 labels 1..n of the kept cores (0 elsewhere) and their number.
    """
    cores, n = ndimage.label(dist > core_mm)
    if not n:
        return cores, n
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    sizes = np.bincount(cores.ravel())[1:] * voxel_ml
    usable = sizes >= min_core_ml
    floor = max(min_core_ml, 0.2 * float(np.median(sizes[usable]))) if usable.any() else min_core_ml
    big = sizes >= floor
    x_mm = ndimage.mean(np.broadcast_to(np.arange(mask.shape[2]) * spacing_zyx[2], mask.shape), cores,
                        np.arange(1, n + 1))
    big = _central_cores(mask, x_mm, sizes, big, spacing_zyx[2], max_lateral_mm)
    lut = np.zeros(n + 1, np.int32)
    lut[1:][big] = np.arange(1, int(big.sum()) + 1)
    return lut[cores], int(big.sum())


def _central_cores(mask: np.ndarray, x_mm: np.ndarray, sizes: np.ndarray, big: np.ndarray, x_spacing: float,
                   max_lateral_mm: float) -> np.ndarray:
    """The ``big`` cores within ``max_lateral_mm`` of the column's mid-line (a thick blob to the side is no body).

    The mid-line is the size-weighted median x of the big cores near the mask's own median column, so
    that a femoral head seen as one thick blob beside a column seen as thin pieces cannot pull it aside.

    Parameters
    ----------
    mask
        Binary (z, y, x) spine mask.
    x_mm, sizes
        Mean x (mm) and volume (ml) of each core.
    big
        bool per core: large enough to count.
    x_spacing
        Voxel size (mm) along x.
    max_lateral_mm
        As in :func:`split_vertebrae`.

    Returns
    -------
    bool per core: big and central.
    """
    column_counts = np.cumsum(mask.sum(axis=(0, 1)))
    x_mask = float(np.searchsorted(column_counts, column_counts[-1] / 2.0)) * x_spacing
    big = big & (np.abs(x_mm - x_mask) <= max_lateral_mm)
    if big.any():
        order_x = np.argsort(x_mm[big])
        weights = np.cumsum(sizes[big][order_x])
        x_mid = x_mm[big][order_x][np.searchsorted(weights, weights[-1] / 2.0)]
        big &= np.abs(x_mm - x_mid) <= max_lateral_mm
    return big


def _network_levels(mask: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Per-voxel network levels on ``mask`` (the fallback when no vertebral body is thick enough).

    Parameters
    ----------
    mask
        Binary (z, y, x) spine mask.
    scores
        float (N_CLASSES, z, y, x) class probabilities.

    Returns
    -------
    uint8 (z, y, x) TotalSegmentator ids of the most probable vertebra class, 0 outside ``mask``.
    """
    classes = np.argmax(scores[1:], axis=0) + 1
    return np.where(mask, np.asarray(CLASS_IDS, np.uint8)[classes], 0).astype(np.uint8)


def _flood_from_cores(mask: np.ndarray, cores: np.ndarray, dist: np.ndarray, *, flood: str,
                      contact_erosion: int, upward_cost: int) -> np.ndarray:
    """Hand the mask's voxels to the body cores: geodesic flooding, or a watershed of the distance map.

    Parameters
    ----------
    mask
        Binary (z, y, x) spine mask.
    cores
        int labels of the body cores.
    dist
        Distance (mm) of each mask voxel to the outside of the mask.
    flood, contact_erosion, upward_cost
        As in :func:`split_vertebrae`.

    Returns
    -------
    int labels of the cores on ``mask`` (0 where no core reaches).
    """
    from skimage.segmentation import watershed

    if flood != "geodesic":
        return watershed(-dist, cores, mask=mask)
    inner = mask
    if contact_erosion > 0:
        # Erosion cuts the one- or two-voxel contacts of facet joints and touching spinous processes.
        inner = ndimage.binary_erosion(mask, ndimage.generate_binary_structure(3, 1),
                                       iterations=contact_erosion) | (cores > 0)
    # Climbing costs more than descending: the posterior elements hang below their own pedicles.
    seeds = directional_flood(cores, inner, upward_cost=upward_cost)
    # What the erosion left out is flooded last, from the labelled voxels next to it.
    return watershed(np.zeros(mask.shape, np.uint8), seeds, mask=mask)


def _attach_unreached(segments: np.ndarray, mask: np.ndarray, cores: np.ndarray, spacing_zyx: Sequence[float], *,
                      attach_mm: float, keep_ml: float, max_lateral_mm: float) -> np.ndarray:
    """Give the pieces of bone no core reached to the nearest vertebra, where they are spine.

    A piece within ``attach_mm`` of a vertebra (a posterior element cut off by a thin gap), or one of
    ``keep_ml`` or more within ``max_lateral_mm`` of the column (spine too thin to hold a core), takes
    the nearest vertebra; a small piece farther away (a rib end, an iliac crest) stays 0.

    Parameters
    ----------
    segments
        int labels of the flooded vertebrae on ``mask``; modified in place.
    mask
        Binary (z, y, x) spine mask.
    cores
        int labels of the body cores (their mean x is the column's).
    spacing_zyx
        Voxel size (mm).
    attach_mm, keep_ml, max_lateral_mm
        As in :func:`split_vertebrae`.

    Returns
    -------
    ``segments``, with the attached pieces labelled.
    """
    unreached = mask & (segments == 0)
    if not unreached.any():
        return segments
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    gap, nearest = ndimage.distance_transform_edt(segments == 0, sampling=spacing_zyx, return_indices=True)
    pieces, n_pieces = ndimage.label(unreached, structure=np.ones((3, 3, 3), bool))
    index = np.arange(1, n_pieces + 1)
    touching = ndimage.minimum(gap, pieces, index) <= attach_mm
    large = ndimage.sum_labels(unreached, pieces, index) * voxel_ml >= keep_ml
    x_of = np.broadcast_to(np.arange(mask.shape[2]) * spacing_zyx[2], mask.shape)
    column_x = float(np.mean(x_of[cores > 0]))
    central = np.abs(ndimage.mean(x_of, pieces, index) - column_x) <= max_lateral_mm
    take = np.concatenate([[False], touching | (large & central)])[pieces]
    segments[take] = segments[tuple(i[take] for i in nearest)]
    return segments


def _chain_votes(segments: np.ndarray, mask: np.ndarray, scores: np.ndarray, n: int) -> np.ndarray:
    """Summed network probability of each chain position (:data:`_CHAIN`) per segment.

    Parameters
    ----------
    segments
        int labels 1..n of the vertebrae on ``mask``.
    mask
        Binary (z, y, x) spine mask.
    scores
        float (N_CLASSES, z, y, x) class probabilities.
    n
        Number of segments.

    Returns
    -------
    float (n, len(_CHAIN)) votes; the sacrum and S1 vote for the first position, "above T10" is spread
    evenly over T9 ... C1.
    """
    chain_votes = np.zeros((n, len(_CHAIN)))
    flat_segments = segments[mask]
    for c, label in enumerate(CLASS_IDS):
        if c == 0:
            continue
        per_segment = np.bincount(flat_segments, weights=scores[c][mask], minlength=n + 1)[1:]
        if label == 25 or label == 26:
            chain_votes[:, 0] += per_segment
        elif label == 35:
            chain_votes[:, _CHAIN.index(35):] += per_segment[:, None] / (len(_CHAIN) - _CHAIN.index(35))
        else:
            chain_votes[:, _CHAIN.index(label)] += per_segment
    return chain_votes


def _number_segments(segments: np.ndarray, mask: np.ndarray, cores: np.ndarray, n: int,
                     scores: np.ndarray) -> np.ndarray:
    """TotalSegmentator ids of the segments, numbered along the column by their votes (:func:`number_chain`).

    Parameters
    ----------
    segments
        int labels 1..n of the vertebrae on ``mask``.
    mask
        Binary (z, y, x) spine mask.
    cores
        int labels 1..n of the body cores (their mean slice orders the segments).
    n
        Number of segments.
    scores
        float (N_CLASSES, z, y, x) class probabilities.

    Returns
    -------
    uint8 (z, y, x) ids, the sacrum-and-S1 segment as 26; 0 for pieces beyond the chain.
    """
    # Slices run inferior to superior: a core's mean slice orders it caudal to cranial.
    z_centre = ndimage.mean(np.arange(mask.shape[0])[:, None, None] * np.ones_like(cores), cores, np.arange(1, n + 1))
    order = np.argsort(z_centre)
    positions = number_chain(_chain_votes(segments, mask, scores, n)[order])
    lut = np.zeros(n + 1, np.uint8)
    for k in range(n):
        lut[order[k] + 1] = _CHAIN[positions[k]] if positions[k] < len(_CHAIN) else 0
    return lut[segments]


def _split_sacrum(out: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Split the fused sacrum-and-S1 segment (26) voxel by voxel into sacrum (25) and S1 (26).

    Parameters
    ----------
    out
        uint8 (z, y, x) ids; modified in place.
    scores
        float (N_CLASSES, z, y, x) class probabilities.

    Returns
    -------
    uint8 (z, y, x) ids.
    """
    s1 = out == 26
    if s1.any():
        sacrum = scores[CLASS_IDS.index(25)] > scores[CLASS_IDS.index(26)]
        out[s1 & sacrum] = 25
    return out.astype(np.uint8)
