"""Evaluate inpainting on held-out lesions: binary and grey scores per method, Figure 6, the GAN table."""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from SpineInpaintLib import SpineInpaintError
from SpineInpaintLib.core import io
from SpineInpaintLib.core.files import atomic_write
from SpineInpaintLib.core.labels import spine_mask
from SpineInpaintLib.core.plotting import pyplot, save_figure
from SpineInpaintLib.data import cases as datasets
from SpineInpaintLib.data import lesions, lesions_focal
from SpineInpaintLib.data.cases import case_seeds
from SpineInpaintLib.data.real import real_scan
from SpineInpaintLib.evaluation.metrics.image import inpainting_quality
from SpineInpaintLib.evaluation.metrics.mmd import kmmd
from SpineInpaintLib.evaluation.metrics.overlap import dice, hd95
from SpineInpaintLib.inpainting import networks as gan
from SpineInpaintLib.inpainting.crops import (
    CROP_SIZE,
)
from SpineInpaintLib.inpainting.methods import (
    _DEFAULT_CACHE,
    GAN_METHODS,
    ModelCache,
    _crop,
    _grey,
    inpaint_crops,
    level_geometry,
)
from SpineInpaintLib.inpainting.restore import restore_ct, restore_mask
from SpineInpaintLib.training.gan import phantom_overrides
from SpineInpaintLib.training.holes import case_training_arrays

__all__ = [
    "AROUND_MM", "EvalLesion", "test_phantom_seeds", "evaluation_lesions", "score_binary", "score_grey", "evaluate",
    "paired_wins", "figure6_check", "gan_table", "gan_samples_png", "format_summary",
]




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
    simulator: str = "classic"


#: The focal simulator's kinds drawn for the evaluation's lesions (a destructive one grows a mass).
_FOCAL_EVAL_KINDS = {True: ("soft_tissue_mass",), False: ("lytic_remnant", "blastic_nodular")}


def _simulate(simulator: str, rng: np.random.Generator, ct: io.Volume, labels: io.Volume, level: int,
              destructive: bool):
    """One held-out lesion from ``simulator`` at ``level`` (the classic or the focal appearance model)."""
    size, seed = float(rng.uniform(0.45, 0.8)), int(rng.integers(0, 2**31 - 1))
    if simulator == "classic":
        return lesions.simulate_lesion(ct, labels, level, str(rng.choice(["lytic", "sclerotic", "mixed"])),
                                       destructive, size=size, seed=seed)
    kind = str(rng.choice(_FOCAL_EVAL_KINDS[destructive]))
    return lesions_focal.simulate_focal_lesions(ct, labels, seed, levels=[level], kinds=[kind], locations=["body"],
                                                sizes=[min(size, 0.7)])


def test_phantom_seeds(n: int, start: int = 0) -> list[int]:
    """The first ``n`` phantom seeds (from ``start``) whose case falls in the fixed test split."""
    return case_seeds("phantom", "test", n, start=int(start))


def _save_lesions(items: list[EvalLesion], path) -> None:
    arrays = {}
    for k, e in enumerate(items):
        for name in ("ct", "healthy_ct", "labels", "hole"):
            arrays[f"{k}_{name}"] = getattr(e, name).array
        geo = e.ct
        arrays[f"{k}_geometry"] = np.concatenate([geo.spacing, geo.origin, np.asarray(geo.direction).ravel()])
        arrays[f"{k}_meta"] = np.array([e.name, e.source, str(int(e.destructive)), str(e.level), e.simulator])
    with open(path, "wb") as f:  # a file object: np.savez would add ".npz" to a temporary's name
        np.savez_compressed(f, n=len(items), **arrays)


def _load_lesions(path) -> list[EvalLesion]:
    out = []
    with np.load(path) as data:
        for k in range(int(data["n"])):
            g = data[f"{k}_geometry"]
            vol = lambda a, g=g: io.Volume(a, spacing=tuple(g[0:3]), origin=tuple(g[3:6]), direction=g[6:].reshape(3, 3))  # noqa: E731
            name, source, destructive, level, *simulator = data[f"{k}_meta"].tolist()
            out.append(EvalLesion(name, source, destructive == "1", vol(data[f"{k}_ct"]), vol(data[f"{k}_healthy_ct"]),
                                  vol(data[f"{k}_labels"]), vol(data[f"{k}_hole"]), int(level),
                                  simulator[0] if simulator else "classic"))
    return out


def evaluation_lesions(n_phantoms: int = 8, lesions_per_case: int = 2, n_real: int = 4, seed: int = 0,
                       progress: bool = True, cache=None, real_scans: Sequence[str] = ("s0009",),
                       simulators: Sequence[str] = ("classic", "focal"), seen: Sequence[str] = ()) -> list[EvalLesion]:
    """Held-out lesions: test-split phantoms (the GAN data's compact grid) and ``n_real`` on each real scan.

    Real scans should be left out of the GANs' training (:func:`SpineInpaintLib.data.real.evaluation_scans`);
    their lesions go into any whole vertebra the registry lists for the scan, the sacrum excepted. On
    a scan in ``seen`` (trained on) they go into L2-L4 only, the levels the GANs' crop cache holds out.

    Lesion k of a case is destructive for even k and keeps the cortex intact for odd k, and comes
    from ``simulators[(k // 2) % len(simulators)]`` (the classic simulator's look or the focal one's:
    the summary reports each); type, level and size (0.45-0.8 of the body) are drawn from ``seed``. ``cache`` (a folder) keeps the set as
    ``.npz`` for the next run with the same arguments.
    """

    if cache is not None:
        scans = "-".join(real_scans) if n_real else "none"
        path = Path(cache) / (f"lesions_p{n_phantoms}_l{lesions_per_case}_r{n_real}_{scans}_"
                              f"{'-'.join(simulators)}_s{seed}.npz")
        if path.exists():
            return _load_lesions(path)
        items = evaluation_lesions(n_phantoms, lesions_per_case, n_real, seed, progress, None, real_scans,
                                   simulators, seen)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: _save_lesions(items, tmp))
        return items
    from tqdm import tqdm

    rng = np.random.default_rng([seed, 2718])
    out: list[EvalLesion] = []
    jobs = [("phantom", s) for s in test_phantom_seeds(n_phantoms)] + [("real", n) for n in real_scans if n_real]
    for source, key in tqdm(jobs, desc="test lesions", unit="case", disable=not progress):
        if source == "phantom":
            case = datasets.phantom_case(key, lesion_types=None, **phantom_overrides(key))
            present = [v for v in np.unique(case.labels.array).tolist() if 26 <= v <= 50]
            voxel = float(np.prod(case.labels.spacing))
            counts = {v: int((case.labels.array == v).sum()) * voxel for v in present}
            candidates = [v for v in present if counts[v] > 0.6 * max(counts.values())]
            count = lesions_per_case
        else:
            case = datasets.real_case(key, seed=0, lesion_types=None)
            candidates = [28, 29, 30] if key in seen else [v for v in real_scan(key).levels if v != 25]
            count = n_real
        made = 0
        for _k in range(count * 3):
            if made == count:
                break
            destructive = made % 2 == 0
            simulator = simulators[(made // 2) % len(simulators)]
            level = int(rng.choice(candidates))
            try:
                lesion = _simulate(simulator, rng, case.healthy_ct, case.labels, level, destructive)
            except SpineInpaintError:
                continue
            out.append(EvalLesion(f"{case.case_id}_L{level}_{'destructive' if destructive else 'intact'}_{made}"
                                  f"_{simulator}", source, destructive, lesion.ct, case.healthy_ct, case.labels,
                                  lesion.mask, level, simulator))
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
        out[f"dice_{name}"] = dice(p, t)
        out[f"hd95_{name}"] = hd95(p, t, spacing_zyx) if p.any() and t.any() else (
            0.0 if not p.any() and not t.any() else float("inf"))
    return out


def score_grey(restored: np.ndarray, truth: np.ndarray, hole: np.ndarray) -> dict[str, float]:
    """MAE (HU) inside the hole, and BraTS-normalised MAE/PSNR/SSIM on the hole's box (at least 11 voxels a side)."""

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
    q = inpainting_quality(restored[box].astype(np.float64), truth[box].astype(np.float64), hole[box],
                                   void_value=None)
    return {"mae_hu": mae_hu, "mae": q["mae"], "psnr": q["psnr"], "ssim": q["ssim"]}


def evaluate(lesions_: Sequence[EvalLesion], methods: Sequence[str], *, grey: bool = False, steps: int = 200,
             restarts: int = 4, models: ModelCache | None = None, seed: int = 0, progress: bool = True) -> dict:
    """Run every method on every lesion; per-lesion rows, per-group means and KMMD (see :func:`run_evaluate`)."""
    from tqdm import tqdm

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
                   "simulator": lesion.simulator, "method": method, "kind": "binary", "slices": res.slices, "seconds": res.seconds,
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
                             "simulator": lesion.simulator, "method": method, "kind": "grey", "slices": res.slices, "seconds": res.seconds,
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
            kmmds[f"{method}/{kind}"] = kmmd(restored, truth, seed=seed)
    return {"rows": rows, "summary": summary, "kmmd": kmmds, "examples": examples}


def _summarise(rows: list[dict]) -> dict:
    """Means (and medians for HD95) per method, kind and group (destructive, intact, all)."""
    out: dict = {}
    keys = ("dice_in", "hd95_in", "dice_around", "hd95_around", "mae_hu", "mae", "psnr", "ssim", "seconds_per_slice")
    for row in rows:
        if "error" in row:
            continue
        groups = ("all", "destructive" if row["destructive"] else "intact", f"{row.get('simulator', 'classic')} simulator")
        for group in groups:
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
    models = models or _DEFAULT_CACHE
    rng = np.random.default_rng([seed, 6])
    parts = []
    for s in test_phantom_seeds(n_phantoms):
        case = datasets.phantom_case(s, lesion_types=None, **phantom_overrides(s))
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
        out["kmmd"][method] = kmmd(restored, binary[pick], seed=seed)
    return out


def _figure6_png(check: dict, path, n: int = 8) -> None:
    plt = pyplot()

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
    save_figure(fig, path, dpi=100)


def _examples_png(examples: dict, methods: Sequence[str], path, n: int = 3) -> None:
    plt = pyplot()

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
    save_figure(fig, path, dpi=100)


def gan_table(models: ModelCache, healthy: np.ndarray, seed: int = 0, n: int = 500) -> dict:
    """Per GAN: parameters (shipped and at width 64) and KMMD^2 of binarised samples vs ``healthy`` crops."""
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
            row.update({k: v for k, v in kmmd(samples, healthy, seed=seed).items()})
            row["train_seconds"] = meta.get("train_seconds")
            row["epochs_done"] = meta.get("epochs_done")
        table[m] = row
    return table


def gan_samples_png(models: ModelCache, healthy: np.ndarray, path, seed: int = 0, n: int = 12) -> None:
    """One row of samples per shipped GAN (binary), and a row of held-out healthy crops."""
    plt = pyplot()

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
    save_figure(fig, path, dpi=100)


def format_summary(result: dict) -> str:
    """A plain-text table of :func:`evaluate`'s summary."""
    lines = []
    for kind, groups in result["summary"].items():
        for group in ("destructive", "intact", "classic simulator", "focal simulator", "all"):
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
