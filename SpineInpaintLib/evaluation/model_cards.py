"""Model cards (``docs/models/<name>.md``): their metrics blocks are rendered from the weights' JSON.

Each card holds one block between :data:`BEGIN` and :data:`END` that is generated, never typed: a
Markdown table of the metrics recorded in the JSON beside the shipped weights. When new weights ship
with a new JSON, :func:`update_card` rewrites the block, and a test fails while any card is stale.
So the figures in a card always match the weights they describe.

Regenerate every card from a clone::

    .venv/bin/python -m SpineInpaintLib cards docs/models          # rewrite stale blocks
    .venv/bin/python -m SpineInpaintLib cards docs/models --check  # exit 1 if any is stale
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from SpineInpaintLib.core.labels import VERTEBRA_NAMES
from SpineInpaintLib.core.weights import weights_dir

__all__ = [
    "BEGIN",
    "CARDS",
    "END",
    "EVALUATIONS",
    "METRIC_SECTIONS",
    "SHIPPED_DETECTOR",
    "TEXT_KEYS",
    "covered_weights",
    "detection_table",
    "metrics_table",
    "read_block",
    "render_block",
    "stale_cards",
    "update_card",
]

#: The markers around a card's generated metrics block.
BEGIN = "<!-- metrics: begin -->"
END = "<!-- metrics: end -->"

#: Card file name -> the weights' JSON it is rendered from, relative to :func:`weights_dir`.
CARDS: dict[str, str] = {
    "vnet.md": "segmentation/vnet.json",
    "unet.md": "segmentation/unet.json",
    "retinanet.md": "detection/retinanet.json",
    "context.md": "gan/context_generator.json",
    "context_grey.md": "gan/context_grey_generator.json",
    "wgan-gp.md": "gan/wgan-gp_generator.json",
    "wgan-gp_grey.md": "gan/wgan-gp_grey_generator.json",
    "dcgan.md": "gan/dcgan_generator.json",
    "pggan.md": "gan/pggan_generator.json",
}

#: Weights' JSON -> a record of held-out test runs beside it, rendered into the same card (relative to
#: :func:`weights_dir`). The detector's test-set figures live there, not in ``retinanet.json``.
EVALUATIONS: dict[str, str] = {"detection/retinanet.json": "detection/evaluation.json"}

#: The shipped detector's name in ``evaluation.json`` (the other entries are the weights it replaced).
SHIPPED_DETECTOR = "RetinaNet (MONAI, ours)"

#: Top-level JSON sections that hold measured figures, in the order they are rendered.
METRIC_SECTIONS: tuple[str, ...] = ("evaluation", "metrics", "metrics_last_epoch", "volume_level")

#: Text leaves that are rendered (the command that measured the figures, what the labels are, which
#: weights were scored); other text (case lists, long notes) is left to the card's prose.
TEXT_KEYS: frozenset[str] = frozenset({"command", "labels", "weights"})


def _format_value(value: object, key: str) -> str | None:
    """One table cell, or None for a leaf that is not rendered."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, str) and key in TEXT_KEYS:
        return f"`{value}`" if key == "command" else value
    return None


def _format_key(key: str, parent: str) -> str:
    """A key as the table shows it: vertebra ids under a ``per_vertebra`` key get their level name."""
    if "per_vertebra" in parent and key.isdigit() and int(key) in VERTEBRA_NAMES:
        return f"{VERTEBRA_NAMES[int(key)]} ({key})"
    return key


def _rows(node: object, path: tuple[str, ...], key: str = "") -> list[tuple[str, str]]:
    """Depth-first (metric path, cell) pairs of the rendered leaves under ``node``, in JSON order."""
    if isinstance(node, dict):
        rows: list[tuple[str, str]] = []
        for child, value in node.items():
            rows.extend(_rows(value, path + (_format_key(str(child), key),), str(child)))
        return rows
    if isinstance(node, list):
        return []
    cell = _format_value(node, key)
    return [] if cell is None else [(" / ".join(path), cell)]


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def metrics_table(metadata: dict) -> str:
    """Render the measured figures of a weights' JSON metadata as a Markdown table.

    Parameters
    ----------
    metadata
        The parsed JSON beside a ``*.safetensors`` file. Its sections named in
        :data:`METRIC_SECTIONS` are flattened; numbers and booleans are rendered, and text only
        under the keys of :data:`TEXT_KEYS`.

    Returns
    -------
    str
        A two-column table (``metric``: the JSON path joined by `` / ``; ``value``: floats to four
        significant digits), ending with a newline; a one-line note when the JSON records no metric.
    """
    rows: list[tuple[str, str]] = []
    for section in METRIC_SECTIONS:
        if section in metadata:
            rows.extend(_rows(metadata[section], (section,), section))
    if not rows:
        return "No metrics are recorded in this JSON.\n"
    lines = ["| metric (JSON path) | value |", "|---|---|"]
    lines += [f"| {_escape(key)} | {_escape(cell)} |" for key, cell in rows]
    return "\n".join(lines) + "\n"


def _cell(value: object) -> str:
    cell = _format_value(value, "")
    return "—" if cell is None else cell


#: Groups of ``evaluation.json`` shown as columns, with their headers.
_GROUPS = {"type=lytic": "lytic", "type=mixed": "mixed", "type=sclerotic": "sclerotic",
           "destructive": "destructive", "intact cortex": "intact cortex", "source=phantom": "phantoms",
           "source=real": "real anatomy"}


def detection_table(record: dict, detector: str = SHIPPED_DETECTOR) -> str:
    """Render the shipped detector's held-out figures of ``evaluation.json`` as Markdown tables.

    Parameters
    ----------
    record
        The parsed ``evaluation.json`` written by ``evaluate detection``: the usual test set at the top
        level, and a ``larger_test_set`` entry of the same form when it was run.
    detector
        The detector's key under ``detectors``.

    Returns
    -------
    str
        A slice-level table (AP@0.5, AP@0.5:0.95, FROC, AP@0.5 per group, images/s), a volume-level
        table (lesioned volumes found, false lesions per volume, lesion-mask Dice) and the command of
        each test set, ending with a newline.
    """
    sets = [("usual", record)]
    if "larger_test_set" in record:
        sets.append(("larger", record["larger_test_set"]))
    head = ("| test set | slices (lesion boxes) | AP@0.5 | AP@0.5:0.95 | FROC @0.5/1/2/4 FP | "
            + " | ".join(f"AP@0.5 {name}" for name in _GROUPS.values()) + " | images/s |")
    lines = [head, "|---" * (6 + len(_GROUPS)) + "|"]
    volume = [("| test set | share of lesioned volumes found | false lesions per lesioned volume | "
               "false lesions per healthy volume (healthy volumes) | lesion-mask Dice in the vertebra |"),
              "|---|---|---|---|---|"]
    commands = []
    for name, entry in sets:
        scores = entry.get("detectors", {}).get(detector)
        if scores is None:
            continue
        groups = scores.get("groups", {})
        froc = " / ".join(_cell(scores.get(f"froc@{fp}")) for fp in ("0.5", "1", "2", "4"))
        cells = [name, f"{_cell(entry.get('slices'))} ({_cell(scores.get('lesion_boxes'))})",
                 _cell(scores.get("ap50")), _cell(scores.get("ap50_95")), froc]
        cells += [_cell(groups.get(group, {}).get("ap50")) for group in _GROUPS]
        cells.append(_cell(scores.get("images_per_s")))
        lines.append("| " + " | ".join(_escape(c) for c in cells) + " |")
        level = entry.get("volume_level", {})
        if level:
            volume.append("| " + " | ".join(_escape(c) for c in (
                name, _cell(level.get("sensitivity")), _cell(level.get("fp_per_lesioned_volume")),
                f"{_cell(level.get('fp_per_healthy_volume'))} ({_cell(level.get('healthy_volumes'))})",
                _cell(level.get("mean_mask_dice_in_vertebra")))) + " |")
        if "command" in entry:
            commands.append(f"- {name} test set: `{entry['command']}`")
    text = "\n".join(lines) + "\n"
    if len(volume) > 2:
        text += "\n" + "\n".join(volume) + "\n"
    if commands:
        text += "\nMeasured with:\n\n" + "\n".join(commands) + "\n"
    return text


def render_block(weights_json: Path) -> str:
    """The whole generated block of a card, markers included, for the weights' JSON at ``weights_json``.

    Parameters
    ----------
    weights_json
        Path of the JSON beside the weights (e.g. ``weights_dir() / "segmentation/vnet.json"``).

    Returns
    -------
    str
        :data:`BEGIN`, a line naming the JSON, the weights file and the start of its sha256, the
        :func:`metrics_table`, the :func:`detection_table` of its record in :data:`EVALUATIONS` if any,
        and :data:`END`.
    """
    weights_json = Path(weights_json)
    metadata = json.loads(weights_json.read_text())
    source = f"{weights_json.parent.name}/{weights_json.name}"
    weights = weights_json.with_suffix(".safetensors").name
    sha = str(metadata.get("sha256", ""))[:12]
    origin = (f"*Rendered from `SpineInpaintLib/weights/{source}` (weights `{weights}`, sha256 `{sha}...`) by "
              "`python -m SpineInpaintLib cards`; do not edit by hand.*")
    text = f"{BEGIN}\n{origin}\n\n{metrics_table(metadata)}"
    if source in EVALUATIONS:
        record_path = weights_json.parent.parent / EVALUATIONS[source]
        record = json.loads(record_path.read_text())
        text += (f"\nHeld-out test sets (`SpineInpaintLib/weights/{EVALUATIONS[source]}`, "
                 f"detector `{SHIPPED_DETECTOR}`):\n\n{detection_table(record)}")
    return f"{text}{END}"


def read_block(text: str) -> str | None:
    """The generated block of a card's text, markers included, or None when the card has none.

    Raises
    ------
    ValueError
        When the markers are there but out of order or repeated.
    """
    if BEGIN not in text and END not in text:
        return None
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"a model card needs exactly one '{BEGIN}' followed by one '{END}'")
    start = text.index(BEGIN)
    return text[start:text.index(END) + len(END)]


def update_card(card: Path, weights_json: Path) -> bool:
    """Replace the metrics block of ``card`` with a fresh render of ``weights_json``.

    Parameters
    ----------
    card
        A model card (Markdown) holding one block between :data:`BEGIN` and :data:`END`.
    weights_json
        The JSON beside the weights the card describes.

    Returns
    -------
    bool
        True when the block changed and the card was rewritten; False when it was already fresh.

    Raises
    ------
    ValueError
        When the card has no block, or malformed markers.
    """
    card = Path(card)
    text = card.read_text()
    old = read_block(text)
    if old is None:
        raise ValueError(f"{card} has no '{BEGIN}' ... '{END}' block")
    new = render_block(weights_json)
    if old == new:
        return False
    card.write_text(text.replace(old, new))
    return True


def covered_weights() -> dict[str, str]:
    """Every weights file the cards describe: path relative to :func:`weights_dir` -> card name.

    A GAN's card covers its generator and its critic (``*_generator`` and ``*_critic``), since the
    two are trained together and the critic is used only with its generator.
    """
    covered: dict[str, str] = {}
    for card, rel in CARDS.items():
        stem = Path(rel).with_suffix("")
        covered[str(stem.with_suffix(".safetensors"))] = card
        if stem.name.endswith("_generator"):
            critic = stem.with_name(stem.name[: -len("_generator")] + "_critic")
            covered[str(critic.with_suffix(".safetensors"))] = card
    return covered


def stale_cards(cards_dir: Path, root: Path | None = None) -> list[str]:
    """Names of the cards in :data:`CARDS` whose metrics block differs from a fresh render (or is missing).

    Parameters
    ----------
    cards_dir
        The folder of the cards (``docs/models`` in a clone).
    root
        The weights folder; default :func:`weights_dir` (honours ``$SPINEINPAINT_WEIGHTS``).
    """
    root = weights_dir() if root is None else Path(root)
    stale = []
    for name, rel in CARDS.items():
        card = Path(cards_dir) / name
        if not card.exists() or read_block(card.read_text()) != render_block(root / rel):
            stale.append(name)
    return stale
