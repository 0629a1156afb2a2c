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

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from SpineInpaintLib import SpineInpaintError
from SpineInpaintLib.core.weights import (
    load_weights,
    read_weights_metadata,
    weights_dir,
)

__all__ = [
    "GAN_MODELS", "KINDS", "LATENT_DIM", "RESOURCES", "count_parameters", "WGANGenerator", "WGANCritic",
    "DCGANGenerator", "DCGANDiscriminator", "PGGANGenerator", "PGGANDiscriminator", "ContextGenerator", "build_gan",
    "default_weights_path", "load_gan", "load_context", "SIZE", "CONTEXT_CHANNELS", "sample",
]

#: The paper's three GANs.
GAN_MODELS: tuple[str, ...] = ("wgan-gp", "dcgan", "pggan")

#: Image kinds: the paper's binary spine masks, and grayscale CT (our addition).
KINDS: tuple[str, ...] = ("binary", "grey")

#: Size of the latent vector z (Gulrajani et al.'s 128).
LATENT_DIM = 128

#: Shipped weights and their metadata.
RESOURCES = weights_dir("gan")

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
    """``weights/gan/<model>[_grey]_<part>.safetensors`` (part: generator, critic; context: model)."""
    kind = _check_kind(kind)
    suffix = "" if kind == "binary" else "_grey"
    return RESOURCES / f"{model}{suffix}_{part}.safetensors"


def load_gan(model: str = "wgan-gp", kind: str = "binary", directory: Path | None = None) -> tuple[nn.Module, nn.Module, dict]:
    """The shipped (or ``directory``'s) generator and critic in eval mode, and the generator's metadata."""
    model = _check_model(model)
    paths = [default_weights_path(model, kind, part) for part in ("generator", "critic")]
    if directory is not None:
        paths = [Path(directory) / p.name for p in paths]
    meta = read_weights_metadata(paths[0]) if paths[0].exists() else None
    if meta is None:
        raise SpineInpaintError(f"no {kind} {model} weights at {paths[0]} (train them: python -m SpineInpaintLib "
                                f"train gan --model {model} --kind {kind})")
    arch = meta["architecture"]
    g, d = build_gan(model, arch["width"], arch["latent_dim"], arch.get("critic_width"))
    load_weights(g, paths[0])
    load_weights(d, paths[1])
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
    meta = read_weights_metadata(path)
    net = ContextGenerator(meta["architecture"]["width"])
    load_weights(net, path)
    return net.eval(), meta


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
