"""The detection networks: MONAI RetinaNet (default) and the paper's torchvision Faster R-CNN VGG-16 baseline."""

from __future__ import annotations

import torch
from torchvision.ops import MultiScaleRoIAlign, RoIPool

from SpineInpaintLib import SpineInpaintError

__all__ = [
    "ARCHITECTURES", "BOX_LOSSES", "RETINANET_PRESETS", "build_retinanet", "check_box_loss", "build_faster_rcnn",
    "CROP_SIZE", "RETINANET_CONFIG", "FASTER_RCNN_CONFIG", "RoIPoolOnMap",
]


#: Side of the square crop fed to the detectors (pixels).
CROP_SIZE = 128

#: Detector architectures.
ARCHITECTURES = ("retinanet", "faster_rcnn")

#: Box-regression losses of RetinaNet training: smooth L1 on the encoded offsets (MONAI's default) or
#: generalised IoU on the decoded boxes (scale-free: a pixel off a 9-pixel box weighs as it does in AP).
BOX_LOSSES = ("smooth_l1", "giou")

# --- networks ---------------------------------------------------------------------------------------
#: RetinaNet configurations by name (the one used is recorded in the weights' metadata and rebuilt
#: from there on loading). "small": the first shipped detector (pyramid at strides 8, 16, 32);
#: "base": twice the depth and a stride-4 level for lesions of 5-10 mm.
RETINANET_PRESETS = {
    "small": {
        "block_inplanes": (24, 48, 96, 192),
        "layers": (1, 1, 1, 1),
        "returned_layers": (2, 3),
        "fpn_channels": 64,
        "feature_map_scales": (1, 2, 4),
        "base_anchor_shapes": ((14, 14), (10, 20), (20, 10)),
    },
    "base": {
        "block_inplanes": (32, 64, 128, 256),
        "layers": (2, 2, 2, 2),
        "returned_layers": (1, 2, 3),
        "fpn_channels": 64,
        "feature_map_scales": (1, 2, 4, 8),
        "base_anchor_shapes": ((8, 8), (6, 12), (12, 6)),
    },
}

#: The default RetinaNet configuration (new training).
RETINANET_CONFIG = RETINANET_PRESETS["base"]

#: Faster R-CNN configuration.
FASTER_RCNN_CONFIG = {
    "backbone": "vgg16_bn features up to conv5_3 (stride 16, 512 channels)",
    "anchor_sizes": (16, 32, 64),
    "aspect_ratios": (0.5, 1.0, 2.0),
    "roi_pool": "RoIPool 7x7, spatial scale 1/16",
    "representation_size": 1024,
}


def build_retinanet(in_channels: int = 3, *, config: dict | None = None, score_threshold: float = 0.02):
    """The MONAI 2D RetinaNet detector, untrained, of ``config`` (default :data:`RETINANET_CONFIG`)."""
    from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
    from monai.apps.detection.networks.retinanet_network import RetinaNet
    from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape
    from monai.networks.blocks.backbone_fpn_utils import BackboneWithFPN
    from monai.networks.nets import resnet

    cfg = _check_retinanet_config(config if config is not None else RETINANET_CONFIG)
    backbone = resnet.ResNet(block=resnet.ResNetBlock, layers=list(cfg["layers"]),
                             block_inplanes=list(cfg["block_inplanes"]), spatial_dims=2,
                             n_input_channels=in_channels, conv1_t_size=7, conv1_t_stride=2, num_classes=1)
    returned = list(cfg["returned_layers"])
    # MONAI's resnet_fpn_feature_extractor fixes the pyramid at 256 channels (too heavy for a CPU);
    # its BackboneWithFPN is the same extractor with our width.
    feature_extractor = BackboneWithFPN(
        backbone, {f"layer{k}": str(i) for i, k in enumerate(returned)},
        [cfg["block_inplanes"][k - 1] for k in returned], cfg["fpn_channels"], spatial_dims=2)
    anchors = AnchorGeneratorWithAnchorShape(feature_map_scales=cfg["feature_map_scales"],
                                             base_anchor_shapes=cfg["base_anchor_shapes"])
    # stride of the coarsest map (extra max-pool level): conv1 2 x max-pool 2 x 2 per returned layer.
    size_divisible = 2 * 2 * 2 ** max(returned)
    network = RetinaNet(spatial_dims=2, num_classes=1, num_anchors=anchors.num_anchors_per_location()[0],
                        feature_extractor=feature_extractor, size_divisible=size_divisible)
    detector = RetinaNetDetector(network, anchors, debug=False)
    detector.set_atss_matcher(num_candidates=4, center_in_gt=False)
    detector.set_hard_negative_sampler(batch_size_per_image=64, positive_fraction=0.3, pool_size=20,
                                       min_neg=16)
    detector.set_target_keys(box_key="boxes", label_key="labels")
    detector.set_box_selector_parameters(score_thresh=score_threshold, topk_candidates_per_level=300,
                                         nms_thresh=0.3, detections_per_img=20)
    _apply_box_loss(detector, "smooth_l1")
    return detector


def check_box_loss(arch: str, name: str) -> None:
    """Refuse a box-regression loss that is not in :data:`BOX_LOSSES` or not for ``arch``."""
    if name not in BOX_LOSSES:
        raise SpineInpaintError(f"unknown box loss '{name}' (use {' or '.join(BOX_LOSSES)})")
    if arch != "retinanet" and name != "smooth_l1":
        raise SpineInpaintError(f"--box-loss {name} is for RetinaNet; Faster R-CNN keeps torchvision's")


def _apply_box_loss(detector, name: str) -> None:
    """Set the box-regression loss ``name`` (:data:`BOX_LOSSES`) of a MONAI ``RetinaNetDetector``."""
    from monai.losses import BoxGIoULoss

    check_box_loss("retinanet", name)
    if name == "giou":
        detector.set_box_regression_loss(BoxGIoULoss(reduction="mean"), encode_gt=False, decode_pred=True)
    else:
        detector.set_box_regression_loss(torch.nn.SmoothL1Loss(beta=1.0 / 9, reduction="mean"), encode_gt=True,
                                         decode_pred=False)


def _check_retinanet_config(config: dict) -> dict:
    keys = set(RETINANET_PRESETS["small"])
    if not isinstance(config, dict) or set(config) != keys:
        raise SpineInpaintError(f"RetinaNet configuration must have exactly the keys {sorted(keys)}")
    if len(config["feature_map_scales"]) != len(config["returned_layers"]) + 1:
        raise SpineInpaintError("RetinaNet configuration: one feature map scale per returned layer, plus one")
    return config


class RoIPoolOnMap(MultiScaleRoIAlign):
    """The paper's RoI pooling (:class:`torchvision.ops.RoIPool`, max pooling) on the single conv5_3 map.

    ``FasterRCNN`` accepts only a :class:`~torchvision.ops.MultiScaleRoIAlign` as its box pooler and
    calls it as ``pool(features, proposals, image_shapes)``; this subclass keeps that interface and
    replaces the RoIAlign sampling by RoI max pooling at the backbone's fixed stride.
    """

    def __init__(self, output_size: int = 7, spatial_scale: float = 1.0 / 16):
        super().__init__(["0"], output_size, sampling_ratio=2)
        self.roi_pool = RoIPool(output_size, spatial_scale)

    def forward(self, x, boxes, image_shapes):  # noqa: D102 (the parent's signature)
        return self.roi_pool(x["0"], boxes)


def build_faster_rcnn(in_channels: int = 3, *, score_threshold: float = 0.02, size: int = CROP_SIZE):
    """torchvision Faster R-CNN with a VGG-16 (batch-normalised) backbone, untrained (no downloads)."""
    import torchvision
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

    cfg = FASTER_RCNN_CONFIG
    vgg = torchvision.models.vgg16_bn(weights=None)
    features = vgg.features[:-1]  # drop the last max-pool: conv5_3 at stride 16
    if in_channels != 3:
        first = features[0]
        features[0] = torch.nn.Conv2d(in_channels, first.out_channels, 3, padding=1)
    features.out_channels = 512
    anchors = AnchorGenerator(sizes=(cfg["anchor_sizes"],), aspect_ratios=(cfg["aspect_ratios"],))
    head = TwoMLPHead(512 * 7 * 7, cfg["representation_size"])
    predictor = FastRCNNPredictor(cfg["representation_size"], 2)
    return FasterRCNN(
        features, num_classes=None, min_size=size, max_size=size,
        image_mean=[0.5] * in_channels, image_std=[0.25] * in_channels,
        rpn_anchor_generator=anchors, box_roi_pool=RoIPoolOnMap(7, 1.0 / 16), box_head=head,
        box_predictor=predictor,
        rpn_pre_nms_top_n_train=600, rpn_post_nms_top_n_train=300, rpn_pre_nms_top_n_test=300,
        rpn_post_nms_top_n_test=100, rpn_batch_size_per_image=128, box_batch_size_per_image=64,
        box_score_thresh=score_threshold, box_nms_thresh=0.3, box_detections_per_img=20,
    )
