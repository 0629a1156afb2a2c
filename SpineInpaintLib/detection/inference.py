"""Spinal lesion detection: MONAI RetinaNet (2D, per axial slice) and the paper's Faster R-CNN VGG-16.

Input (both detectors, the same): a 2.5D crop around the spine. The slice and its neighbours
``NEIGHBOUR_MM`` above and below (3 channels, like DeepLesion's 3-slice input) are resampled onto a
``CROP_SIZE`` x ``CROP_SIZE`` grid of ``GRID_MM`` pixels centred on the centroid of the spine mask on
that slice, and the HU window :data:`WINDOW` is mapped to [0, 1]. The paper (Sec. II.C) fed whole
512x512 slices to Faster R-CNN; detection is only needed near the spine, so a 128 mm square at 1 mm
(a vertebra is 40-50 mm wide, lesions 10-60 mm) keeps everything that matters at 1/16 of the pixels
and the same physical scale for every scanner. ``CROP_SIZE`` and ``GRID_MM`` are the defaults of new
training; a trained detector carries its own (``input`` of its weights' JSON; :class:`Detector`
``crop_size`` and ``grid_mm``), so weights trained on a finer grid run on that grid.

Boxes are ``(x1, y1, x2, y2)`` in continuous pixel coordinates (x = column, y = row; pixel ``j``
covers ``[j, j + 1)``; end exclusive), the convention of :mod:`SpineInpaintLib.datasets` and
:mod:`SpineInpaintLib.metrics`. MONAI's detector orders box coordinates by array axis (row first);
:class:`Detector` converts, so callers only see the (x, y) convention.

Detectors

- ``retinanet``: :class:`monai.apps.detection.networks.retinanet_network.RetinaNet` on a 2D MONAI
  ResNet with a 64-channel feature pyramid, inside :class:`~monai.apps.detection.networks.
  retinanet_detector.RetinaNetDetector` (ATSS matching, hard-negative sampling, NMS), in two presets
  (:data:`RETINANET_PRESETS`): ``base`` (the default: two blocks per stage, 32-256 channels, pyramid
  strides 4-32, anchors of 8 mm squares and 6x12 / 12x6 mm rectangles doubled per level, 6-96 mm)
  and ``small`` (the first shipped detector: one block per stage, 24-192 channels, strides 8-32,
  anchors 14 mm and 10x20 / 20x10 mm, 10-80 mm). Anchors come from
  :class:`~monai.apps.detection.utils.anchor_utils.AnchorGeneratorWithAnchorShape`. Box regression
  is trained with smooth L1 on the encoded offsets or generalised IoU (:data:`BOX_LOSSES`).
- ``faster_rcnn``: :class:`torchvision.models.detection.FasterRCNN` on VGG-16's convolutional part
  up to conv5_3 (stride 16, 512 channels), an RPN with 3 scales x 3 ratios on that single map, RoI
  pooling (:class:`torchvision.ops.RoIPool`, 7x7, as the paper) and a two-layer MLP head. Deviations
  from the paper, for CPU training without pretrained weights: batch-normalised VGG-16
  (``vgg16_bn``; the paper fine-tuned ImageNet weights, which we may not download, and plain VGG-16
  does not train from scratch in our budget), anchor scales 16/32/64 px (the paper's
  128/256/512 at 512 px scaled to our 1 mm crop), and a 1024-unit head instead of 4096.

Volume level: :func:`detect_volume` runs a detector on every axial slice holding spine, keeps
boxes that overlap the spine mask, links boxes of adjacent slices into 3D lesions
(:class:`Lesion3D`) and :func:`lesion_mask_from_detections` turns them into the mask the inpainter
fills (box intersected with the vertebra, refined by intensity).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from SpineInpaintLib import SpineInpaintError
from SpineInpaintLib.core import io
from SpineInpaintLib.core.labels import vertebra_mask
from SpineInpaintLib.core.weights import load_weights, read_weights_metadata, unwrap, weights_dir
from SpineInpaintLib.detection.networks import (
    ARCHITECTURES,
    CROP_SIZE,
    _apply_box_loss,
    build_faster_rcnn,
    build_retinanet,
    check_box_loss,
)

__all__ = [
    "GRID_MM", "WINDOW", "NEIGHBOUR_MM", "DEFAULT_WEIGHTS", "PAPER_RESULT", "neighbour_offset", "slice_stack",
    "spine_centre", "crop_slices", "crop_to_source", "source_to_crop", "normalise", "Detector", "check_input_grid",
    "load_detector", "spine_binary", "detect_slices", "Lesion3D", "link_detections", "volume_thresholds",
    "lps_inputs", "detect_volume", "lesions_from_slices", "lesion_mask_from_detections", "find_lesions",
    "VOLUME_SCORE_THRESHOLD", "VOLUME_SLICE_THRESHOLD", "VOLUME_MIN_SLICES",
]


#: Pixel size of the crop (mm).
GRID_MM = 1.0

#: HU window mapped to [0, 1] (soft tissue and bone both visible: lytic and sclerotic lesions).
WINDOW = (-200.0, 1300.0)

#: Distance (mm) of the neighbour slices stacked as channels 0 and 2 (at least one slice away).
NEIGHBOUR_MM = 2.0

#: The shipped RetinaNet weights (safetensors + JSON metadata).
DEFAULT_WEIGHTS = weights_dir("detection") / "retinanet.safetensors"

#: The paper's result (Miao et al., Sec. III.B): Faster R-CNN VGG-16 on 282 DeepLesion bone slices.
PAPER_RESULT = {"detector": "paper: Faster R-CNN VGG-16", "ap50": 0.7688, "images_per_s": 60.33,
                "device": "GPU", "data": "DeepLesion bone lesions, 512x512"}

#: Volume-level thresholds (:func:`detect_volume`) for weights whose JSON has no ``volume_level``
#: (those tuned for each weights file on the validation volumes, ``evaluate detection --tune``, win).
VOLUME_SCORE_THRESHOLD = 0.9

VOLUME_SLICE_THRESHOLD = 0.5

VOLUME_MIN_SLICES = 3

#: Value (HU) outside the scan.
_AIR_HU = -1000.0


# --- preprocessing -------------------------------------------------------------------------------
def neighbour_offset(slice_mm: float, neighbour_mm: float = NEIGHBOUR_MM) -> int:
    """Index distance of the neighbour slices: ``neighbour_mm`` rounded to slices, at least 1."""
    if not slice_mm > 0:
        raise SpineInpaintError(f"slice spacing must be positive, got {slice_mm}")
    return max(1, int(round(neighbour_mm / slice_mm)))


def slice_stack(volume: np.ndarray, z: int, offset: int) -> np.ndarray:
    """Slices ``z - offset, z, z + offset`` of a (z, y, x) array (edge slices repeated), shape (3, y, x)."""
    n = volume.shape[0]
    if not 0 <= z < n:
        raise SpineInpaintError(f"slice {z} is outside the volume's {n} slices")
    return np.stack([volume[min(max(k, 0), n - 1)] for k in (z - offset, z, z + offset)])


def spine_centre(spine: np.ndarray) -> tuple[float, float] | None:
    """Centroid (row, column) of a 2D spine mask, or ``None`` when it is empty."""
    rows, cols = np.nonzero(spine)
    if rows.size == 0:
        return None
    return float(rows.mean()), float(cols.mean())


def _crop_grid(centre_rc: Sequence[float], spacing_yx: Sequence[float], size: int, grid_mm: float,
               matrix: np.ndarray | None = None) -> np.ndarray:
    """Source (row, col) indices of every pixel centre of a crop: shape (2, size, size).

    ``matrix`` (2x2, acting on (row, col) millimetre offsets) rotates/scales/flips the crop about
    its centre (training augmentation); identity by default.
    """
    offsets = (np.arange(size) - (size - 1) / 2.0) * grid_mm
    rr, cc = np.meshgrid(offsets, offsets, indexing="ij")
    mm = np.stack([rr.ravel(), cc.ravel()])
    if matrix is not None:
        mm = np.asarray(matrix, float) @ mm
    rows = centre_rc[0] + mm[0] / spacing_yx[0]
    cols = centre_rc[1] + mm[1] / spacing_yx[1]
    return np.stack([rows, cols]).reshape(2, size, size)


def crop_slices(stack: np.ndarray, centre_rc: Sequence[float], spacing_yx: Sequence[float], *,
                size: int = CROP_SIZE, grid_mm: float = GRID_MM, matrix: np.ndarray | None = None,
                order: int = 1, cval: float = _AIR_HU) -> np.ndarray:
    """Resample each channel of ``stack`` (C, rows, cols) onto the crop grid: (C, size, size) float32."""
    stack = np.asarray(stack)
    if stack.ndim == 2:
        stack = stack[None]
    grid = _crop_grid(centre_rc, spacing_yx, size, grid_mm, matrix)
    return np.stack([ndimage.map_coordinates(channel.astype(np.float32, copy=False), grid, order=order,
                                             mode="constant", cval=cval, prefilter=False)
                     for channel in stack]).astype(np.float32)


def crop_to_source(boxes: np.ndarray, centre_rc: Sequence[float], spacing_yx: Sequence[float], *,
                   size: int = CROP_SIZE, grid_mm: float = GRID_MM) -> np.ndarray:
    """Map (N, 4) boxes from crop pixels to the source slice's pixels (no rotation; continuous coords)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    sx, sy = grid_mm / spacing_yx[1], grid_mm / spacing_yx[0]
    # Pixel-edge coordinates: crop pixel j covers [j, j + 1); the crop centre is at size / 2.
    cx, cy = centre_rc[1] + 0.5, centre_rc[0] + 0.5
    out = np.empty_like(boxes)
    out[:, [0, 2]] = cx + (boxes[:, [0, 2]] - size / 2.0) * sx
    out[:, [1, 3]] = cy + (boxes[:, [1, 3]] - size / 2.0) * sy
    return out


def source_to_crop(boxes: np.ndarray, centre_rc: Sequence[float], spacing_yx: Sequence[float], *,
                   size: int = CROP_SIZE, grid_mm: float = GRID_MM) -> np.ndarray:
    """Inverse of :func:`crop_to_source`."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    sx, sy = grid_mm / spacing_yx[1], grid_mm / spacing_yx[0]
    cx, cy = centre_rc[1] + 0.5, centre_rc[0] + 0.5
    out = np.empty_like(boxes)
    out[:, [0, 2]] = (boxes[:, [0, 2]] - cx) / sx + size / 2.0
    out[:, [1, 3]] = (boxes[:, [1, 3]] - cy) / sy + size / 2.0
    return out


def normalise(hu: np.ndarray, window: Sequence[float] = WINDOW) -> np.ndarray:
    """HU -> [0, 1] through ``window`` (clipped), float32."""
    lo, hi = float(window[0]), float(window[1])
    return np.clip((np.asarray(hu, np.float32) - lo) / (hi - lo), 0.0, 1.0)


class Detector:
    """One detector behind one interface: ``loss`` for training, ``predict`` for inference.

    Parameters
    ----------
    arch
        ``'retinanet'`` or ``'faster_rcnn'``.
    model
        The network (built by :func:`build_retinanet` / :func:`build_faster_rcnn` when ``None``).
    device
        Torch device.
    crop_size, grid_mm
        The input grid: side (pixels) and pixel size (mm) of the crop the network sees.
    """

    crop_size: int = CROP_SIZE
    grid_mm: float = GRID_MM

    def __init__(self, arch: str = "retinanet", model=None, device: str = "cpu",
                 score_threshold: float = 0.02, config: dict | None = None, *, crop_size: int = CROP_SIZE,
                 grid_mm: float = GRID_MM):

        if arch not in ARCHITECTURES:
            raise SpineInpaintError(f"unknown detector '{arch}' (use {' or '.join(ARCHITECTURES)})")
        check_input_grid(crop_size, grid_mm)
        self.arch = arch
        self.device = torch.device(device)
        self.crop_size = int(crop_size)
        self.grid_mm = float(grid_mm)
        if model is None:
            model = build_retinanet(config=config, score_threshold=score_threshold) if arch == "retinanet" else \
                build_faster_rcnn(score_threshold=score_threshold, size=self.crop_size)
        self.model = model.to(self.device)
        self.metadata: dict = {}

    # MONAI orders box coordinates by array axis (row, col); ours are (x = col, y = row).
    @staticmethod
    def _swap(boxes):
        return boxes[:, [1, 0, 3, 2]]

    def _targets(self, boxes_list):

        targets = []
        for boxes in boxes_list:
            b = torch.as_tensor(np.asarray(boxes, np.float32).reshape(-1, 4), device=self.device)
            # MONAI's classes are 0-based (no background class); torchvision's class 0 is background.
            label = 0 if self.arch == "retinanet" else 1
            if self.arch == "retinanet":
                b = self._swap(b)
            targets.append({"boxes": b, "labels": torch.full((b.shape[0],), label, dtype=torch.int64,
                                                             device=self.device)})
        return targets

    def loss(self, images, boxes_list) -> dict:
        """Training losses (dict of scalar tensors) for a batch (B, 3, H, W) in [0, 1] and its boxes."""

        self.model.train()
        images = torch.as_tensor(images, device=self.device)
        targets = self._targets(boxes_list)
        if self.arch == "retinanet":
            return self.model(images, targets)
        return self.model(list(images), targets)

    def predict(self, images) -> list[tuple[np.ndarray, np.ndarray]]:
        """(boxes (N, 4) x1, y1, x2, y2 in crop pixels, scores (N,)) per image of a batch in [0, 1]."""

        # The bare network, also under DDP: inference on one process must not wait for the others.
        model = unwrap(self.model)
        model.eval()
        with torch.no_grad():
            images = torch.as_tensor(np.asarray(images, np.float32), device=self.device)
            if self.arch == "retinanet":
                out = model(images)
                key_s = model.pred_score_key
                return [(self._swap(o["boxes"]).cpu().numpy().astype(np.float32),
                         o[key_s].cpu().numpy().astype(np.float32)) for o in out]
            out = model(list(images))
            return [(o["boxes"].cpu().numpy().astype(np.float32),
                     o["scores"].cpu().numpy().astype(np.float32)) for o in out]

    def parameters(self):
        return self.model.parameters()

    def set_box_loss(self, name: str) -> None:
        """Box-regression loss of RetinaNet training (:data:`BOX_LOSSES`); inference is unchanged."""
        check_box_loss(self.arch, name)
        if self.arch == "retinanet":
            _apply_box_loss(self.model, name)


def check_input_grid(crop_size: int, grid_mm: float) -> None:
    """Refuse an input grid the detectors cannot take: the side must be a multiple of 32 (the coarsest
    pyramid level) and at least 64 pixels, the pixel size between 0.25 and 4 mm."""
    if not (isinstance(crop_size, (int, np.integer)) and crop_size >= 64 and crop_size % 32 == 0):
        raise SpineInpaintError(f"detector crop size must be a multiple of 32 and at least 64 pixels, got {crop_size}")
    if not (math.isfinite(grid_mm) and 0.25 <= grid_mm <= 4.0):
        raise SpineInpaintError(f"detector pixel size must be between 0.25 and 4 mm, got {grid_mm}")


def load_detector(path: str | Path | None = None, *, arch: str | None = None, device: str = "cpu",
                  score_threshold: float = 0.02) -> Detector:
    """A trained detector from safetensors weights (default: the shipped RetinaNet, :data:`DEFAULT_WEIGHTS`).

    The architecture is read from the weights' JSON metadata (``arch``) unless given, the input grid
    from its ``input`` (``size``, ``pixel_mm``; :data:`CROP_SIZE` and :data:`GRID_MM` when absent).
    """
    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    if not path.exists():
        raise SpineInpaintError(f"detector weights not found: {path}")
    meta = read_weights_metadata(path)
    arch = arch or meta.get("arch", "retinanet")
    config = meta.get("architecture") if arch == "retinanet" else None
    grid = meta.get("input") or {}
    detector = Detector(arch, device=device, score_threshold=score_threshold, config=config,
                        crop_size=int((grid.get("size") or [CROP_SIZE])[0]),
                        grid_mm=float(grid.get("pixel_mm", GRID_MM)))
    detector.metadata = load_weights(detector.model, path)
    return detector


# --- per-slice detection on a volume ----------------------------------------------------------------
def _lps(volume: io.Volume) -> io.Volume:
    return io.reorient(volume, "LPS")


def spine_binary(mask: np.ndarray) -> np.ndarray:
    """The spine of a mask: a binary mask as is, or the vertebrae (ids 25-50) of a multi-label map.

    A label map also holds other tissues (organs, muscles, the phantom's fat); their centroid is not
    the spine's, and boxes on them are no spinal lesions.
    """
    mask = np.asarray(mask)
    if mask.size and mask.max() > 1:
        return vertebra_mask(mask)
    return mask > 0


def detect_slices(ct: io.Volume, spine: io.Volume, detector: Detector, *, slices: Sequence[int] | None = None,
                  batch_size: int = 8, score_threshold: float = 0.05,
                  progress: bool = False) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Boxes and scores on the axial slices of an LPS-oriented volume that hold spine.

    Parameters
    ----------
    ct, spine
        HU volume and a binary spine mask on the same grid, both LPS-oriented (see :func:`io.reorient`).
    slices
        Array-z indices to process (default: every slice where ``spine`` has voxels).

    Returns
    -------
    dict
        ``{z: (boxes (N, 4) in source pixels x1, y1, x2, y2, scores (N,))}`` for every processed slice.
    """
    if not ct.same_grid(spine):
        raise SpineInpaintError("the CT and the spine mask must be on the same grid")
    spine_arr = spine.array > 0
    zs = list(slices) if slices is not None else [int(z) for z in np.nonzero(spine_arr.any(axis=(1, 2)))[0]]
    spacing_yx = ct.spacing_zyx[1:]
    offset = neighbour_offset(ct.spacing_zyx[0])
    results: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    iterator = range(0, len(zs), batch_size)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="detection", unit="batch")
    for start in iterator:
        batch, centres = [], []
        for z in zs[start:start + batch_size]:
            centre = spine_centre(spine_arr[z]) or ((ct.shape[1] - 1) / 2.0, (ct.shape[2] - 1) / 2.0)
            batch.append(normalise(crop_slices(slice_stack(ct.array, z, offset), centre, spacing_yx,
                                               size=detector.crop_size, grid_mm=detector.grid_mm)))
            centres.append(centre)
        for z, centre, (boxes, scores) in zip(zs[start:start + batch_size], centres,
                                              detector.predict(np.stack(batch))):
            keep = scores >= score_threshold
            results[z] = (crop_to_source(boxes[keep], centre, spacing_yx, size=detector.crop_size,
                                         grid_mm=detector.grid_mm).astype(np.float32), scores[keep])
    return results


@dataclasses.dataclass
class Lesion3D:
    """A lesion found on consecutive axial slices.

    Attributes
    ----------
    boxes
        ``{z: (x1, y1, x2, y2)}`` per slice, pixels of the LPS-oriented volume (end exclusive).
    scores
        ``{z: score}``.
    confidence
        Mean of the three highest slice scores (fewer when the lesion spans fewer slices): one
        confident slice is not enough, a lesion must be seen on its neighbours too.
    box_lps
        ``((x, y, z) min, (x, y, z) max)`` corners in LPS millimetres.
    """

    boxes: dict[int, tuple[float, float, float, float]]
    scores: dict[int, float]
    confidence: float
    box_lps: tuple[tuple[float, float, float], tuple[float, float, float]]

    @property
    def z_range(self) -> tuple[int, int]:
        return min(self.boxes), max(self.boxes) + 1

    @property
    def n_slices(self) -> int:
        return len(self.boxes)

    def to_dict(self) -> dict:
        """JSON-ready description (for reports)."""
        return {"z_range": list(self.z_range), "n_slices": self.n_slices,
                "confidence": round(self.confidence, 4),
                "max_score": round(max(self.scores.values()), 4),
                "box_lps_mm": [[round(v, 2) for v in corner] for corner in self.box_lps],
                "boxes": {str(z): [round(float(v), 1) for v in b] for z, b in sorted(self.boxes.items())}}


def _box_iou_1(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def link_detections(per_slice: dict[int, tuple[np.ndarray, np.ndarray]], *, link_iou: float = 0.2,
                    max_gap: int = 1, min_slices: int = 2) -> list[tuple[dict, dict]]:
    """Link per-slice boxes into tracks across slices (greedy, by decreasing score).

    A box joins the track whose box on one of the ``max_gap + 1`` slices below overlaps it with
    IoU >= ``link_iou`` (the best such track); otherwise it starts a track. A track takes at most
    one box per slice. Tracks on fewer than ``min_slices`` slices are dropped.

    Returns a list of ``(boxes {z: box}, scores {z: score})``.
    """
    tracks: list[tuple[dict, dict]] = []
    for z in sorted(per_slice):
        boxes, scores = per_slice[z]
        for k in np.argsort(-np.asarray(scores), kind="mergesort"):
            box, score = tuple(float(v) for v in boxes[k]), float(scores[k])
            best, best_iou = None, link_iou
            for track in tracks:
                tb = track[0]
                if z in tb:
                    continue
                last = max(tb)
                if z - last > max_gap + 1:
                    continue
                iou = _box_iou_1(tb[last], box)
                if iou >= best_iou:
                    best, best_iou = track, iou
            if best is None:
                tracks.append(({z: box}, {z: score}))
            else:
                best[0][z] = box
                best[1][z] = score
    return [t for t in tracks if len(t[0]) >= min_slices]


def _lesion_from_track(boxes: dict, scores: dict, volume: io.Volume) -> Lesion3D:
    top = sorted(scores.values(), reverse=True)[:3]
    z1, z2 = min(boxes), max(boxes) + 1
    x1 = min(b[0] for b in boxes.values())
    y1 = min(b[1] for b in boxes.values())
    x2 = max(b[2] for b in boxes.values())
    y2 = max(b[3] for b in boxes.values())
    # Outer faces: continuous edge coordinates -> index coordinates are shifted by half a voxel.
    corners = np.array([[z, y, x] for z in (z1 - 0.5, z2 - 0.5) for y in (y1 - 0.5, y2 - 0.5)
                        for x in (x1 - 0.5, x2 - 0.5)])
    lps = volume.index_to_physical(corners)
    return Lesion3D(boxes, scores, float(np.mean(top)),
                    (tuple(float(v) for v in lps.min(0)), tuple(float(v) for v in lps.max(0))))


def _check_volume_pair(ct: io.Volume, mask: io.Volume, what: str) -> None:
    if not isinstance(ct, io.Volume) or not isinstance(mask, io.Volume):
        raise SpineInpaintError(f"the CT and the {what} must be Volumes")
    if not ct.same_grid(mask):
        raise SpineInpaintError(f"the CT and the {what} must be on the same grid")


def volume_thresholds(detector: Detector) -> dict:
    """The volume-level thresholds of a detector: those tuned for its weights (``volume_level`` in
    their JSON), else the module defaults."""
    tuned = (getattr(detector, "metadata", None) or {}).get("volume_level") or {}
    return {"score_threshold": float(tuned.get("score_threshold", VOLUME_SCORE_THRESHOLD)),
            "slice_threshold": float(tuned.get("slice_threshold", VOLUME_SLICE_THRESHOLD)),
            "min_slices": int(tuned.get("min_slices", VOLUME_MIN_SLICES))}


def lps_inputs(ct: io.Volume, spine_mask: io.Volume) -> tuple[io.Volume, io.Volume]:
    """The CT and the binary spine (:func:`spine_binary`) re-oriented to LPS: the volumes
    :func:`detect_slices` and :func:`lesions_from_slices` take."""
    return _lps(ct), _lps(spine_mask.with_array(spine_binary(spine_mask.array).astype(np.uint8)))


def detect_volume(ct: io.Volume, spine_mask: io.Volume, detector: Detector, *,
                  score_threshold: float | None = None, slice_threshold: float | None = None,
                  min_spine_fraction: float = 0.05, link_iou: float = 0.2, min_slices: int | None = None,
                  progress: bool = False) -> list[Lesion3D]:
    """3D lesions in a CT: per-slice boxes kept inside the spine mask, linked across slices.

    Parameters
    ----------
    ct
        HU volume, any orientation (processed as axial slices of its LPS reorientation).
    spine_mask
        Binary spine mask, or a label map on the CT's grid of which the vertebra ids (TotalSegmentator
        25-50) are the spine (see :func:`spine_binary`).
    detector
        A trained :class:`Detector` (e.g. :func:`load_detector`).
    score_threshold
        Minimum :attr:`Lesion3D.confidence` of a reported lesion.
    slice_threshold
        Minimum score of a per-slice box to take part in linking.
    min_spine_fraction
        A box is kept when at least this fraction of its area lies in the spine mask.
    min_slices
        Minimum number of slices of a lesion.

    Thresholds left ``None`` are the detector's (:func:`volume_thresholds`).

    Returns
    -------
    list[Lesion3D]
        By decreasing confidence; boxes and slice indices refer to the LPS-oriented volume
        (``io.reorient(ct, 'LPS')``), ``box_lps`` is physical. An empty list for a healthy spine.
    """
    _check_volume_pair(ct, spine_mask, "spine mask")
    tuned = volume_thresholds(detector)
    score_threshold = tuned["score_threshold"] if score_threshold is None else score_threshold
    slice_threshold = tuned["slice_threshold"] if slice_threshold is None else slice_threshold
    min_slices = tuned["min_slices"] if min_slices is None else min_slices
    if not 0.0 <= score_threshold <= 1.0:
        raise SpineInpaintError(f"score_threshold must be in [0, 1], got {score_threshold}")
    ct_lps, spine_lps = lps_inputs(ct, spine_mask)
    if not spine_lps.array.any():
        return []
    per_slice = detect_slices(ct_lps, spine_lps, detector, score_threshold=slice_threshold, progress=progress)
    return lesions_from_slices(per_slice, ct_lps, spine_lps, score_threshold=score_threshold,
                               slice_threshold=slice_threshold, min_spine_fraction=min_spine_fraction,
                               link_iou=link_iou, min_slices=min_slices)


def lesions_from_slices(per_slice: dict[int, tuple[np.ndarray, np.ndarray]], ct_lps: io.Volume,
                        spine_lps: io.Volume, *, score_threshold: float = VOLUME_SCORE_THRESHOLD,
                        slice_threshold: float = VOLUME_SLICE_THRESHOLD, min_spine_fraction: float = 0.05,
                        link_iou: float = 0.2, min_slices: int = VOLUME_MIN_SLICES) -> list[Lesion3D]:
    """The second half of :func:`detect_volume`: spine filter, linking and confidence threshold.

    ``per_slice`` comes from :func:`detect_slices` on the LPS-oriented ``ct_lps`` and ``spine_lps``
    (separate so that thresholds can be tuned without running the network again).
    """
    kept = {}
    for z, (boxes, scores) in per_slice.items():
        sel = [k for k, (b, sc) in enumerate(zip(boxes, scores))
               if sc >= slice_threshold and _spine_fraction(spine_lps.array[z], b) >= min_spine_fraction]
        kept[z] = (boxes[sel], scores[sel])
    tracks = link_detections(kept, link_iou=link_iou, min_slices=min_slices)
    lesions = [_lesion_from_track(b, s, ct_lps) for b, s in tracks]
    lesions = [les for les in lesions if les.confidence >= score_threshold]
    return sorted(lesions, key=lambda les: -les.confidence)


def _box_slices(box: Sequence[float], shape: tuple[int, int]) -> tuple[slice, slice]:
    x1, y1, x2, y2 = box
    r1, r2 = max(0, int(math.floor(y1))), min(shape[0], int(math.ceil(y2)))
    c1, c2 = max(0, int(math.floor(x1))), min(shape[1], int(math.ceil(x2)))
    return slice(r1, max(r1, r2)), slice(c1, max(c1, c2))


def _spine_fraction(spine2d: np.ndarray, box: Sequence[float]) -> float:
    rs, cs = _box_slices(box, spine2d.shape)
    area = (rs.stop - rs.start) * (cs.stop - cs.start)
    return float(spine2d[rs, cs].sum()) / area if area else 0.0


def lesion_mask_from_detections(ct: io.Volume, lesions: Sequence[Lesion3D], vertebra_labels: io.Volume, *,
                                dilation_mm: float = 2.0, cortex_mm: float = 1.5, tolerance_hu: float = 60.0,
                                min_fill: float = 0.1) -> io.Volume:
    """The lesion mask the inpainter fills, on the CT's grid (uint8 0/1).

    For each lesion and slice: the box intersected with the vertebrae dilated by ``dilation_mm``
    in-plane (a destroyed cortex lies just outside what is left of the label), then refined by
    intensity against the healthy bone of the same vertebra:

    - healthy range: the 5th-95th HU percentiles of that vertebra's cancellous bone (the label
      eroded by ``cortex_mm``) outside every lesion box, widened by ``tolerance_hu``;
    - abnormal: cancellous voxels outside that range (lytic below, sclerotic above) and cortex
      voxels below it (a cortex invaded by tumour loses its density), closed and hole-filled per
      slice; plus the voxels of the dilated rim below the range within ``dilation_mm`` of them
      (soft tissue where the cortex was destroyed);
    - where the abnormal voxels cover less
      than ``min_fill`` of the box-in-vertebra area (a lesion that intensity cannot separate) the
      whole box-in-vertebra region is used.

    The vertebra of a lesion is the label covering most of its boxes. ``lesions`` come from
    :func:`detect_volume` on the same CT (their indices refer to its LPS orientation).
    """
    _check_volume_pair(ct, vertebra_labels, "vertebra labels")
    ct_lps, lab_lps = _lps(ct), _lps(vertebra_labels)
    hu, labels = ct_lps.array.astype(np.float32), lab_lps.array
    spine = spine_binary(labels)
    sy, sx = ct_lps.spacing_zyx[1:]
    dil = ndimage.iterate_structure(ndimage.generate_binary_structure(2, 1), 1)
    n_dil = max(1, int(round(dilation_mm / min(sy, sx))))
    n_cortex = max(1, int(round(cortex_mm / min(sy, sx))))
    boxes_mask = np.zeros(hu.shape, bool)
    for les in lesions:
        for z, box in les.boxes.items():
            rs, cs = _box_slices(box, hu.shape[1:])
            boxes_mask[z, rs, cs] = True
    out = np.zeros(hu.shape, np.uint8)
    for les in lesions:
        in_boxes = np.concatenate([labels[z][_box_slices(b, hu.shape[1:])].ravel()
                                   for z, b in les.boxes.items()])
        in_boxes = in_boxes[in_boxes > 0]
        level = int(np.bincount(in_boxes).argmax()) if in_boxes.size else 0
        vert = labels == level if level else spine
        cancellous = np.stack([ndimage.binary_erosion(v, dil, iterations=n_cortex) for v in vert])
        healthy = hu[cancellous & ~boxes_mask]
        if healthy.size < 50:
            healthy = hu[cancellous] if cancellous.any() else np.array([100.0, 300.0])
        lo, hi = np.percentile(healthy, [5, 95]) + np.array([-tolerance_hu, tolerance_hu])
        for z, box in les.boxes.items():
            rs, cs = _box_slices(box, hu.shape[1:])
            region = np.zeros(hu.shape[1:], bool)
            region[rs, cs] = True
            v = vert[z]
            rim = ndimage.binary_dilation(v, dil, iterations=n_dil) & ~v
            allowed = region & (v | rim)
            if not allowed.any():
                continue
            h = hu[z]
            canc = cancellous[z]
            cortex = v & ~canc
            abnormal = (canc & ((h < lo) | (h > hi))) | (cortex & (h < lo))
            abnormal = ndimage.binary_fill_holes(ndimage.binary_closing(abnormal, dil, iterations=1))
            # Non-bone rim voxels only where they continue abnormal bone (the rim is soft tissue anyway).
            near = ndimage.binary_dilation(abnormal, dil, iterations=n_dil)
            abnormal = (abnormal | (rim & (h < lo) & near)) & allowed
            in_bone = region & v
            if abnormal.sum() < min_fill * max(1, in_bone.sum()):
                abnormal = allowed
            out[z] |= abnormal.astype(np.uint8)
    mask_lps = ct_lps.with_array(out)
    return io.resample_like(mask_lps, ct, labels=True) if not mask_lps.same_grid(ct) else mask_lps


def find_lesions(ct: io.Volume, vertebra_labels: io.Volume, detector: Detector | None = None, *,
                 score_threshold: float | None = None,
                 progress: bool = False) -> tuple[list[Lesion3D], io.Volume | None]:
    """Detect lesions and build the inpainting mask; ``(lesions, None)`` when the spine looks healthy.

    The pipeline skips inpainting when the mask is ``None``.
    """
    detector = detector or load_detector()
    lesions = detect_volume(ct, vertebra_labels, detector, score_threshold=score_threshold, progress=progress)
    if not lesions:
        return [], None
    return lesions, lesion_mask_from_detections(ct, lesions, vertebra_labels)
