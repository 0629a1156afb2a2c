"""The main job: a spine CT with a tumour-destroyed vertebra -> restored CT, labels, surfaces, report.

``restore(ct)`` runs, each stage timed:

1. **segment** -- vertebra labels of the input (:func:`SpineInpaintLib.segmentation.segment_volume`);
2. **detect** -- the lesion mask (:func:`SpineInpaintLib.detection.find_lesions`), unless the caller
   gives one (drawn in Slicer's Segment Editor, or from a file); a healthy spine stops here with
   the input returned unchanged;
3. **inpaint** -- the vertebra mask inside the lesion (:func:`~SpineInpaintLib.inpainting.restore_mask`)
   and the HU inside it (:func:`~SpineInpaintLib.inpainting.restore_ct`);
4. **surfaces** -- a watertight surface of the restored spine and one per restored vertebra
   (:mod:`SpineInpaintLib.surface`).

:func:`write_outputs` writes the contract files of :data:`~SpineInpaintLib.core.outputs.OUTPUT_FILES` (``restored_ct.nii.gz``,
``spine_seg.nii.gz``, ``lesion_seg.nii.gz``, ``restored_seg.nii.gz``, ``restored_spine.stl``,
``report.json``, ``report.png``) into a fresh folder in one step: they are written to a temporary
folder beside it and moved into place only when all succeeded, so a failure leaves no partial outputs.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from pathlib import Path

import numpy as np

from SpineInpaintLib import SpineInpaintError, __version__, surface
from SpineInpaintLib.core import io
from SpineInpaintLib.core.files import atomic_folder, write_report_json
from SpineInpaintLib.core.labels import VERTEBRA_NAMES, vertebra_mask
from SpineInpaintLib.core.outputs import OUTPUT_FILES
from SpineInpaintLib.core.runtime import StageTimer, resolve_device, seed_everything
from SpineInpaintLib.detection import inference as detection
from SpineInpaintLib.inpainting import networks as gan
from SpineInpaintLib.inpainting.methods import GAN_METHODS
from SpineInpaintLib.inpainting.restore import restore_ct, restore_mask
from SpineInpaintLib.report import report_figure
from SpineInpaintLib.segmentation import networks as segmentation
from SpineInpaintLib.segmentation.inference import segment_volume

__all__ = [
    "DEFAULT_METHOD", "RestoreResult", "segment_spine", "detect_lesions", "write_step_outputs", "restore",
    "write_outputs", "grey_method_for", "MIN_VERTEBRA_ML", "MIN_PRINTABLE_ML", "drop_small_components",
]

#: The default inpainting method (see :data:`SpineInpaintLib.inpainting.METHODS`).
DEFAULT_METHOD = "context"


@dataclasses.dataclass
class RestoreResult:
    """Everything :func:`restore` produced, on the input's grid.

    Attributes
    ----------
    ct
        The input CT (never modified).
    restored_ct
        HU after inpainting (a copy of the input when no lesion was found).
    spine_labels
        Vertebra labels of the input (TotalSegmentator v2 ids).
    lesion_mask
        uint8 mask that was inpainted (zeros when none).
    restored_labels
        Vertebra labels after restoration.
    surfaces
        ``{'Spine': vtkPolyData, 'L3': ..., ...}``: the whole spine and each restored vertebra, LPS mm.
    report
        JSON-ready record: input, settings, stages with seconds, lesions, volumes, mesh checks, seed.
    """

    ct: io.Volume
    restored_ct: io.Volume
    spine_labels: io.Volume
    lesion_mask: io.Volume
    restored_labels: io.Volume
    surfaces: dict
    report: dict

    @property
    def restored_levels(self) -> list[int]:
        return list(self.report.get("restored_levels", []))


def _check_lesion_mask(mask: io.Volume | np.ndarray, ct: io.Volume) -> io.Volume:
    if isinstance(mask, io.Volume):
        if mask.shape != ct.shape or not mask.same_grid(ct, tol=1e-3):
            raise SpineInpaintError(
                f"the lesion mask is on another grid than the CT (mask {'x'.join(map(str, mask.size_xyz))} at "
                f"{', '.join(f'{s:g}' for s in mask.spacing)} mm, CT {'x'.join(map(str, ct.size_xyz))} at "
                f"{', '.join(f'{s:g}' for s in ct.spacing)} mm); resample it onto the CT first"
            )
        array = mask.array
    else:
        array = np.asarray(mask)
        if array.shape != ct.shape:
            raise SpineInpaintError(f"the lesion mask has shape {array.shape}, the CT {ct.shape}")
    if not np.all(np.isfinite(array)):
        raise SpineInpaintError("the lesion mask holds nan or inf values")
    return ct.with_array((array != 0).astype(np.uint8))


def grey_method_for(method: str) -> str:
    """The method that restores the HU for ``method``: the same one when it has grayscale weights.

    The paper's GANs (WGAN-GP, DCGAN, PGGAN) inpaint binary spine shapes; without shipped grayscale
    weights for one of them, the vertebra's shape comes from it and the HU inside the lesion from
    the grayscale context generator (recorded as ``grey_method`` in the report).
    """
    method = str(method).lower()
    if method in GAN_METHODS and \
            not gan.default_weights_path(method, "grey", "generator").exists():
        return "context"
    return method


def segment_spine(ct: io.Volume, seg_net: str | None = None, *, device: str = "cpu", progress: bool = False,
                  lesion: io.Volume | None = None):
    """Vertebra labels of a CT, or a one-line :class:`SpineInpaintError` when there is no spine to restore.

    The ``segment`` step of the command line and the first stage of :func:`restore`: the segmenter's
    warnings (not CT, no spine) become errors, and a segmentation whose largest vertebra is under
    :data:`MIN_VERTEBRA_ML` counts as no spine. Returns the
    :class:`~SpineInpaintLib.segmentation.SegmentationResult`. A known ``lesion`` (on the CT's
    grid) guides the split into vertebrae (``segment_volume(lesion=...)``). ``seg_net`` None: the
    default network (:data:`~SpineInpaintLib.segmentation.DEFAULT_NETWORK`).
    """
    seg_net = seg_net or segmentation.DEFAULT_NETWORK
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # turned into one-line errors below
        seg = segment_volume(ct, seg_net, device=device, progress=progress, lesion=lesion)
    if "not_ct" in seg.flags:
        raise SpineInpaintError(seg.messages[0].split(" -- ")[0])
    if "no_spine" in seg.flags:
        raise SpineInpaintError("no spine found in the volume: is it a spine CT?")
    voxel_ml = float(np.prod(ct.spacing)) / 1000.0
    counts = np.bincount(seg.labels.array.ravel().astype(np.int64), minlength=51)[25:51]
    if counts.max() * voxel_ml < MIN_VERTEBRA_ML:
        raise SpineInpaintError(
            f"no spine found in the volume: the largest vertebra found holds {counts.max() * voxel_ml:.1f} mL "
            f"(< {MIN_VERTEBRA_ML:g} mL); is it a spine CT?"
        )
    return seg


def detect_lesions(ct: io.Volume, labels: io.Volume, *, progress: bool = False) -> tuple[list, io.Volume]:
    """Lesions found by the shipped detector and their mask on the CT's grid (zeros when none).

    The ``detect`` step of the command line and the second stage of :func:`restore`.
    """
    if not labels.same_grid(ct, tol=1e-3) or labels.shape != ct.shape:
        raise SpineInpaintError("the spine labels are on another grid than the CT; resample them onto the CT first")
    found, mask = detection.find_lesions(ct, labels, progress=progress)
    if mask is None:
        mask = ct.with_array(np.zeros(ct.shape, np.uint8))
    return found, mask


def write_step_outputs(volumes: dict[str, io.Volume], out: str | os.PathLike, report: dict) -> dict[str, Path]:
    """Write the ``segment`` / ``detect`` steps' files (contract names of :data:`OUTPUT_FILES`) and
    ``report.json``, all or nothing."""
    out = Path(out)
    with atomic_folder(out) as tmp:
        for key, volume in volumes.items():
            io.write_volume(volume, tmp / OUTPUT_FILES[key])
        report["outputs"] = sorted([OUTPUT_FILES[k] for k in volumes] + [OUTPUT_FILES["report_json"]])
        write_report_json(tmp / OUTPUT_FILES["report_json"], report)
    return {key: out / OUTPUT_FILES[key] for key in list(volumes) + ["report_json"]}


def restore(
    ct: io.Volume,
    lesion_mask: io.Volume | np.ndarray | None = None,
    *,
    method: str = DEFAULT_METHOD,
    seg_net: str | None = None,
    device: str = "cpu",
    seed: int = 0,
    smoothing: float = 0.5,
    progress: bool = False,
) -> RestoreResult:
    """Restore a spine CT: segment, detect (or take ``lesion_mask``), inpaint, reconstruct.

    Parameters
    ----------
    ct
        CT in HU, any orientation and spacing (:func:`SpineInpaintLib.io.read_volume`).
    lesion_mask
        The region to restore on the CT's grid (non-zero = lesion); skips detection.
    method
        Inpainting method (``context`` default; ``wgan-gp``, ``dcgan``, ``pggan`` as the paper;
        ``biharmonic`` and ``nearest`` baselines).
    seg_net
        ``unet`` or ``vnet``; None: :data:`SpineInpaintLib.segmentation.DEFAULT_NETWORK` (the V-Net).
    device
        ``cpu``, ``cuda`` or ``auto``.
    seed
        Seed of every random choice (z restarts); recorded in the report.

    Raises
    ------
    SpineInpaintError
        Input that is not a CT, a volume without spine, a lesion mask on another grid.
    """
    if not isinstance(ct, io.Volume):
        raise SpineInpaintError(f"restore needs an io.Volume, got {type(ct).__name__}")
    seed_everything(seed)
    seg_net = seg_net or segmentation.DEFAULT_NETWORK
    dev = str(resolve_device(device))
    mask_in = None if lesion_mask is None else _check_lesion_mask(lesion_mask, ct)
    timer = StageTimer()
    report: dict = {
        "version": __version__,
        "seed": int(seed),
        "settings": {"method": method, "seg_net": seg_net, "device": dev, "smoothing": smoothing},
        "input": {"geometry": ct.geometry(), "dtype": str(ct.array.dtype)},
    }

    with timer.stage("segment"):
        seg = segment_spine(ct, seg_net, device=dev, progress=progress, lesion=mask_in)
    labels = seg.labels
    report["segmentation"] = {"net": seg.net, "levels": [VERTEBRA_NAMES.get(v, str(v)) for v in seg.levels()]}

    lesions_found: list = []
    if mask_in is not None:
        mask = mask_in
        report["lesion_source"] = "given"
    else:
        with timer.stage("detect"):
            lesions_found, mask = detect_lesions(ct, labels, progress=progress)
        report["lesion_source"] = "detected"
        report["lesions"] = [lesion.to_dict() if hasattr(lesion, "to_dict") else str(lesion) for lesion in lesions_found]
    report["lesion_voxels"] = int(mask.array.sum())
    report["lesion_ml"] = round(float(mask.array.sum() * np.prod(ct.spacing) / 1000.0), 3)

    restored_ct, restored_labels, restored_levels = ct.copy(), labels.copy(), []
    if mask.array.any():
        with timer.stage("inpaint"):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", UserWarning)
                binary = restore_mask(labels, mask, method=method, seed=seed)
                grey_method = grey_method_for(method)
                grey = restore_ct(ct, labels, mask, method=grey_method, seed=seed)
            report["warnings"] = [str(w.message) for w in caught]
        if binary.noop is None:
            restored_labels = binary.restored_labels
            restored_levels = list(binary.levels)
        if grey.noop is None:
            restored_ct = grey.restored
        report["inpainting"] = {"method": method, "grey_method": grey_method, "slices": binary.slices,
                                "noop": binary.noop,
                                "levels": [VERTEBRA_NAMES.get(v, str(v)) for v in binary.levels]}
    else:
        report["inpainting"] = {"method": method, "slices": 0, "noop": "no lesion found: nothing to restore"}
    report["restored_levels"] = restored_levels

    with timer.stage("surfaces"):
        restored_labels, dropped = drop_small_components(restored_labels, MIN_PRINTABLE_ML)
        report["dropped_specks"] = dropped
        names = [VERTEBRA_NAMES[v] for v in restored_levels]
        surfaces = surface.spine_surfaces(restored_labels, levels=restored_levels or [], smoothing=smoothing)
        surfaces = {k: v for k, v in surfaces.items() if k == "Spine" or k in names}
    report["surfaces"] = surface.surface_report(surfaces)
    voxel_ml = float(np.prod(ct.spacing)) / 1000.0
    report["restored_vertebrae"] = [
        {"level": VERTEBRA_NAMES[v], "id": v, "volume_ml": round(float((restored_labels.array == v).sum()) * voxel_ml, 3)}
        for v in restored_levels
    ]
    report["timings"] = timer.to_dict()
    return RestoreResult(ct, restored_ct, labels, mask, restored_labels, surfaces, report)


#: A segmentation whose largest vertebra is smaller than this (mL) is taken as "no spine": an adult
#: thoracolumbar vertebra holds 25-80 mL, and stray bone (ribs, a femur) gives scattered bits.
MIN_VERTEBRA_ML = 5.0

#: Bone fragments smaller than this (mL) are left out of the restored labels and surfaces: they are
#: segmentation specks, not printable anatomy, and smoothing would shrink them to slivers.
MIN_PRINTABLE_ML = 1.0


def drop_small_components(labels: io.Volume, min_ml: float = MIN_PRINTABLE_ML) -> tuple[io.Volume, int]:
    """Clear vertebra voxels in 26-connected components of the spine smaller than ``min_ml``.

    Returns the cleaned labels and the number of components dropped.
    """
    from scipy import ndimage

    spine = vertebra_mask(labels.array)
    components, n = ndimage.label(spine, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return labels, 0
    voxel_ml = float(np.prod(labels.spacing)) / 1000.0
    sizes = ndimage.sum_labels(spine, components, index=np.arange(1, n + 1)) * voxel_ml
    small = np.isin(components, np.nonzero(sizes < min_ml)[0] + 1)
    if not small.any():
        return labels, 0
    array = labels.array.copy()
    array[small] = 0
    return labels.with_array(array), int((sizes < min_ml).sum())


def write_outputs(result: RestoreResult, out: str | os.PathLike, *, figure: bool = True) -> dict[str, Path]:
    """Write the contract files into ``out`` (all or nothing; never over the input).

    ``out`` must not exist or be empty. Returns the written paths by key of :data:`OUTPUT_FILES`.
    """
    out = Path(out)
    with atomic_folder(out) as tmp:
        start = time.perf_counter()
        io.write_volume(result.restored_ct, tmp / OUTPUT_FILES["restored_ct"])
        io.write_volume(result.spine_labels, tmp / OUTPUT_FILES["spine_seg"])
        io.write_volume(result.lesion_mask, tmp / OUTPUT_FILES["lesion_seg"])
        io.write_volume(result.restored_labels, tmp / OUTPUT_FILES["restored_seg"])
        surface.write_stl(result.surfaces["Spine"], tmp / OUTPUT_FILES["restored_spine"])
        for name, poly in result.surfaces.items():
            if name != "Spine":
                surface.write_stl(poly, tmp / f"restored_{name}.stl")
        if figure:
            # surfaces=None: the figure draws every vertebra from the labels (the whole-spine
            # surface would hide the restored one), before (with the lesion) and after.
            report_figure(result.ct, result.restored_ct, result.lesion_mask, result.restored_labels, None,
                          tmp / OUTPUT_FILES["report_png"], labels_before=result.spine_labels,
                          title=f"SpineInpaint restore ({result.report['settings']['method']}), seed {result.report['seed']}")
        result.report["timings"]["write_outputs"] = round(time.perf_counter() - start, 3)
        result.report["outputs"] = sorted(p.name for p in tmp.iterdir()) + [OUTPUT_FILES["report_json"]]
        write_report_json(tmp / OUTPUT_FILES["report_json"], result.report)
    return {key: out / name for key, name in OUTPUT_FILES.items() if (out / name).exists()}
