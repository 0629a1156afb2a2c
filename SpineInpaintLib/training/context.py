"""Train the context generator that fills a hole from its surroundings (the default inpainting network)."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from SpineInpaintLib.core.runtime import seed_everything
from SpineInpaintLib.core.weights import save_weights
from SpineInpaintLib.inpainting.methods import context_input
from SpineInpaintLib.inpainting.networks import (
    CONTEXT_CHANNELS,
    SIZE,
    ContextGenerator,
    WGANCritic,
    _check_kind,
    count_parameters,
    default_weights_path,
)
from SpineInpaintLib.training import loop as training
from SpineInpaintLib.training.gan import (
    CropDataset,
    MetricsLogOnMain,
    _average_gradients,
    _broadcast,
    _jsonable,
    cached_real_scans,
    gradient_penalty,
    load_crop_dataset,
    save_sample_grid,
)
from SpineInpaintLib.training.holes import random_hole
from SpineInpaintLib.training.loop import RunControl

__all__ = ["ContextTrainConfig", "train_context"]


# --------------------------------------------------------------------------------------------
# Training: the context generator
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ContextTrainConfig(RunControl):
    """Settings of :func:`train_context`.

    Loss: L1 (grey) or binary cross-entropy (binary) weighted ``hole_weight`` inside the hole and 1
    outside, plus ``adv_weight`` x the WGAN-GP adversarial loss ``-D(blend)`` from a critic
    (:class:`WGANCritic`, width ``critic_width``) trained alongside with the gradient penalty.
    ``sim_hole_fraction`` of the holes are the lesion simulator's (cached), the rest random blobs.
    """

    kind: str = "binary"
    data: str = "runs/gan_data"
    out: str = "runs/context"
    epochs: int = 20
    iters_per_epoch: int = 100
    batch_size: int = 32
    width: int = 16
    critic_width: int = 8
    lr: float = 3e-4
    hole_weight: float = 6.0
    adv_weight: float = 0.003
    gp_lambda: float = 10.0
    sim_hole_fraction: float = 0.6
    max_shift: int = 3
    export: str | None = None


def _context_batch(data: CropDataset, kind: str, rng: np.random.Generator, n: int, sim_fraction: float,
                   max_shift: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs (n, 7, 64, 64), truth (n, 1, 64, 64), hole (n, 1, 64, 64) for the context generator."""
    images, prior = data.images(kind), data.prior(kind)
    xs, holes3, priors = [], [], []
    for _ in range(n):
        if data.holes.shape[0] and rng.random() < sim_fraction:
            h = int(rng.integers(0, data.holes.shape[0]))
            i = int(data.hole_crop[h])
            hole_c = data.holes[h]
            hole_p = data.holes[data.hole_prev[h]] if data.hole_prev[h] >= 0 else np.zeros_like(hole_c)
            hole_n = data.holes[data.hole_next[h]] if data.hole_next[h] >= 0 else np.zeros_like(hole_c)
        else:
            i = int(rng.integers(0, len(data)))
            hole_c = random_hole(rng, data.binary[i] > 0.5)
            # neighbour slices: the same blob, slightly shrunk or grown (a 3D lesion changes slowly)
            hole_p, hole_n = (_perturb_hole(rng, hole_c) for _ in range(2))
        stack = np.stack([images[data.prev[i]], images[i], images[data.next[i]]])
        hole = np.stack([hole_p, hole_c, hole_n]).astype(np.float32)
        pr = prior[i]
        if max_shift:
            dy, dx = (int(v) for v in rng.integers(-max_shift, max_shift + 1, 2))
            stack, hole, pr = (np.roll(a, (dy, dx), axis=(-2, -1)) for a in (stack, hole, pr))
            pr = np.roll(pr, (int(rng.integers(-1, 2)), int(rng.integers(-1, 2))), axis=(-2, -1))
        if rng.random() < 0.5:
            stack, hole, pr = stack[..., ::-1], hole[..., ::-1], pr[..., ::-1]
        xs.append(stack)
        holes3.append(hole)
        priors.append(pr)
    x = torch.as_tensor(np.ascontiguousarray(np.stack(xs)), dtype=torch.float32)
    holes = torch.as_tensor(np.ascontiguousarray(np.stack(holes3)), dtype=torch.float32)
    pr = torch.as_tensor(np.ascontiguousarray(np.stack(priors)), dtype=torch.float32)
    # a slice whose hole covers everything keeps nothing: never train on it
    inputs = context_input(x, holes, pr)
    return inputs, x[:, 1:2], holes[:, 1:2]


def _perturb_hole(rng: np.random.Generator, hole: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    r = rng.random()
    if r < 0.3:
        return ndimage.binary_erosion(hole, iterations=int(rng.integers(1, 4))).astype(np.float32)
    if r < 0.6:
        return ndimage.binary_dilation(hole, iterations=int(rng.integers(1, 3))).astype(np.float32)
    if r < 0.75:
        return np.zeros_like(hole, dtype=np.float32)
    return hole.astype(np.float32)


def train_context(config: ContextTrainConfig) -> dict:
    """Train the :class:`ContextGenerator` (with its WGAN-GP critic); same outputs as :func:`train_gan`."""
    cfg = dataclasses.replace(config, kind=_check_kind(config.kind))
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    ctx = training.init_distributed(cfg.device)
    seed = seed_everything(cfg.seed)
    out = Path(cfg.out)
    train = load_crop_dataset(cfg.data, ("train",))
    val = load_crop_dataset(cfg.data, ("val",))
    net, critic = ContextGenerator(cfg.width).to(ctx.device), WGANCritic(cfg.critic_width).to(ctx.device)
    _broadcast(net, ctx)
    _broadcast(critic, ctx)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
    opt_c = torch.optim.Adam(critic.parameters(), lr=1e-4, betas=(0.0, 0.9))
    start_epoch, elapsed_before = 0, 0.0
    ckpt = out / "checkpoint.pt"
    if cfg.resume and ckpt.exists():
        state = training.load_checkpoint(ckpt, models={"g": net, "d": critic}, optimizers={"g": opt, "d": opt_c})
        start_epoch, elapsed_before = state["epoch"], float(state["extra"].get("seconds", 0.0))
    rng = np.random.default_rng([cfg.seed, ctx.rank, start_epoch])
    val_rng = np.random.default_rng([cfg.seed, 99])
    val_batch = _context_batch(val, cfg.kind, val_rng, 256, cfg.sim_hole_fraction, 0)
    log = MetricsLogOnMain(out / "metrics.csv", start_epoch if cfg.resume else None, ctx.is_main)
    total = cfg.epochs * cfg.iters_per_epoch
    from tqdm import tqdm

    bar = tqdm(total=total, initial=start_epoch * cfg.iters_per_epoch, desc=f"train context ({cfg.kind})",
               unit="it", disable=not (cfg.progress and ctx.is_main))
    t0 = time.perf_counter()
    epoch = start_epoch
    n = cfg.batch_size // max(1, ctx.world_size)
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        sums: dict[str, float] = {}
        for _ in range(cfg.iters_per_epoch):
            inputs, truth, hole = _context_batch(train, cfg.kind, rng, n, cfg.sim_hole_fraction, cfg.max_shift)
            inputs, truth, hole = inputs.to(ctx.device), truth.to(ctx.device), hole.to(ctx.device)
            pred = net(inputs)
            blend = hole * pred + (1 - hole) * truth
            # critic step on real healthy crops vs blended fills
            opt_c.zero_grad(set_to_none=True)
            fake = blend.detach()
            gp = gradient_penalty(critic, truth, fake)
            loss_c = critic(fake).mean() - critic(truth).mean() + cfg.gp_lambda * gp
            loss_c.backward()
            _average_gradients(critic, ctx)
            opt_c.step()
            # generator step
            opt.zero_grad(set_to_none=True)
            rec = _reconstruction(pred, truth, hole, cfg.kind, cfg.hole_weight)
            adv = -critic(blend).mean()
            loss = rec + cfg.adv_weight * adv
            loss.backward()
            _average_gradients(net, ctx)
            opt.step()
            for k, v in (("loss", loss), ("rec", rec), ("adv", adv), ("critic", loss_c)):
                v = float(v.detach())
                sums[k] = sums.get(k, 0.0) + v
            bar.update(1)
        seconds = elapsed_before + time.perf_counter() - t0
        if ctx.is_main:
            row = {k: v / cfg.iters_per_epoch for k, v in sums.items()}
            row.update(_context_validation(net, val_batch, cfg.kind))
            log.append(epoch=epoch, iterations=epoch * cfg.iters_per_epoch, seconds=round(seconds, 1), **row)
            _save_context_grid(net, val_batch, out / "samples" / f"epoch_{epoch:03d}.png",
                               f"context ({cfg.kind}) epoch {epoch}")
            training.save_checkpoint(ckpt, epoch=epoch, models={"g": net, "d": critic},
                                     optimizers={"g": opt, "d": opt_c}, seed=seed,
                                     extra={"seconds": seconds, "config": _jsonable(cfg)})
        ctx.barrier()
        if cfg.max_minutes is not None and (time.perf_counter() - t0) / 60.0 > cfg.max_minutes:
            break
    bar.close()
    summary: dict = {"model": "context", "kind": cfg.kind, "epochs_done": epoch, "seed": cfg.seed}
    if ctx.is_main:
        val_metrics = _context_validation(net, val_batch, cfg.kind)
        meta = {
            "model": "context", "part": "generator", "kind": cfg.kind,
            "architecture": {"class": "ContextGenerator", "width": cfg.width, "in_channels": CONTEXT_CHANNELS,
                             "parameters": count_parameters(net), "critic": "WGANCritic",
                             "critic_width": cfg.critic_width, "parameters_critic": count_parameters(critic)},
            "input": {"channels": ["known z-1", "hole z-1", "known z", "hole z", "known z+1", "hole z+1",
                                   "adjacent-vertebra prior"], "crop_size": SIZE, "orientation": "LPS"},
            "training": {**_jsonable(cfg), "real_scans": cached_real_scans(cfg.data)}, "epochs_done": epoch,
            "seed": cfg.seed,
            "train_seconds": round(elapsed_before + time.perf_counter() - t0, 1),
            "metrics": {"validation (256 holes, 60 % simulated lesions)": val_metrics},
        }
        paths = []
        for folder in [out] + ([Path(cfg.export)] if cfg.export else []):
            paths.append(str(save_weights(net, folder / default_weights_path("context", cfg.kind).name, meta)))
            paths.append(str(save_weights(
                critic, folder / default_weights_path("context", cfg.kind, "critic").name,
                {**meta, "part": "critic"})))
            _save_context_grid(net, val_batch, folder / f"context{'' if cfg.kind == 'binary' else '_grey'}_samples.png",
                               f"context generator ({cfg.kind}): input | output | truth")
        training.plot_curves(out / "metrics.csv", out / "curves.png",
                             [("loss", ["rec", "loss"]), ("validation", [k for k in val_metrics])],
                             title=f"context ({cfg.kind})")
        summary.update({"weights": paths, **meta})
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    ctx.close()
    return summary


def _reconstruction(pred, truth, hole, kind: str, hole_weight: float) -> torch.Tensor:
    weight = 1.0 + (hole_weight - 1.0) * hole
    if kind == "binary":
        per_pixel = F.binary_cross_entropy(pred.clamp(1e-6, 1 - 1e-6), truth, reduction="none")
    else:
        per_pixel = (pred - truth).abs()
    return (weight * per_pixel).sum() / weight.sum()


@torch.no_grad()
def _context_validation(net: nn.Module, batch, kind: str) -> dict[str, float]:
    was = net.training
    net.eval()
    inputs, truth, hole = batch
    pred = net(inputs)
    net.train(was)
    h = hole > 0.5
    if kind == "binary":
        p, t = (pred >= 0.5) & h, (truth >= 0.5) & h
        inter, total = (p & t).sum().item(), p.sum().item() + t.sum().item()
        return {"val_hole_dice": 2 * inter / total if total else 1.0,
                "val_hole_error": float(((pred >= 0.5) != (truth >= 0.5))[h].float().mean())}
    return {"val_hole_mae": float((pred - truth).abs()[h].mean())}


def _save_context_grid(net: nn.Module, batch, path: Path, title: str) -> None:
    inputs, truth, hole = (t[:16] for t in batch)
    with torch.no_grad():
        was = net.training
        net.eval()
        pred = net(inputs)
        net.train(was)
    shown = inputs[:, 2:3] + 0.5 * hole  # known pixels, the hole shaded grey
    blend = hole * pred + (1 - hole) * truth
    # each sample: input | output | truth, two samples per row
    rows = torch.cat([shown.clamp(0, 1), blend, truth], dim=1).reshape(-1, SIZE, SIZE).numpy()
    save_sample_grid(rows[:48], path, ncol=6, title=title)
