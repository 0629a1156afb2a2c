"""Generative models of healthy vertebrae: WGAN-GP, DCGAN and PGGAN (Miao et al., Table II) and a context generator.

The paper trains GANs on 64x64 binary crops of healthy spine (its section III.C) and compares
three of them. Their configurations (Table II), as built here:

============  ====================  ==================  ======  ==========  ===========
model         generator             discriminator       kernel  batch norm  progressive
============  ====================  ==================  ======  ==========  ===========
DCGAN         ReLU & tanh           LeakyReLU & sigmoid 5x5     yes         no
WGAN-GP       ReLU & sigmoid        LeakyReLU (critic)  5x5     no          no
PGGAN         LeakyReLU             LeakyReLU & sigmoid 3x3     no          yes
============  ====================  ==================  ======  ==========  ===========

- WGAN-GP (Gulrajani et al. 2017, the paper's Eq. 1): a linear layer to 4x4, then four 5x5
  transposed convolutions with stride 2 (4 -> 64 pixels), ReLU between them and a sigmoid at the
  end; the critic is four 5x5 stride-2 convolutions with LeakyReLU(0.2) and a linear score. The
  gradient penalty takes the L2 norm of the critic's gradient *per sample over all pixels* at
  random interpolates, lambda = 10; five critic steps per generator step; Adam lr 1e-4,
  betas (0, 0.9) -- all as Gulrajani et al.'s Algorithm 1.
- DCGAN (Radford et al. 2016): the same topology with batch norm; tanh output (rescaled to [0, 1]
  so that every generator here returns images in [0, 1]); the discriminator's sigmoid is applied
  inside the numerically stable binary cross-entropy (``probability`` gives it explicitly); Adam
  lr 2e-4, betas (0.5, 0.999).
- PGGAN (Karras et al. 2018): 3x3 convolutions, LeakyReLU(0.2), pixel norm in the generator
  (not batch norm), minibatch standard deviation and equalised learning rate, grown 4 -> 64 with
  fade-in; linear output (clamped to [0, 1] when sampled); a sigmoid discriminator (Table II)
  trained with the non-saturating logistic loss; Adam lr 1e-3, betas (0, 0.99).

Beside them, :class:`ContextGenerator` is our improvement for inpainting (not in the paper): an
encoder-decoder that sees the known pixels of the slice and of its two neighbour slices (2.5D) and
a shape prior from the adjacent healthy vertebrae, trained on healthy crops with lesion-shaped
holes (the lesion simulator's destroyed regions and random blobs) with a hole-weighted
reconstruction loss plus a WGAN-GP critic as the adversarial loss.

Training (:func:`train_gan`, :func:`train_context`; ``python -m SpineInpaintLib train gan``) is
seeded, resumable from the last checkpoint, logs metrics per epoch (an epoch is a fixed number of
generator iterations), saves sample grids as it goes and runs unchanged under ``torchrun``
(gradients are averaged over processes by hand, because DDP does not support the double backward
of the gradient penalty).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from SpineInpaintLib import SpineInpaintError, training

__all__ = [
    "GAN_MODELS",
    "KINDS",
    "LATENT_DIM",
    "WGANGenerator",
    "WGANCritic",
    "DCGANGenerator",
    "DCGANDiscriminator",
    "PGGANGenerator",
    "PGGANDiscriminator",
    "ContextGenerator",
    "build_gan",
    "count_parameters",
    "gradient_penalty",
    "GANTrainConfig",
    "ContextTrainConfig",
    "train_gan",
    "train_context",
    "build_crop_cache",
    "phantom_overrides",
    "load_crop_dataset",
    "load_gan",
    "load_context",
    "default_weights_path",
    "save_sample_grid",
    "kmmd",
    "RESOURCES",
]

#: The paper's three GANs.
GAN_MODELS: tuple[str, ...] = ("wgan-gp", "dcgan", "pggan")
#: Image kinds: the paper's binary spine masks, and grayscale CT (our addition).
KINDS: tuple[str, ...] = ("binary", "grey")
#: Size of the latent vector z (Gulrajani et al.'s 128).
LATENT_DIM = 128
#: Shipped weights and their metadata.
RESOURCES = Path(__file__).resolve().parents[1] / "Resources" / "gan"
#: Image side (the paper's 64x64).
SIZE = 64


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return int(sum(p.numel() for p in module.parameters() if p.requires_grad))


# --------------------------------------------------------------------------------------------
# WGAN-GP and DCGAN (the same topology; DCGAN adds batch norm and changes the end activations)
# --------------------------------------------------------------------------------------------
def _up(c_in: int, c_out: int) -> nn.ConvTranspose2d:
    """A 5x5 transposed convolution that doubles the side exactly (padding 2, output padding 1)."""
    return nn.ConvTranspose2d(c_in, c_out, 5, stride=2, padding=2, output_padding=1)


def _down(c_in: int, c_out: int) -> nn.Conv2d:
    """A 5x5 stride-2 convolution that halves the side."""
    return nn.Conv2d(c_in, c_out, 5, stride=2, padding=2)


class WGANGenerator(nn.Module):
    """WGAN-GP generator: z -> linear -> 4x4x(8w) -> four 5x5 transposed convolutions -> 64x64, sigmoid.

    ReLU after the linear layer and after each hidden transposed convolution, no batch norm (the
    gradient penalty conflicts with it, as the paper says).
    """

    def __init__(self, latent_dim: int = LATENT_DIM, width: int = 32, channels: int = 1):
        super().__init__()
        self.latent_dim, self.width = latent_dim, width
        self.fc = nn.Linear(latent_dim, 8 * width * 16)
        self.convs = nn.ModuleList([_up(8 * width, 4 * width), _up(4 * width, 2 * width),
                                    _up(2 * width, width), _up(width, channels)])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc(z)).view(z.shape[0], 8 * self.width, 4, 4)
        for conv in self.convs[:-1]:
            x = F.relu(conv(x))
        return torch.sigmoid(self.convs[-1](x))


class WGANCritic(nn.Module):
    """WGAN-GP critic: four 5x5 stride-2 convolutions with LeakyReLU(0.2), then a linear score (no sigmoid)."""

    def __init__(self, width: int = 32, channels: int = 1):
        super().__init__()
        self.width = width
        self.convs = nn.ModuleList([_down(channels, width), _down(width, 2 * width),
                                    _down(2 * width, 4 * width), _down(4 * width, 8 * width)])
        self.fc = nn.Linear(8 * width * 16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.2)
        return self.fc(x.flatten(1)).squeeze(1)


class DCGANGenerator(nn.Module):
    """DCGAN generator: the WGAN-GP topology with batch norm, ReLU and a tanh output mapped to [0, 1]."""

    def __init__(self, latent_dim: int = LATENT_DIM, width: int = 32, channels: int = 1):
        super().__init__()
        self.latent_dim, self.width = latent_dim, width
        self.fc = nn.Linear(latent_dim, 8 * width * 16, bias=False)
        self.bn0 = nn.BatchNorm1d(8 * width * 16)
        self.convs = nn.ModuleList([_up(8 * width, 4 * width), _up(4 * width, 2 * width),
                                    _up(2 * width, width), _up(width, channels)])
        self.bns = nn.ModuleList([nn.BatchNorm2d(c) for c in (4 * width, 2 * width, width)])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.fc(z))).view(z.shape[0], 8 * self.width, 4, 4)
        for conv, bn in zip(self.convs[:-1], self.bns):
            x = F.relu(bn(conv(x)))
        # tanh as in Table II; (t + 1) / 2 puts the image in [0, 1] like the other generators.
        return 0.5 * (torch.tanh(self.convs[-1](x)) + 1.0)


class DCGANDiscriminator(nn.Module):
    """DCGAN discriminator: 5x5 stride-2 convolutions, batch norm (not on the first), LeakyReLU(0.2).

    ``forward`` returns the logit; the sigmoid of Table II is applied by the loss
    (``binary_cross_entropy_with_logits``) or by :meth:`probability`.
    """

    def __init__(self, width: int = 32, channels: int = 1):
        super().__init__()
        self.convs = nn.ModuleList([_down(channels, width), _down(width, 2 * width),
                                    _down(2 * width, 4 * width), _down(4 * width, 8 * width)])
        self.bns = nn.ModuleList([nn.Identity()] + [nn.BatchNorm2d(c) for c in (2 * width, 4 * width, 8 * width)])
        self.fc = nn.Linear(8 * width * 16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, bn in zip(self.convs, self.bns):
            x = F.leaky_relu(bn(conv(x)), 0.2)
        return self.fc(x.flatten(1)).squeeze(1)

    def probability(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self(x))


# --------------------------------------------------------------------------------------------
# PGGAN
# --------------------------------------------------------------------------------------------
class _EqConv(nn.Module):
    """Convolution with equalised learning rate: N(0, 1) weights scaled by He's constant at run time."""

    def __init__(self, c_in: int, c_out: int, kernel: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(c_out))
        self.scale = math.sqrt(2.0 / (c_in * kernel * kernel))
        self.padding = kernel // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.scale, self.bias, padding=self.padding)


class _EqLinear(nn.Module):
    def __init__(self, n_in: int, n_out: int, gain: float = math.sqrt(2.0)):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in))
        self.bias = nn.Parameter(torch.zeros(n_out))
        self.scale = gain / math.sqrt(n_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.scale, self.bias)


def _pixel_norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + 1e-8)


def _pggan_channels(width: int) -> list[int]:
    """Feature maps at 4, 8, 16, 32, 64 pixels."""
    return [8 * width, 8 * width, 4 * width, 2 * width, width]


class PGGANGenerator(nn.Module):
    """PGGAN generator: 3x3 convolutions, LeakyReLU(0.2), pixel norm; grows 4 -> 64 with fade-in.

    ``forward(z, stage, alpha)``: ``stage`` 0..4 is the resolution 4 * 2**stage, ``alpha`` in [0, 1]
    fades the newest block in over the upsampled previous output. The output is linear (Table II
    lists LeakyReLU only); :meth:`sample` and ``forward`` at full resolution clamp to [0, 1] outside
    training.
    """

    n_stages = 5

    def __init__(self, latent_dim: int = LATENT_DIM, width: int = 16, channels: int = 1):
        super().__init__()
        self.latent_dim, self.width = latent_dim, width
        ch = _pggan_channels(width)
        self.fc = _EqLinear(latent_dim, ch[0] * 16, gain=math.sqrt(2.0) / 4)
        self.conv0 = _EqConv(ch[0], ch[0], 3)
        self.blocks = nn.ModuleList(
            [nn.ModuleList([_EqConv(ch[i - 1], ch[i], 3), _EqConv(ch[i], ch[i], 3)]) for i in range(1, 5)]
        )
        self.to_image = nn.ModuleList([_EqConv(c, channels, 1) for c in ch])
        for head in self.to_image:
            head.scale = 1.0 / math.sqrt(head.weight.shape[1])  # linear output: gain 1
        self.stage, self.alpha = 4, 1.0

    def forward(self, z: torch.Tensor, stage: int | None = None, alpha: float | None = None) -> torch.Tensor:
        stage = self.stage if stage is None else stage
        alpha = self.alpha if alpha is None else alpha
        x = _pixel_norm(z)
        x = _pixel_norm(F.leaky_relu(self.fc(x), 0.2).view(z.shape[0], -1, 4, 4))
        x = _pixel_norm(F.leaky_relu(self.conv0(x), 0.2))
        previous = x
        for i in range(1, stage + 1):
            previous = x
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            for conv in self.blocks[i - 1]:
                x = _pixel_norm(F.leaky_relu(conv(x), 0.2))
        out = self.to_image[stage](x)
        if stage > 0 and alpha < 1.0:
            skip = F.interpolate(self.to_image[stage - 1](previous), scale_factor=2, mode="nearest")
            out = alpha * out + (1.0 - alpha) * skip
        if not self.training:
            out = out.clamp(0.0, 1.0)
        return out


class PGGANDiscriminator(nn.Module):
    """PGGAN discriminator: 3x3 convolutions, LeakyReLU(0.2), minibatch stddev; logit out (sigmoid in the loss)."""

    n_stages = 5

    def __init__(self, width: int = 16, channels: int = 1):
        super().__init__()
        ch = _pggan_channels(width)
        self.from_image = nn.ModuleList([_EqConv(channels, c, 1) for c in ch])
        # blocks[i] takes resolution 4 * 2**i down to half (channels ch[i] -> ch[i - 1])
        self.blocks = nn.ModuleList(
            [nn.ModuleList([_EqConv(ch[i], ch[i], 3), _EqConv(ch[i], ch[i - 1], 3)]) for i in range(1, 5)]
        )
        self.final_conv = _EqConv(ch[0] + 1, ch[0], 3)
        self.fc1 = _EqLinear(ch[0] * 16, ch[0])
        self.fc2 = _EqLinear(ch[0], 1, gain=1.0)
        self.stage, self.alpha = 4, 1.0

    def forward(self, x: torch.Tensor, stage: int | None = None, alpha: float | None = None) -> torch.Tensor:
        stage = self.stage if stage is None else stage
        alpha = self.alpha if alpha is None else alpha
        if x.shape[-1] != 4 * 2**stage:
            x = F.adaptive_avg_pool2d(x, 4 * 2**stage)
        h = F.leaky_relu(self.from_image[stage](x), 0.2)
        for i in range(stage, 0, -1):
            for conv in self.blocks[i - 1]:
                h = F.leaky_relu(conv(h), 0.2)
            h = F.avg_pool2d(h, 2)
            if i == stage and alpha < 1.0:
                skip = F.leaky_relu(self.from_image[stage - 1](F.avg_pool2d(x, 2)), 0.2)
                h = alpha * h + (1.0 - alpha) * skip
        std = torch.sqrt(h.var(dim=0, unbiased=False) + 1e-8).mean()
        h = torch.cat([h, std.expand(h.shape[0], 1, 4, 4)], dim=1)
        h = F.leaky_relu(self.final_conv(h), 0.2)
        h = F.leaky_relu(self.fc1(h.flatten(1)), 0.2)
        return self.fc2(h).squeeze(1)

    def probability(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self(x))


# --------------------------------------------------------------------------------------------
# Context generator (our improvement: conditional, 2.5D, with a neighbour-vertebra shape prior)
# --------------------------------------------------------------------------------------------
#: Input channels of :class:`ContextGenerator`: known image and hole of slices z-1, z, z+1, prior.
CONTEXT_CHANNELS = 7


class ContextGenerator(nn.Module):
    """Encoder-decoder that fills a hole from its context (our improvement over z-optimisation).

    Input (B, 7, 64, 64): for slices z-1, z and z+1 the known image (0 in the hole) and the hole
    (1 = to fill), then the shape/intensity prior from the adjacent healthy vertebrae at the same
    relative height (0 where none). Output (B, 1, 64, 64) in [0, 1] (sigmoid). 3x3 convolutions
    (stride 2) down to 8x8, two dilated 3x3 convolutions there (receptive field over the whole
    crop), 4x4 transposed convolutions back up with skip connections; LeakyReLU, no batch norm.
    Small enough (about 60 M multiply-adds a slice) to train and run on a CPU.
    """

    def __init__(self, width: int = 16, in_channels: int = CONTEXT_CHANNELS):
        super().__init__()
        self.width = width
        w = width
        self.inc = nn.Conv2d(in_channels, w, 3, padding=1)
        self.d1 = nn.Conv2d(w, 2 * w, 3, stride=2, padding=1)
        self.d2 = nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1)
        self.d3 = nn.Conv2d(4 * w, 8 * w, 3, stride=2, padding=1)
        self.mid1 = nn.Conv2d(8 * w, 8 * w, 3, padding=2, dilation=2)
        self.mid2 = nn.Conv2d(8 * w, 8 * w, 3, padding=4, dilation=4)
        self.u3 = nn.ConvTranspose2d(8 * w, 4 * w, 4, stride=2, padding=1)
        self.u2 = nn.ConvTranspose2d(8 * w, 2 * w, 4, stride=2, padding=1)
        self.u1 = nn.ConvTranspose2d(4 * w, w, 4, stride=2, padding=1)
        self.out = nn.Conv2d(2 * w, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = lambda t: F.leaky_relu(t, 0.2)  # noqa: E731 - local shorthand
        e0 = act(self.inc(x))
        e1 = act(self.d1(e0))
        e2 = act(self.d2(e1))
        e3 = act(self.d3(e2))
        e3 = e3 + act(self.mid2(act(self.mid1(e3))))
        y = act(self.u3(e3))
        y = act(self.u2(torch.cat([y, e2], 1)))
        y = act(self.u1(torch.cat([y, e1], 1)))
        return torch.sigmoid(self.out(torch.cat([y, e0], 1)))


# --------------------------------------------------------------------------------------------
# Construction and loading
# --------------------------------------------------------------------------------------------
#: (generator, discriminator) base widths shipped: CPU-sized (the papers' 64x64 nets use 64); the
#: paper gives no widths, only that WGAN-GP is the lightest of the three.
_DEFAULT_WIDTH = {"wgan-gp": (16, 16), "dcgan": (16, 16), "pggan": (8, 8)}


def build_gan(model: str, width: int | None = None, latent_dim: int = LATENT_DIM,
              critic_width: int | None = None) -> tuple[nn.Module, nn.Module]:
    """``(generator, discriminator)`` of one of :data:`GAN_MODELS`, freshly initialised.

    ``width`` is the generator's base width (its last hidden layer; the first has 8x), ``critic_width``
    the discriminator's (default: the shipped pair of :data:`_DEFAULT_WIDTH`, or ``width``).
    """
    model = _check_model(model)
    if width is None:
        width, default_critic = _DEFAULT_WIDTH[model]
        critic_width = critic_width or default_critic
    width = int(width)
    critic_width = int(critic_width or width)
    if model == "wgan-gp":
        g = WGANGenerator(latent_dim, width)
        # start the sigmoid near the data's mean (about 15 % of a crop is bone), away from saturation
        nn.init.constant_(g.convs[-1].bias, -1.7)
        return g, WGANCritic(critic_width)
    if model == "dcgan":
        g, d = DCGANGenerator(latent_dim, width), DCGANDiscriminator(critic_width)
        for m in list(g.modules()) + list(d.modules()):  # Radford et al.: N(0, 0.02) weights
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                nn.init.normal_(m.weight, 0.0, 0.02)
        return g, d
    return PGGANGenerator(latent_dim, width), PGGANDiscriminator(critic_width)


def _check_model(model: str) -> str:
    name = str(model).lower().replace("_", "-")
    if name == "wgan":
        name = "wgan-gp"
    if name not in GAN_MODELS:
        raise SpineInpaintError(f"unknown GAN '{model}' (use {', '.join(GAN_MODELS)})")
    return name


def _check_kind(kind: str) -> str:
    kind = "grey" if kind in ("gray", "grayscale", "greyscale") else kind
    if kind not in KINDS:
        raise SpineInpaintError(f"unknown image kind '{kind}' (use binary or grey)")
    return kind


def default_weights_path(model: str, kind: str = "binary", part: str = "generator") -> Path:
    """``Resources/gan/<model>[_grey]_<part>.safetensors`` (part: generator, critic; context: model)."""
    kind = _check_kind(kind)
    suffix = "" if kind == "binary" else "_grey"
    return RESOURCES / f"{model}{suffix}_{part}.safetensors"


def load_gan(model: str = "wgan-gp", kind: str = "binary", directory: Path | None = None) -> tuple[nn.Module, nn.Module, dict]:
    """The shipped (or ``directory``'s) generator and critic in eval mode, and the generator's metadata."""
    model = _check_model(model)
    paths = [default_weights_path(model, kind, part) for part in ("generator", "critic")]
    if directory is not None:
        paths = [Path(directory) / p.name for p in paths]
    meta = training.read_weights_metadata(paths[0]) if paths[0].exists() else None
    if meta is None:
        raise SpineInpaintError(f"no {kind} {model} weights at {paths[0]} (train them: python -m SpineInpaintLib "
                                f"train gan --model {model} --kind {kind})")
    arch = meta["architecture"]
    g, d = build_gan(model, arch["width"], arch["latent_dim"], arch.get("critic_width"))
    training.load_weights(g, paths[0])
    training.load_weights(d, paths[1])
    growth = meta.get("pggan_growth")
    if growth:  # a PGGAN cut short keeps the stage and fade-in it was trained to
        g.stage, g.alpha, d.stage, d.alpha = growth["stage"], growth["alpha"], growth["stage"], growth["alpha"]
    return g.eval(), d.eval(), meta


def load_context(kind: str = "binary", directory: Path | None = None) -> tuple[nn.Module, dict]:
    """The shipped (or ``directory``'s) :class:`ContextGenerator` in eval mode, and its metadata."""
    path = default_weights_path("context", kind, "generator")
    if directory is not None:
        path = Path(directory) / path.name
    if not path.exists():
        raise SpineInpaintError(f"no {kind} context-generator weights at {path} (train them: python -m "
                                f"SpineInpaintLib train gan --model context --kind {kind})")
    meta = training.read_weights_metadata(path)
    net = ContextGenerator(meta["architecture"]["width"])
    training.load_weights(net, path)
    return net.eval(), meta


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
                     max_lesion_levels: int = 3, seed: int = 0, progress: bool = True) -> list[Path]:
    """Build (or reuse) one ``.npz`` per case under ``root`` with everything GAN/context training needs.

    Per case: binary and grey 64x64 crops of every vertebra slice (:func:`SpineInpaintLib.datasets.
    vertebra_crops`'s selection and geometry), per crop the level, slice, relative height, the
    neighbour-vertebra prior (binary and grey) and the index of the slices above and below; and the
    hole masks of ``lesions_per_level`` simulated lesions per level (mostly destructive), cropped
    the same way. Cases already in ``root`` are skipped. Real scans leave ``real_holdout_levels``
    out (they are kept for evaluation).
    """
    from tqdm import tqdm

    from SpineInpaintLib import datasets, inpainting

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    jobs = [("phantom", int(s)) for s in phantom_seeds] + [("real", name) for name in real]
    written = []
    for source, key in tqdm(jobs, desc="crop cache", unit="case", disable=not progress):
        case_id = f"phantom_{key:04d}" if source == "phantom" else f"real_{key}_0000"
        path = root / f"{case_id}.npz"
        if path.exists():
            written.append(path)
            continue
        case = (datasets.phantom_case(key, lesion_types=None, **phantom_overrides(key)) if source == "phantom"
                else datasets.real_case(key, seed=0, lesion_types=None))
        exclude = tuple(real_holdout_levels) if source == "real" else ()
        data = inpainting.case_training_arrays(case, lesions_per_level=lesions_per_level, seed=seed,
                                               exclude_levels=exclude, max_lesion_levels=max_lesion_levels)
        data["split"] = np.array(datasets.split_of(case.case_id))
        np.savez_compressed(path, **data)
        written.append(path)
    return written


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


# --------------------------------------------------------------------------------------------
# Evaluation helpers
# --------------------------------------------------------------------------------------------
def kmmd(x: np.ndarray, y: np.ndarray, *, max_samples: int = 500, seed: int = 0) -> dict[str, float]:
    """Kernel MMD between two image sets: unbiased and biased squared MMD, Gaussian kernel, median bandwidth.

    Each image is flattened to a 4096-vector in [0, 1]; at most ``max_samples`` images of each set
    (drawn without replacement, seeded) keep the kernel matrices small.
    """
    from SpineInpaintLib import metrics

    rng = np.random.default_rng(seed)
    x = x[rng.permutation(len(x))[:max_samples]] if len(x) > max_samples else x
    y = y[rng.permutation(len(y))[:max_samples]] if len(y) > max_samples else y
    sigma = metrics.median_bandwidth(x, y)
    return {"kmmd2_unbiased": metrics.mmd2_unbiased(x, y, sigma), "kmmd2_biased": metrics.mmd2_biased(x, y, sigma),
            "bandwidth": sigma, "n_x": int(len(x)), "n_y": int(len(y))}


@torch.no_grad()
def sample(generator: nn.Module, n: int, *, seed: int = 0, batch: int = 256) -> np.ndarray:
    """``n`` images (N, 64, 64) in [0, 1] from a generator in eval mode, seeded."""
    was_training = generator.training
    generator.eval()
    rng = torch.Generator().manual_seed(int(seed))
    out = []
    for start in range(0, n, batch):
        z = torch.randn(min(batch, n - start), generator.latent_dim, generator=rng)
        out.append(generator(z).clamp(0, 1)[:, 0].cpu().numpy())
    generator.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, SIZE, SIZE), np.float32)


def save_sample_grid(images: np.ndarray, path: Path, *, ncol: int = 8, title: str = "") -> Path:
    """Save up to ``ncol`` x ``ncol`` images (N, H, W) in [0, 1] as one grey PNG grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


# --------------------------------------------------------------------------------------------
# Training: the three GANs
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class GANTrainConfig:
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
    seed: int = 0
    device: str = "auto"
    resume: bool = False
    max_minutes: float | None = None
    threads: int | None = None
    export: str | None = None
    progress: bool = True

    def resolved(self) -> "GANTrainConfig":
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
    from SpineInpaintLib import datasets

    return {
        "model": cfg.model,
        "part": part,
        "kind": cfg.kind,
        "architecture": {"class": type(g if part == "generator" else d).__name__, "width": cfg.width,
                         "critic_width": cfg.critic_width, "latent_dim": cfg.latent_dim, "image_size": SIZE,
                         "parameters_generator": count_parameters(g), "parameters_critic": count_parameters(d),
                         "table_ii": _TABLE_II[cfg.model]},
        "input": {"crop_size": SIZE, "crop_fov_mm": datasets.CROP_FOV_MM, "orientation": "LPS",
                  "grey_window_hu": list(datasets.CROP_WINDOW), "range": [0.0, 1.0],
                  "binary": cfg.kind == "binary"},
        "training": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("progress",)},
        **extra,
    }


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
    safetensors + JSON in ``out/`` (and in ``export``, e.g. ``Resources/gan``, when given).
    """
    cfg = config.resolved()
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    ctx = training.init_distributed(cfg.device)
    seed = training.seed_everything(cfg.seed + ctx.rank)
    out = Path(cfg.out)
    train = load_crop_dataset(cfg.data, ("train",))
    val = load_crop_dataset(cfg.data, ("val",))
    images = torch.as_tensor(train.images(cfg.kind))[:, None].to(ctx.device)
    val_images = val.images(cfg.kind)
    g, d = build_gan(cfg.model, cfg.width, cfg.latent_dim, cfg.critic_width)
    g, d = g.to(ctx.device), d.to(ctx.device)
    training.seed_everything(cfg.seed)  # same initial weights on every rank
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
            paths.setdefault(part, []).append(str(training.save_weights(
                net, path, _gan_metadata(cfg, g, d, part, extra))))
        save_sample_grid(fake[:64], folder / f"{cfg.model}{'' if cfg.kind == 'binary' else '_grey'}_samples.png",
                         title=f"{cfg.model} ({cfg.kind}) samples after {epoch} epochs")
    training.plot_curves(out / "metrics.csv", out / "curves.png",
                         [("loss", ["loss_d", "loss_g"]), ("validation KMMD^2", ["val_kmmd2_unbiased"])],
                         title=f"{cfg.model} ({cfg.kind})")
    summary = {"weights": paths, **extra}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


# --------------------------------------------------------------------------------------------
# Training: the context generator
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ContextTrainConfig:
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
    seed: int = 0
    device: str = "auto"
    resume: bool = False
    max_minutes: float | None = None
    threads: int | None = None
    export: str | None = None
    progress: bool = True


def _context_batch(data: CropDataset, kind: str, rng: np.random.Generator, n: int, sim_fraction: float,
                   max_shift: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs (n, 7, 64, 64), truth (n, 1, 64, 64), hole (n, 1, 64, 64) for the context generator."""
    from SpineInpaintLib.inpainting import context_input, random_hole

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
    seed = training.seed_everything(cfg.seed)
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
            "training": _jsonable(cfg), "epochs_done": epoch, "seed": cfg.seed,
            "train_seconds": round(elapsed_before + time.perf_counter() - t0, 1),
            "metrics": {"validation (256 holes, 60 % simulated lesions)": val_metrics},
        }
        paths = []
        for folder in [out] + ([Path(cfg.export)] if cfg.export else []):
            paths.append(str(training.save_weights(net, folder / default_weights_path("context", cfg.kind).name, meta)))
            paths.append(str(training.save_weights(
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


# --------------------------------------------------------------------------------------------
# Command line: python -m SpineInpaintLib train gan
# --------------------------------------------------------------------------------------------
def run_train(args) -> int:
    """``train gan``: build the crop cache if needed, then train one GAN or the context generator."""
    from SpineInpaintLib import datasets

    model = str(args.model).lower()
    if model != "context":
        model = _check_model(model)
    kind = _check_kind(args.kind)
    if args.phantoms < 0 or args.epochs < 1 or args.iters_per_epoch < 1 or args.batch_size < 2:
        raise SpineInpaintError("--phantoms must be >= 0, --epochs and --iters-per-epoch >= 1, --batch-size >= 2")
    if args.threads:
        torch.set_num_threads(int(args.threads))
    seeds = [s for s in range(args.phantom_seed, args.phantom_seed + args.phantoms)
             if datasets.split_of(f"phantom_{s:04d}") != "test"]
    real = [r.strip() for r in args.real.split(",") if r.strip()]
    if seeds or real:
        build_crop_cache(Path(args.data), phantom_seeds=seeds, real=real, lesions_per_level=2,
                         progress=not args.quiet)
    out = args.out or f"runs/gan/{model}{'' if kind == 'binary' else '_grey'}"
    common = dict(kind=kind, data=args.data, out=out, epochs=args.epochs, iters_per_epoch=args.iters_per_epoch,
                  batch_size=args.batch_size, seed=args.seed, device=args.device, resume=not args.no_resume,
                  max_minutes=args.max_minutes, threads=args.threads, export=args.export, progress=not args.quiet)
    if model == "context":
        summary = train_context(ContextTrainConfig(width=args.width or 16, critic_width=args.critic_width or 8,
                                                   lr=args.lr or 3e-4, **common))
    else:
        summary = train_gan(GANTrainConfig(model=model, width=args.width, critic_width=args.critic_width,
                                           lr=args.lr, **common))
    if "weights" in summary:
        print(json.dumps({k: summary[k] for k in ("weights", "metrics", "train_seconds", "epochs_done")
                          if k in summary}, indent=2, default=str))
    return 0
