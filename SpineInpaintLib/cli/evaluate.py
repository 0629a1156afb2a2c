"""``evaluate <stage>``: the evaluators' arguments, and the runs that print their tables and write their figures."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from SpineInpaintLib.cli.stages import lazy
from SpineInpaintLib.core.weights import weights_dir

__all__ = ["EVALUATORS"]


def _add_evaluate_segmentation(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nets", default="unet,vnet", help="networks to evaluate, comma-separated (default both)")
    parser.add_argument("--weights-dir", default=str(weights_dir("segmentation")),
                        help="folder of <net>.safetensors + <net>.json (default: the shipped weights)")
    parser.add_argument("--cases", type=int, default=None,
                        help="evaluate at most this many held-out test phantoms (default: all of them; 0: none)")
    parser.add_argument("--real", default="left-out",
                        help="real scans to score: 'left-out' (default: every labelled scan the networks were not "
                        "trained on), names from the registry, comma-separated, or '' for none")
    parser.add_argument("--seen-ok", action="store_true",
                        help="allow named real scans the model was trained on (a fit measurement, marked as such)")
    parser.add_argument("--json", help="also write every number to this JSON file")
    parser.add_argument("--threads", type=int, help="torch CPU threads")


def _add_evaluate_detection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--retinanet",
                        help="RetinaNet weights (default: the shipped SpineInpaintLib/weights/detection/retinanet.safetensors)")
    parser.add_argument("--faster-rcnn", default="runs/detection/faster_rcnn/best.safetensors",
                        help="Faster R-CNN baseline weights "
                        "(default runs/detection/faster_rcnn/best.safetensors)")
    parser.add_argument("--compare", help="another RetinaNet's weights (e.g. the ones a new model would replace), "
                        "evaluated beside on the same slices")
    parser.add_argument("--phantoms", type=int, default=15, help="lesioned test phantoms (default 15)")
    parser.add_argument("--real", type=int, default=9, help="test lesions simulated on each real scan (default 9)")
    parser.add_argument("--real-scans", default="left-out",
                        help="real scans for the lesions and the healthy real volumes: 'left-out' (default: every "
                        "labelled scan the detector was not trained on) or names, comma-separated")
    parser.add_argument("--seen-ok", action="store_true",
                        help="allow named real scans the model was trained on (a fit measurement, marked as such)")
    parser.add_argument("--healthy-phantoms", type=int, default=4, help="healthy test phantoms (default 4)")
    parser.add_argument("--simulator", default="both", choices=("classic", "focal", "both"),
                        help="lesion simulator of the test lesions: classic, focal or both (one per case, "
                        "reported apart; default)")
    parser.add_argument("--deeplesion", help="also score the test-split bone lesions of this DeepLesion-format folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-volume", action="store_true", help="skip the volume-level evaluation")
    parser.add_argument("--tune", action="store_true",
                        help="tune RetinaNet's volume-level thresholds on the validation volumes first "
                        "(else those in its weights' JSON)")
    parser.add_argument("--save-thresholds", action="store_true",
                        help="with --tune: write the tuned thresholds into the RetinaNet weights' JSON")
    parser.add_argument("--figures",
                        help="write detection_froc.png and detection_examples.png here (e.g. docs)")
    parser.add_argument("--json", help="also write every number to this JSON file")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_evaluate_inpainting(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--methods", default="context,wgan-gp,dcgan,pggan,biharmonic,nearest",
                        help="methods to compare, comma-separated")
    parser.add_argument("--phantoms", type=int, default=6, help="held-out test phantoms (default 6)")
    parser.add_argument("--lesions-per-case", type=int, default=2,
                        help="simulated lesions per phantom: alternately destructive and intact cortex (default 2)")
    parser.add_argument("--real", type=int, default=2, help="lesions simulated on each real scan (default 2)")
    parser.add_argument("--real-scans", default="left-out",
                        help="real scans for those lesions: 'left-out' (default: every labelled scan the GANs were "
                        "not trained on) or names, comma-separated")
    parser.add_argument("--seen-ok", action="store_true",
                        help="allow named real scans the model was trained on (a fit measurement, marked as such)")
    parser.add_argument("--simulators", default="classic,focal",
                        help="lesion simulators of the test lesions, comma-separated (classic, focal; reported apart)")
    parser.add_argument("--grey", action="store_true", help="also restore the CT (MAE/PSNR/SSIM inside the lesion)")
    parser.add_argument("--steps", type=int, default=100, help="z-optimisation steps (default 100)")
    parser.add_argument("--restarts", type=int, default=2, help="z restarts per slice (default 2)")
    parser.add_argument("--figure6", default="context,wgan-gp,dcgan,pggan",
                        help="methods of the Figure 6 check (16x16 holes on healthy crops), comma-separated")
    parser.add_argument("--cache", default="runs/inpainting_eval",
                        help="folder that keeps the generated test lesions for the next run ('' for none)")
    parser.add_argument("--weights-dir", help="folder of the weights (default SpineInpaintLib/weights/gan)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--figures", help="write inpainting_*.png here (e.g. docs)")
    parser.add_argument("--json", help="also write every number to this JSON file")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


#: stage -> (one-line help, add-arguments function, run function) of ``evaluate <stage>``.
def _add_evaluate_restore(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--case", default="s0009",
                        help="real scan to put the lesion in, one the shipped models were not trained on (default "
                        "s0009; 'python -m SpineInpaintLib scans' lists the registry)")
    parser.add_argument("--seen-ok", action="store_true",
                        help="allow named real scans the model was trained on (a fit measurement, marked as such)")
    parser.add_argument("--level", default="L3", help="lesioned vertebra (default L3)")
    parser.add_argument("--seeds", default="1,2,3", help="lesion seeds, comma-separated")
    parser.add_argument("--methods", default="context,biharmonic", help="inpainting methods, comma-separated")
    parser.add_argument("--simulators", default="classic,focal",
                        help="lesion simulators, comma-separated: classic (lytic blob), focal (soft-tissue mass)")
    parser.add_argument("--json", help="also write the rows as JSON here")


EVALUATORS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "restore": ("the whole pipeline on a real scan with simulated destructive lytic lesions: Dice, HD95 and "
                "volume error of the restored vertebra against its healthy label", _add_evaluate_restore,
                lazy("SpineInpaintLib.cli.evaluate_run", "run_evaluate_restore")),
    "segmentation": ("the paper's Table I for U-Net and V-Net, 3D Dice and HD95 per vertebra on held-out cases",
                     _add_evaluate_segmentation, lazy("SpineInpaintLib.cli.evaluate_run", "run_evaluate_segmentation")),
    "detection": ("RetinaNet and Faster R-CNN side by side on held-out slices: AP, FROC, images/s, "
                  "the paper's row",
                  _add_evaluate_detection, lazy("SpineInpaintLib.cli.evaluate_run", "run_evaluate_detection")),
    "inpainting": ("GAN inpainting vs biharmonic and nearest-slice on held-out lesions: Dice, HD95, KMMD, s/slice, "
                   "the paper's Figure 6 check", _add_evaluate_inpainting, lazy("SpineInpaintLib.cli.evaluate_run", "run_evaluate_inpainting")),
}
