"""Train the GANs of semantic inpainting (WGAN-GP, DCGAN, PGGAN) on healthy vertebra crops."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from SpineInpaintLib import SpineInpaintError
from SpineInpaintLib.core.plotting import pyplot, save_figure
from SpineInpaintLib.core.runtime import seed_everything
from SpineInpaintLib.core.weights import save_weights
from SpineInpaintLib.data import cases as datasets
from SpineInpaintLib.evaluation.metrics.mmd import kmmd
from SpineInpaintLib.inpainting.crops import CROP_FOV_MM, CROP_WINDOW
from SpineInpaintLib.inpainting.networks import (
    _DEFAULT_WIDTH,
    LATENT_DIM,
    SIZE,
    _check_kind,
    _check_model,
    build_gan,
    count_parameters,
    default_weights_path,
    sample,
)
from SpineInpaintLib.training import augment
from SpineInpaintLib.training import loop as training
from SpineInpaintLib.training.holes import case_training_arrays
from SpineInpaintLib.training.loop import RunControl

__all__ = [
    "gradient_penalty", "phantom_overrides", "build_crop_cache", "load_crop_dataset", "save_sample_grid",
    "GANTrainConfig", "train_gan", "CropDataset", "MetricsLogOnMain",
]


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------
def gradient_penalty(critic: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor, fake: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Gulrajani et al.'s penalty ``E[(||grad_x D(x_hat)||_2 - 1)^2]`` at random interpolates.

    The norm is taken per sample over all pixels (and channels) of the gradient image, then
    averaged over the batch; one uniform epsilon per sample.
    """
    eps = torch.rand(real.shape[0], 1, 1, 1, generator=generator, device=real.device)
    x_hat = (eps * real + (1.0 - eps) * fake).requires_grad_(True)
    score = critic(x_hat)
    (grad,) = torch.autograd.grad(score.sum(), x_hat, create_graph=True)
    norm = grad.flatten(1).norm(2, dim=1)
    return ((norm - 1.0) ** 2).mean()


# --------------------------------------------------------------------------------------------
# Data: healthy vertebra crops (cached per case as .npz)
# --------------------------------------------------------------------------------------------
#: The shared domain randomisation of the GAN/context training cases (frozen, so a safe default argument).
_DEFAULT_DOMAIN = augment.DomainRandomisation()


def phantom_overrides(seed: int) -> dict:
    """The compact phantom our GAN data and inpainting evaluation use: a 256x256 grid (the spine and its
    surroundings; 128-256 mm wide) covering four consecutive levels drawn from T11-S1 by ``seed``.

    The 64x64 crops only see 96 mm around each vertebra, so the smaller grid loses nothing and
    makes a case about 4x cheaper to build on a CPU.
    """
    order = (33, 32, 31, 30, 29, 28, 27, 26)  # T11 ... S1
    start = int(np.random.default_rng([int(seed), 31337]).integers(0, len(order) - 3))
    return {"shape_xy": (256, 256), "levels": tuple(order[start:start + 4])}


def build_crop_cache(root: Path, *, phantom_seeds: Sequence[int] = (), real: Sequence[str] = (),
                     real_holdout_levels: Sequence[int] = (28, 29, 30), lesions_per_level: int = 1,
                     max_lesion_levels: int = 3, seed: int = 0, progress: bool = True,
                     domain: augment.DomainRandomisation | None = _DEFAULT_DOMAIN,
                     simulator: str = "both") -> list[Path]:
    """Build (or reuse) one ``.npz`` per case under ``root`` with everything GAN/context training needs.

    Per case: binary and grey 64x64 crops of every vertebra slice (:func:`SpineInpaintLib.datasets.
    vertebra_crops`'s selection and geometry), per crop the level, slice, relative height, the
    neighbour-vertebra prior (binary and grey) and the index of the slices above and below; and the
    hole masks of ``lesions_per_level`` simulated lesions per level (mostly destructive), cropped
    the same way. Real scans leave ``real_holdout_levels`` out (they are kept for evaluation).

    Training-split cases first go through the shared domain randomisation (``domain``, one 3D draw per
    case seeded by ``seed`` and the case id, :func:`SpineInpaintLib.training.augment.randomise_case`;
    ``None``: off); validation cases never do. Cases already in ``root`` are skipped when built with
    the same ``domain`` and lesion ``simulator`` (classic, focal or both: see
    :func:`SpineInpaintLib.training.holes.case_training_arrays`; both recorded in the file), rebuilt otherwise.
    """
    from tqdm import tqdm

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    jobs = [("phantom", int(s)) for s in phantom_seeds] + [("real", name) for name in real]
    written = []
    for source, key in tqdm(jobs, desc="crop cache", unit="case", disable=not progress):
        case_id = f"phantom_{key:04d}" if source == "phantom" else f"real_{key}_0000"
        path = root / f"{case_id}.npz"
        randomise = domain is not None and datasets.split_of(case_id) == "train"
        wanted = augment.domain_digest(domain if randomise else None)
        if path.exists() and _cached_domain(path) == wanted and _cached_simulator(path) == simulator:
            written.append(path)
            continue
        case = (datasets.phantom_case(key, lesion_types=None, **phantom_overrides(key)) if source == "phantom"
                else datasets.real_case(key, seed=0, lesion_types=None))
        record = None
        if randomise:
            case = augment.randomise_case(case, augment.case_seed(seed, case.case_id, "domain"), domain)
            record = case.info["domain_randomisation"]
        exclude = tuple(real_holdout_levels) if source == "real" else ()
        data = case_training_arrays(case, lesions_per_level=lesions_per_level, seed=seed,
                                    exclude_levels=exclude, max_lesion_levels=max_lesion_levels, simulator=simulator)
        data["split"] = np.array(datasets.split_of(case.case_id))
        data["domain"] = np.array(wanted)
        data["domain_record"] = np.array(json.dumps(record))
        data["simulator"] = np.array(simulator)
        np.savez_compressed(path, **data)
        written.append(path)
    return written


def _cached_simulator(path: Path) -> str:
    """The lesion simulator a cached case's holes were drawn with (``'classic'`` for files that predate it)."""
    with np.load(path) as data:
        return str(data["simulator"]) if "simulator" in data.files else "classic"


def _cached_domain(path: Path) -> str:
    """The domain randomisation a cached case was built with (``'off'`` for files that predate it)."""
    with np.load(path) as data:
        return str(data["domain"]) if "domain" in data.files else "off"


@dataclasses.dataclass
class CropDataset:
    """Every cached case of one split, concatenated (indices re-based)."""

    binary: np.ndarray
    grey: np.ndarray
    prior_binary: np.ndarray
    prior_grey: np.ndarray
    prev: np.ndarray
    next: np.ndarray
    holes: np.ndarray
    hole_crop: np.ndarray
    hole_prev: np.ndarray
    hole_next: np.ndarray
    case_ids: list[str]

    def __len__(self) -> int:
        return int(self.binary.shape[0])

    def images(self, kind: str) -> np.ndarray:
        return self.binary if _check_kind(kind) == "binary" else self.grey

    def prior(self, kind: str) -> np.ndarray:
        return self.prior_binary if _check_kind(kind) == "binary" else self.prior_grey


def load_crop_dataset(root: Path, splits: Sequence[str] = ("train",)) -> CropDataset:
    """Concatenate the cached cases of ``splits`` from :func:`build_crop_cache`'s folder."""
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("binary", "grey", "prior_binary", "prior_grey", "prev",
                                                          "next", "holes", "hole_crop", "hole_prev", "hole_next")}
    ids = []
    offset = 0
    hole_offset = 0
    for path in sorted(Path(root).glob("*.npz")):
        with np.load(path) as data:
            if str(data["split"]) not in splits or data["binary"].shape[0] == 0:
                continue
            n, k = data["binary"].shape[0], data["holes"].shape[0]
            parts["binary"].append(data["binary"].astype(np.float32))
            parts["grey"].append(data["grey"].astype(np.float32))
            parts["prior_binary"].append(data["prior_binary"].astype(np.float32))
            parts["prior_grey"].append(data["prior_grey"].astype(np.float32))
            parts["prev"].append(data["prev"] + offset)
            parts["next"].append(data["next"] + offset)
            parts["holes"].append(data["holes"].astype(np.float32))
            parts["hole_crop"].append(data["hole_crop"] + offset)
            parts["hole_prev"].append(np.where(data["hole_prev"] >= 0, data["hole_prev"] + hole_offset, -1))
            parts["hole_next"].append(np.where(data["hole_next"] >= 0, data["hole_next"] + hole_offset, -1))
            ids.append(path.stem)
            offset += n
            hole_offset += k
    if not ids:
        raise SpineInpaintError(f"no cached crops of split {', '.join(splits)} in {root} (build them first)")
    cat = {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in parts.items()}
    return CropDataset(**cat, case_ids=ids)


def save_sample_grid(images: np.ndarray, path: Path, *, ncol: int = 8, title: str = "") -> Path:
    """Save up to ``ncol`` x ``ncol`` images (N, H, W) in [0, 1] as one grey PNG grid."""
    plt = pyplot()

    images = np.asarray(images)[: ncol * ncol]
    nrow = int(math.ceil(len(images) / ncol))
    h, w = images.shape[1:3]
    grid = np.ones((nrow * (h + 2), ncol * (w + 2)), np.float32)
    for k, img in enumerate(images):
        r, c = divmod(k, ncol)
        grid[r * (h + 2) + 1:r * (h + 2) + 1 + h, c * (w + 2) + 1:c * (w + 2) + 1 + w] = img
    fig = plt.figure(figsize=(ncol * 0.8, nrow * 0.8 + (0.3 if title else 0)), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1 - (0.3 / (nrow * 0.8 + 0.3) if title else 0)))
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9, y=0.995)
    return save_figure(fig, path)


# --------------------------------------------------------------------------------------------
# Training: the three GANs
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class GANTrainConfig(RunControl):
    """Settings of :func:`train_gan` (defaults: the papers' settings at a CPU-sized width).

    ``epochs`` x ``iters_per_epoch`` generator iterations; a checkpoint, a metrics row and a
    sample grid after every epoch; ``max_minutes`` stops cleanly (checkpoint kept) when the wall
    time runs out, and the shipped weights are then written from that state.
    """

    model: str = "wgan-gp"
    kind: str = "binary"
    data: str = "runs/gan_data"
    out: str = "runs/gan"
    epochs: int = 20
    iters_per_epoch: int = 100
    batch_size: int = 32
    width: int | None = None
    critic_width: int | None = None
    latent_dim: int = LATENT_DIM
    n_critic: int | None = None
    lr: float | None = None
    betas: tuple[float, float] | None = None
    gp_lambda: float = 10.0
    export: str | None = None

    def resolved(self) -> GANTrainConfig:
        """A copy with the model's paper defaults filled in."""
        model = _check_model(self.model)
        defaults = {  # (n_critic, lr, betas) from Gulrajani et al., Radford et al., Karras et al.
            "wgan-gp": (5, 1e-4, (0.0, 0.9)),
            "dcgan": (1, 2e-4, (0.5, 0.999)),
            "pggan": (1, 1e-3, (0.0, 0.99)),
        }[model]
        width = int(self.width or _DEFAULT_WIDTH[model][0])
        critic = int(self.critic_width or (_DEFAULT_WIDTH[model][1] if not self.width else width))
        return dataclasses.replace(
            self, model=model, kind=_check_kind(self.kind), width=width, critic_width=critic,
            n_critic=int(self.n_critic or defaults[0]), lr=float(self.lr or defaults[1]),
            betas=tuple(self.betas or defaults[2]),
        )


def _average_gradients(model: nn.Module, ctx: training.DistributedContext) -> None:
    """All-reduce-mean of the gradients (what DDP would do; it cannot with the double backward of the GP)."""
    if not ctx.distributed:
        return
    for p in model.parameters():
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)
            p.grad /= ctx.world_size


def _broadcast(model: nn.Module, ctx: training.DistributedContext) -> None:
    if ctx.distributed:
        for t in list(model.parameters()) + list(model.buffers()):
            torch.distributed.broadcast(t.data, 0)


def _pggan_schedule(step: int, total: int) -> tuple[int, float]:
    """Stage (0..4) and fade-in alpha at generator step ``step`` of ``total``.

    Stage 0 (4x4) gets a half share, every later stage one share, of which the first half fades in.
    """
    shares = [0.5, 1.0, 1.0, 1.0, 1.0]
    bounds = np.cumsum(shares) / sum(shares) * total
    stage = int(np.searchsorted(bounds, step, side="right"))
    stage = min(stage, 4)
    start = 0.0 if stage == 0 else bounds[stage - 1]
    length = bounds[stage] - start
    alpha = 1.0 if stage == 0 else float(min(1.0, (step - start) / (0.5 * length)))
    return stage, alpha


def _batch(images: torch.Tensor, rng: np.random.Generator, n: int, flip: bool = True) -> torch.Tensor:
    idx = torch.as_tensor(rng.integers(0, images.shape[0], n))
    x = images[idx]
    if flip:  # left-right mirror: the spine is near-symmetric
        mask = torch.as_tensor(rng.random(n) < 0.5)
        x[mask] = x[mask].flip(-1)
    return x


def _gan_metadata(cfg: GANTrainConfig, g: nn.Module, d: nn.Module, part: str, extra: dict) -> dict:

    return {
        "model": cfg.model,
        "part": part,
        "kind": cfg.kind,
        "architecture": {"class": type(g if part == "generator" else d).__name__, "width": cfg.width,
                         "critic_width": cfg.critic_width, "latent_dim": cfg.latent_dim, "image_size": SIZE,
                         "parameters_generator": count_parameters(g), "parameters_critic": count_parameters(d),
                         "table_ii": _TABLE_II[cfg.model]},
        "input": {"crop_size": SIZE, "crop_fov_mm": CROP_FOV_MM, "orientation": "LPS",
                  "grey_window_hu": list(CROP_WINDOW), "range": [0.0, 1.0],
                  "binary": cfg.kind == "binary"},
        "training": {**{k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("progress",)},
                     "real_scans": cached_real_scans(cfg.data)},
        **extra,
    }


def cached_real_scans(data: str | Path) -> list[str]:
    """The real scans whose crops a GAN crop cache holds (its ``real_<scan>_0000.npz`` files)."""
    return sorted(p.name[len("real_"):-len("_0000.npz")] for p in Path(data).glob("real_*_0000.npz"))


_TABLE_II = {
    "dcgan": {"generator": "ReLU & tanh", "discriminator": "LeakyReLU & sigmoid", "kernel": 5, "batch_norm": True,
              "progressive": False},
    "wgan-gp": {"generator": "ReLU & sigmoid", "discriminator": "LeakyReLU", "kernel": 5, "batch_norm": False,
                "progressive": False},
    "pggan": {"generator": "LeakyReLU", "discriminator": "LeakyReLU & sigmoid", "kernel": 3, "batch_norm": False,
              "progressive": True},
}


def train_gan(config: GANTrainConfig) -> dict:
    """Train one of the paper's GANs on cached healthy crops; returns a summary (also in ``out/summary.json``).

    Writes ``out/checkpoint.pt`` (resume with ``resume=True``), ``out/metrics.csv`` and
    ``out/curves.png``, ``out/samples/epoch_XXX.png``, and the final generator and critic as
    safetensors + JSON in ``out/`` (and in ``export``, e.g. ``SpineInpaintLib/weights/gan``, when given).
    """
    cfg = config.resolved()
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    ctx = training.init_distributed(cfg.device)
    seed = seed_everything(cfg.seed + ctx.rank)
    out = Path(cfg.out)
    train = load_crop_dataset(cfg.data, ("train",))
    val = load_crop_dataset(cfg.data, ("val",))
    images = torch.as_tensor(train.images(cfg.kind))[:, None].to(ctx.device)
    val_images = val.images(cfg.kind)
    g, d = build_gan(cfg.model, cfg.width, cfg.latent_dim, cfg.critic_width)
    g, d = g.to(ctx.device), d.to(ctx.device)
    seed_everything(cfg.seed)  # same initial weights on every rank
    _broadcast(g, ctx)
    _broadcast(d, ctx)
    opt_g = torch.optim.Adam(g.parameters(), lr=cfg.lr, betas=cfg.betas)
    opt_d = torch.optim.Adam(d.parameters(), lr=cfg.lr, betas=cfg.betas)
    start_epoch, elapsed_before = 0, 0.0
    ckpt = out / "checkpoint.pt"
    if cfg.resume and ckpt.exists():
        state = training.load_checkpoint(ckpt, models={"g": g, "d": d}, optimizers={"g": opt_g, "d": opt_d})
        start_epoch = state["epoch"]
        elapsed_before = float(state["extra"].get("seconds", 0.0))
    rng = np.random.default_rng([cfg.seed, ctx.rank, start_epoch])
    log = MetricsLogOnMain(out / "metrics.csv", start_epoch if cfg.resume else None, ctx.is_main)
    total = cfg.epochs * cfg.iters_per_epoch
    fixed_z = torch.randn(64, cfg.latent_dim, generator=torch.Generator().manual_seed(cfg.seed)).to(ctx.device)
    t0 = time.perf_counter()
    epoch = start_epoch
    from tqdm import tqdm

    bar = tqdm(total=total, initial=start_epoch * cfg.iters_per_epoch, desc=f"train {cfg.model} ({cfg.kind})",
               unit="it", disable=not (cfg.progress and ctx.is_main))
    stopped_early = False
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        sums: dict[str, float] = {}
        for it in range(cfg.iters_per_epoch):
            step = (epoch - 1) * cfg.iters_per_epoch + it
            stage, alpha = _pggan_schedule(step, total) if cfg.model == "pggan" else (4, 1.0)
            losses = _gan_step(cfg, g, d, opt_g, opt_d, images, rng, stage, alpha, ctx)
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.update(1)
        seconds = elapsed_before + time.perf_counter() - t0
        row = {k: v / cfg.iters_per_epoch for k, v in sums.items()}
        if ctx.is_main:
            g.eval()
            fake = sample(g, min(500, max(2, len(val_images))), seed=cfg.seed + 1)
            g.train()
            fake_eval = (fake >= 0.5).astype(np.float32) if cfg.kind == "binary" else fake
            row.update({f"val_{k}": v for k, v in kmmd(fake_eval, val_images, seed=cfg.seed).items()
                        if k.startswith("kmmd")})
            with torch.no_grad():
                g.eval()
                grid = g(fixed_z, stage, alpha) if cfg.model == "pggan" else g(fixed_z)
                g.train()
            grid = F.interpolate(grid, size=SIZE, mode="nearest")[:, 0].clamp(0, 1).cpu().numpy()
            save_sample_grid(grid, out / "samples" / f"epoch_{epoch:03d}.png",
                             title=f"{cfg.model} {cfg.kind} epoch {epoch} ({epoch * cfg.iters_per_epoch} it)")
            log.append(epoch=epoch, iterations=epoch * cfg.iters_per_epoch, seconds=round(seconds, 1),
                       stage=stage, alpha=round(alpha, 3), **row)
            training.save_checkpoint(ckpt, epoch=epoch, models={"g": g, "d": d}, optimizers={"g": opt_g, "d": opt_d},
                                     seed=seed, extra={"seconds": seconds, "config": _jsonable(cfg)})
        ctx.barrier()
        if cfg.max_minutes is not None and (time.perf_counter() - t0) / 60.0 > cfg.max_minutes:
            stopped_early = epoch < cfg.epochs
            break
    bar.close()
    summary: dict = {"model": cfg.model, "kind": cfg.kind, "epochs_done": epoch, "seed": cfg.seed,
                     "stopped_by_time_limit": stopped_early}
    if cfg.model == "pggan":  # ship the resolution and fade-in the growing had reached (alpha < 1 if cut short)
        stage, alpha = _pggan_schedule(epoch * cfg.iters_per_epoch - 1, total)
        g.stage, g.alpha, d.stage, d.alpha = stage, alpha, stage, alpha
    if ctx.is_main:
        summary.update(_finish_gan(cfg, g, d, out, val_images, elapsed_before + time.perf_counter() - t0, epoch))
    ctx.close()
    return summary


def _jsonable(cfg) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


class MetricsLogOnMain:
    """A :class:`training.MetricsLog` that only the main process writes."""

    def __init__(self, path: Path, resume_epoch: int | None, is_main: bool):
        self.log = training.MetricsLog(path, resume_epoch) if is_main else None
        self.path = Path(path)

    def append(self, **values) -> None:
        if self.log is not None:
            self.log.append(**values)


def _gan_step(cfg: GANTrainConfig, g, d, opt_g, opt_d, images, rng, stage: int, alpha: float,
              ctx: training.DistributedContext) -> dict[str, float]:
    """One generator iteration (after ``n_critic`` discriminator iterations)."""
    n = cfg.batch_size // max(1, ctx.world_size)
    kw = {"stage": stage, "alpha": alpha} if cfg.model == "pggan" else {}
    res = 4 * 2**stage
    out: dict[str, float] = {}
    for _ in range(cfg.n_critic):
        real = _batch(images, rng, n)
        if res != SIZE:
            real = F.adaptive_avg_pool2d(real, res)
            if alpha < 1.0:  # PGGAN fades real images too: blend with the upsampled coarser version
                coarse = F.interpolate(F.avg_pool2d(real, 2), scale_factor=2, mode="nearest")
                real = alpha * real + (1 - alpha) * coarse
        elif cfg.model == "pggan" and stage == 4 and alpha < 1.0:
            coarse = F.interpolate(F.avg_pool2d(real, 2), scale_factor=2, mode="nearest")
            real = alpha * real + (1 - alpha) * coarse
        z = torch.randn(n, cfg.latent_dim, device=real.device)
        with torch.no_grad():
            fake = g(z, **kw)
        opt_d.zero_grad(set_to_none=True)
        if cfg.model == "wgan-gp":
            d_real, d_fake = d(real).mean(), d(fake).mean()
            gp = gradient_penalty(d, real, fake)
            loss_d = d_fake - d_real + cfg.gp_lambda * gp
            out["wasserstein"] = float((d_real - d_fake).detach())
            out["gp"] = float(gp.detach())
        else:
            lr_real, lr_fake = d(real, **kw), d(fake, **kw)
            loss_d = (F.binary_cross_entropy_with_logits(lr_real, torch.ones_like(lr_real))
                      + F.binary_cross_entropy_with_logits(lr_fake, torch.zeros_like(lr_fake)))
            if cfg.model == "pggan":  # Karras et al.'s drift term keeps the logits near 0
                loss_d = loss_d + 1e-3 * (lr_real ** 2).mean()
            out["d_real_prob"] = float(torch.sigmoid(lr_real.detach()).mean())
            out["d_fake_prob"] = float(torch.sigmoid(lr_fake.detach()).mean())
        loss_d.backward()
        _average_gradients(d, ctx)
        opt_d.step()
    out["loss_d"] = float(loss_d.detach())
    opt_g.zero_grad(set_to_none=True)
    z = torch.randn(n, cfg.latent_dim, device=images.device)
    fake = g(z, **kw)
    if cfg.model == "wgan-gp":
        loss_g = -d(fake).mean()
    else:  # non-saturating loss: -log sigmoid(D(G(z)))
        logits = d(fake, **kw)
        loss_g = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
    loss_g.backward()
    _average_gradients(g, ctx)
    opt_g.step()
    out["loss_g"] = float(loss_g.detach())
    return out


def _finish_gan(cfg: GANTrainConfig, g, d, out: Path, val_images: np.ndarray, seconds: float, epoch: int) -> dict:
    g.eval()
    fake = sample(g, min(500, max(2, len(val_images))), seed=cfg.seed + 1)
    fake_eval = (fake >= 0.5).astype(np.float32) if cfg.kind == "binary" else fake
    quality = kmmd(fake_eval, val_images, seed=cfg.seed)
    extra = {"metrics": {"val_kmmd": quality, "kmmd_estimator": "squared MMD, Gaussian kernel, median-heuristic "
                         "bandwidth on flattened 64x64 images in [0, 1]; unbiased (U) and biased (V) statistics; "
                         f"{quality['n_x']} generated vs {quality['n_y']} validation crops"},
             "epochs_done": epoch, "train_seconds": round(seconds, 1), "seed": cfg.seed,
             **({"pggan_growth": {"stage": int(g.stage), "resolution": 4 * 2 ** int(g.stage), "alpha": float(g.alpha)}}
                if cfg.model == "pggan" else {}),
             "training_data": {"cache": cfg.data, "split": "train",
                               "description": "healthy 64x64 vertebra crops of phantom train-split cases and "
                                              "the real TotalSegmentator scan (levels L2-L4 held out)"}}
    paths = {}
    for folder in [out] + ([Path(cfg.export)] if cfg.export else []):
        for part, net in (("generator", g), ("critic", d)):
            path = folder / default_weights_path(cfg.model, cfg.kind, part).name
            paths.setdefault(part, []).append(str(save_weights(
                net, path, _gan_metadata(cfg, g, d, part, extra))))
        save_sample_grid(fake[:64], folder / f"{cfg.model}{'' if cfg.kind == 'binary' else '_grey'}_samples.png",
                         title=f"{cfg.model} ({cfg.kind}) samples after {epoch} epochs")
    training.plot_curves(out / "metrics.csv", out / "curves.png",
                         [("loss", ["loss_d", "loss_g"]), ("validation KMMD^2", ["val_kmmd2_unbiased"])],
                         title=f"{cfg.model} ({cfg.kind})")
    summary = {"weights": paths, **extra}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
