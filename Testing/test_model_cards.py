"""Model cards (docs/models): one per shipped model, and each metrics block is a fresh render of its weights' JSON."""

from pathlib import Path

import pytest

from SpineInpaintLib.core.weights import weights_dir
from SpineInpaintLib.evaluation import model_cards

CARDS_DIR = Path(__file__).resolve().parents[1] / "docs" / "models"
REGENERATE = "python -m SpineInpaintLib cards docs/models"


@pytest.mark.parametrize("card", sorted(model_cards.CARDS))
def test_card_metrics_block_is_the_fresh_render(card):
    path = CARDS_DIR / card
    assert path.exists(), f"missing model card {path}"
    block = model_cards.read_block(path.read_text())
    assert block is not None, f"{card} has no {model_cards.BEGIN} ... {model_cards.END} block"
    fresh = model_cards.render_block(weights_dir() / model_cards.CARDS[card])
    assert block == fresh, f"{card} is stale; run: {REGENERATE}"


def test_every_shipped_weights_file_has_a_card():
    root = weights_dir()
    shipped = {p.relative_to(root).as_posix() for p in root.rglob("*.safetensors")}
    assert shipped, f"no *.safetensors under {root}"
    covered = model_cards.covered_weights()
    assert sorted(shipped - set(covered)) == [], "shipped weights without a model card (add them to CARDS)"
    assert sorted(set(covered) - shipped) == [], "model cards for weights that are not shipped"


def test_cards_folder_holds_exactly_the_listed_cards():
    assert {p.name for p in CARDS_DIR.glob("*.md")} == set(model_cards.CARDS)


def test_update_card_replaces_only_the_block(tmp_path):
    weights_json = weights_dir() / model_cards.CARDS["vnet.md"]
    card = tmp_path / "vnet.md"
    head, tail = "# V-Net\n\nprose before\n\n", "\n\nprose after\n"
    card.write_text(f"{head}{model_cards.BEGIN}\nold figures\n{model_cards.END}{tail}")
    assert model_cards.update_card(card, weights_json) is True
    text = card.read_text()
    assert text.startswith(head) and text.endswith(tail)
    assert model_cards.read_block(text) == model_cards.render_block(weights_json)
    assert model_cards.update_card(card, weights_json) is False
    stale = model_cards.stale_cards(tmp_path)
    assert "vnet.md" not in stale and "unet.md" in stale  # fresh, and missing from tmp_path


def test_update_card_refuses_a_card_without_a_block(tmp_path):
    card = tmp_path / "unet.md"
    card.write_text("# no block\n")
    with pytest.raises(ValueError):
        model_cards.update_card(card, weights_dir() / model_cards.CARDS["unet.md"])


def test_metrics_table_renders_numbers_named_text_and_levels():
    table = model_cards.metrics_table({
        "evaluation": {"command": "python -m SpineInpaintLib evaluate x", "test": {"iou_3d": 0.912345, "cases": 6},
                       "in_training": True, "note": "left to the prose", "per_vertebra_dice": {"29": 0.9}},
        "training": {"lr": 0.001},
    })
    assert "| evaluation / command | `python -m SpineInpaintLib evaluate x` |" in table
    assert "| evaluation / test / iou_3d | 0.9123 |" in table
    assert "| evaluation / test / cases | 6 |" in table
    assert "| evaluation / in_training | yes |" in table
    assert "| evaluation / per_vertebra_dice / L3 (29) | 0.9 |" in table
    assert "left to the prose" not in table and "lr" not in table
    assert model_cards.metrics_table({"training": {}}) == "No metrics are recorded in this JSON.\n"
