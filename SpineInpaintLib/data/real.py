"""The registry of real CT scans beside the project (``../shared/data/real``) and their leave-one-scan-out splits.

Every trainer and evaluator finds real scans here. Each :class:`RealScan` says where its CT and its
labels are, in which format the labels come (:func:`load_real_case` turns every format into one
label map in TotalSegmentator v2 ids), which region and vertebrae it shows, where its labels come
from and under which licence it is shared. Scans without vertebra labels are registered too
(``labelled`` is False): they serve as real anatomy for checks and as hard negatives.

Leave-one-scan-out: a model evaluated on a real scan must never have seen that scan, nor a lesion
simulated on it. :func:`leave_one_out` gives the folds, :func:`training_scans` the scans a trainer may
use when some are left out, and :func:`check_left_out` refuses an evaluation whose model was trained
on the scan (models record their training scans, read back by :func:`trained_scans`). Scans of one
patient share a ``patient`` key and are left out together.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from SpineInpaintLib import SpineInpaintError
from SpineInpaintLib.core.io import (
    Volume,
    read_totalsegmentator_folder,
    read_verse_labels,
    read_volume,
    resample_like,
)
from SpineInpaintLib.core.labels import UNLEVELLED_SPINE, VERTEBRA_NAMES, vertebra_id

__all__ = [
    "REGIONS", "LABEL_FORMATS", "RealScan", "REAL_SCANS", "REAL_CASES", "real_data_dir", "real_scans", "real_scan",
    "load_real_case", "load_real_ct", "load_verse_subregions", "leave_one_out", "training_scans", "check_left_out",
    "trained_scans", "left_out_scans", "evaluation_scans", "scans_to_train_on", "same_patient_scans", "LEGACY_TRAINING_SCANS",
]

#: Body regions a scan is filed under.
REGIONS: tuple[str, ...] = ("neck", "chest", "abdomen", "thoracolumbar", "lumbar")

#: How a scan's labels are stored: one TotalSegmentator v2 map; the TotalSegmentator dataset layout
#: (``segmentations/<structure>.nii.gz``); a VerSe vertebra mask; one binary spine mask without levels; none.
LABEL_FORMATS: tuple[str, ...] = ("totalsegmentator", "totalsegmentator_dataset", "verse", "binary_spine", "none")

_TS_TESTS = "Apache-2.0; TotalSegmentator test files (wasserth/TotalSegmentator, tests/reference_files)"
_TS_DATASET = "CC BY 4.0; TotalSegmentator dataset v2 (Wasserthal et al., Radiology: AI 2023)"


def _levels(spec: str) -> tuple[int, ...]:
    """``"C1-T1"`` -> the ids from C1 down to T1 (a range in either order); ``"L2,L4"`` a list; ``""`` -> ()."""
    out: set[int] = set()
    for part in filter(None, spec.split(",")):
        a, _, b = part.partition("-")
        lo, hi = sorted((vertebra_id(a), vertebra_id(b or a)))
        out.update(range(lo, hi + 1))
    return tuple(sorted(out))


@dataclasses.dataclass(frozen=True)
class RealScan:
    """One real CT scan of the registry.

    Attributes
    ----------
    name
        Registry key (``s0003``, ``totalsegmentator``, ...).
    region
        One of :data:`REGIONS`.
    ct, labels
        Paths relative to the real-data folder: a file or a DICOM folder; ``labels`` is ``None``
        for an unlabelled scan, the subject folder for the TotalSegmentator dataset layout.
    label_format
        One of :data:`LABEL_FORMATS`.
    levels
        Vertebra ids (TotalSegmentator v2) wholly or mostly in view, with labels.
    partial
        Vertebra ids cut by the field of view (a sliver or a part): not to be scored as whole vertebrae.
    label_source, licence, description
        Where the labels come from (all are model predictions, some reviewed), the licence, what the scan shows.
    patient
        Scans with the same key may be of one patient and are left out together.
    """

    name: str
    region: str
    ct: str
    labels: str | None
    label_format: str
    levels: tuple[int, ...]
    partial: tuple[int, ...]
    label_source: str
    licence: str
    description: str
    patient: str

    @property
    def labelled(self) -> bool:
        """True when the scan has vertebra labels with their levels."""
        return self.label_format not in ("none", "binary_spine")

    @property
    def level_names(self) -> list[str]:
        """Names of :attr:`levels`, caudal to cranial."""
        return [VERTEBRA_NAMES[v] for v in self.levels]

    def summary(self) -> dict:
        """JSON-ready record (for reports and model cards)."""
        d = dataclasses.asdict(self)
        d["levels"] = self.level_names
        d["partial"] = [VERTEBRA_NAMES[v] for v in self.partial]
        d["labelled"] = self.labelled
        return d


def _scan(name, region, ct, labels, fmt, levels, partial, source, licence, description, patient=None) -> RealScan:
    return RealScan(name, region, ct, labels, fmt, _levels(levels), _levels(partial), source, licence, description,
                    patient or name)


#: name -> scan, every real scan in ``../shared/data/real``.
REAL_SCANS: dict[str, RealScan] = {s.name: s for s in (
    _scan("totalsegmentator", "abdomen", "totalsegmentator/example_ct.nii.gz",
          "totalsegmentator/example_seg_fast_force_split.nii.gz", "totalsegmentator", "sacrum-T12", "T11",
          "TotalSegmentator prediction (fast model)", _TS_TESTS, "abdomen/pelvis CT, 3 mm"),
    _scan("totalsegmentator_dicom", "abdomen", "totalsegmentator/example_ct_dicom",
          "totalsegmentator/example_seg_dicom.nii.gz", "totalsegmentator", "", "T11-T12",
          "TotalSegmentator prediction", _TS_TESTS, "20 axial DICOM slices (JPEG 2000) through T11/T12"),
    _scan("s0002", "neck", "totalsegmentator_dataset/s0002/ct.nii.gz", "totalsegmentator_dataset/s0002",
          "totalsegmentator_dataset", "T1-C1", "T2", "TotalSegmentator dataset (predictions reviewed by people)",
          _TS_DATASET + ", subject s0002", "head and neck CT, 1.5 mm; header off orthonormal by 2e-4"),
    _scan("s0003", "neck", "totalsegmentator_dataset/s0003/ct.nii.gz", "totalsegmentator_dataset/s0003",
          "totalsegmentator_dataset", "T3-C1", "T4", "TotalSegmentator dataset (predictions reviewed by people)",
          _TS_DATASET + ", subject s0003", "neck and upper chest CT, 1.5 mm"),
    _scan("s0009", "thoracolumbar", "totalsegmentator_dataset/s0009/ct.nii.gz", "totalsegmentator_dataset/s0009",
          "totalsegmentator_dataset", "sacrum-T11", "T9-T10",
          "TotalSegmentator dataset (predictions reviewed by people)", _TS_DATASET + ", subject s0009",
          "thoraco-lumbar CT myelogram (contrast in the dural sac), osteopenic bone, calcified aorta, 1.5 mm"),
    _scan("verse_tptbox", "lumbar", "verse_tptbox/sub-ct_label-22_ct.nii.gz",
          "verse_tptbox/sub-ct_seg-vert_label-22_msk.nii.gz", "verse", "L3", "L2,L4",
          "VerSe-format labels of the TPTBox sample data", "Apache-2.0; TPTBox sample data (Hendrik-code/TPTBox)",
          "lumbar crop around L3, 1.5 mm, with VerSe sub-region masks"),
    _scan("dcmqi_ct3slice", "abdomen", "dcmqi_ct3slice", "dcmqi_ct3slice/spine_seg.nrrd", "binary_spine", "", "",
          "one spine label, level not given", "BSD-style; QIICR/dcmqi data/segmentations",
          "3 abdominal DICOM slices (GE)"),
    _scan("lidc_0314", "chest", "lidc_0314_chest/ct.nii.gz", None, "none", "", "",
          "none", "CC BY 3.0; LIDC-IDRI-0314 (TCIA)", "chest CT, spine about C7-L1, 0.78 mm, 1 mm slices"),
    _scan("aorta_crop", "chest", "totalsegmentator/aorta_crop/ct_cropped.nii.gz", None, "none", "", "",
          "none", _TS_TESTS, "contrast CT angiography crop of the chest, thoracic spine ~T1-T12, 1.5 mm"),
)}

#: The former name of the registry (name -> scan).
REAL_CASES = REAL_SCANS

#: Real scans that models trained before the registry existed learned from (their metadata does not say).
LEGACY_TRAINING_SCANS: tuple[str, ...] = ("totalsegmentator",)


def real_data_dir() -> Path:
    """The shared real-CT folder: ``$SPINEINPAINT_REAL_DATA``, else ``../shared/data/real`` of the repo."""
    env = os.environ.get("SPINEINPAINT_REAL_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "shared" / "data" / "real"


def real_scan(name: str) -> RealScan:
    """The registry entry of ``name`` (one-line error naming the known scans)."""
    try:
        return REAL_SCANS[name]
    except (KeyError, TypeError):
        raise SpineInpaintError(f"unknown real case '{name}' (known: {', '.join(REAL_SCANS)})") from None


def real_scans(*, labelled: bool | None = None, region: str | None = None, level: int | str | None = None
               ) -> list[RealScan]:
    """Registry entries, filtered by labels, region and a vertebra they must show whole."""
    if region is not None and region not in REGIONS:
        raise SpineInpaintError(f"unknown region '{region}' (known: {', '.join(REGIONS)})")
    target = None if level is None else vertebra_id(level)
    return [s for s in REAL_SCANS.values()
            if (labelled is None or s.labelled == labelled) and (region is None or s.region == region)
            and (target is None or target in s.levels)]


def _path(rel: str) -> Path:
    path = real_data_dir() / rel
    if not path.exists():
        raise SpineInpaintError(f"real data not found at {path} (set SPINEINPAINT_REAL_DATA)")
    return path


@functools.lru_cache(maxsize=4)
def _load(name: str, root: str) -> tuple[Volume, Volume]:
    scan = real_scan(name)
    if scan.label_format == "none":
        raise SpineInpaintError(f"real case '{name}' has no labels (use load_real_ct for its CT)")
    if scan.label_format == "totalsegmentator_dataset":
        return read_totalsegmentator_folder(_path(scan.labels))
    ct = read_volume(_path(scan.ct), require_3d=False)
    if scan.label_format == "verse":
        return ct, read_verse_labels(_path(scan.labels), ct)
    labels = read_volume(_path(scan.labels), require_3d=False)
    if not labels.same_grid(ct):
        # e.g. the TotalSegmentator DICOM labels, stored with flipped rows: physical space sorts it out
        labels = resample_like(labels, ct, labels=True)
    array = labels.array.astype(np.uint8)
    if scan.label_format == "binary_spine":
        array = np.where(array > 0, UNLEVELLED_SPINE, 0).astype(np.uint8)
    return ct, labels.with_array(array)


def load_real_case(name: str = "totalsegmentator") -> tuple[Volume, Volume]:
    """Load a real CT scan and its label map in TotalSegmentator v2 ids, the labels on the CT's grid.

    Returns
    -------
    (ct, labels)
        ``ct`` in HU as stored (int16/int32); ``labels`` uint8 on the same grid. Fresh copies: the
        caller may change them.

    Raises
    ------
    SpineInpaintError
        For an unknown or unlabelled scan, or when the data folder is missing.
    """
    ct, labels = _load(name, str(real_data_dir()))
    return ct.copy(), labels.copy()


def load_real_ct(name: str) -> Volume:
    """The CT of any registered scan, labelled or not (HU as stored)."""
    scan = real_scan(name)
    if scan.label_format == "totalsegmentator_dataset" or scan.labelled:
        return load_real_case(name)[0]
    return read_volume(_path(scan.ct), require_3d=False)


def load_verse_subregions(name: str = "verse_tptbox") -> Volume:
    """The VerSe sub-region mask (ids 41-50, :data:`~SpineInpaintLib.core.labels.VERSE_SUBREGIONS`) of a VerSe scan."""
    scan = real_scan(name)
    if scan.label_format != "verse":
        raise SpineInpaintError(f"real case '{name}' has no VerSe sub-region mask")
    path = _path(scan.labels.replace("seg-vert", "seg-subreg"))
    ct = load_real_ct(name)
    sub = read_volume(path)
    if not sub.same_grid(ct):
        sub = resample_like(sub, ct, labels=True)
    return sub.with_array(sub.array.astype(np.uint8))


# --- leave-one-scan-out ------------------------------------------------------------------------------
def same_patient_scans(names: Iterable[str]) -> set[str]:
    """The registered scans of the patients of ``names`` (``names`` included)."""
    patients = {real_scan(n).patient for n in names}
    return {s.name for s in REAL_SCANS.values() if s.patient in patients}


def training_scans(leave_out: Iterable[str] = (), candidates: Sequence[str] | None = None) -> tuple[str, ...]:
    """The labelled scans a trainer may use when ``leave_out`` (and their patients' other scans) are held out."""
    excluded = same_patient_scans(leave_out)
    pool = [s.name for s in real_scans(labelled=True)] if candidates is None else list(candidates)
    for name in pool:
        real_scan(name)
    return tuple(n for n in pool if n not in excluded)


def scans_to_train_on(spec: str | Sequence[str], leave_out: str | Sequence[str] = ()) -> list[str]:
    """The real scans a trainer uses: ``"all"`` (every labelled scan not left out), names, or ``""`` for none.

    Raises
    ------
    SpineInpaintError
        When a named scan is unknown, has no vertebra labels, or is left out (itself or its patient).
    """
    if isinstance(leave_out, str):
        leave_out = [n.strip() for n in leave_out.split(",") if n.strip()]
    for name in leave_out:
        real_scan(name)
    if isinstance(spec, str):
        if spec.strip() == "all":
            return list(training_scans(leave_out))
        spec = [n.strip() for n in spec.split(",") if n.strip()]
    excluded = same_patient_scans(leave_out)
    for name in spec:
        if not real_scan(name).labelled:
            raise SpineInpaintError(f"real case '{name}' has no vertebra labels (TotalSegmentator ids 25-50) "
                                    "to train on")
        if name in excluded:
            raise SpineInpaintError(f"real scan '{name}' is left out (--leave-out): a model evaluated on it "
                                    "must not be trained on it")
    return list(spec)


def leave_one_out(names: Sequence[str] | None = None) -> list[tuple[str, tuple[str, ...]]]:
    """Leave-one-scan-out folds over the labelled scans: ``[(test scan, training scans), ...]``."""
    names = [s.name for s in real_scans(labelled=True)] if names is None else list(names)
    return [(name, training_scans((name,), names)) for name in names]


def trained_scans(meta: dict) -> tuple[str, ...]:
    """The real scans a model was trained on, from its metadata (``training.real_scans``).

    The segmenters' older field ``training.real_in_training`` is read too; models whose metadata
    names no real scans were trained before the registry and learned from :data:`LEGACY_TRAINING_SCANS`.
    """
    training = meta.get("training", {}) if isinstance(meta, dict) else {}
    for key in ("real_scans", "real_in_training"):
        if isinstance(training, dict) and key in training:
            return tuple(training[key])
    return LEGACY_TRAINING_SCANS


def left_out_scans(trained_on: Iterable[str], *, level: int | str | None = None) -> list[str]:
    """The labelled scans a model trained on ``trained_on`` has never seen (optionally showing ``level``)."""
    seen = same_patient_scans(trained_on)
    return [s.name for s in real_scans(labelled=True, level=level) if s.name not in seen]


def evaluation_scans(spec: str | Sequence[str], trained_on: Iterable[str], model: str = "the model",
                     *, level: int | str | None = None, allow_seen: bool = False) -> list[str]:
    """The real scans an evaluation scores: ``"left-out"`` (every scan the model never saw) or named ones.

    Named scans are checked with :func:`check_left_out` unless ``allow_seen`` (a fit measurement, not a
    left-out one: say so beside its numbers); ``""`` gives none.
    """
    trained_on = tuple(trained_on)
    if isinstance(spec, str):
        if spec.strip() == "left-out":
            return left_out_scans(trained_on, level=level)
        spec = [n.strip() for n in spec.split(",") if n.strip()]
    for name in spec:
        real_scan(name)
        if not allow_seen:
            check_left_out(name, trained_on, model)
    return list(spec)


def check_left_out(scan: str, trained_on: Iterable[str], model: str = "the model") -> None:
    """Refuse to score ``model`` on ``scan`` when it was trained on it (or on a scan of the same patient)."""
    seen = same_patient_scans([scan]) & set(trained_on)
    if seen:
        raise SpineInpaintError(
            f"{model} was trained on real scan {', '.join(sorted(seen))}: scoring it on '{scan}' is not a "
            f"left-out evaluation (train with --leave-out {scan}, or pick another scan)"
        )
