"""Render the module panel (SpineInpaint.ui) to a PNG for the README, outside Slicer.

Needs PySide6, which is not a dependency of the project (Slicer brings its own Qt)::

    python -m venv /tmp/qt && /tmp/qt/bin/pip install PySide6-Essentials
    QT_QPA_PLATFORM=offscreen /tmp/qt/bin/python experiments/render_panel.py docs/slicer_panel.png

Qt's form loader builds the .ui exactly as Slicer does; Slicer's own widgets (CTK collapsible
buttons, MRML node selectors, the directory button) are not available here and are drawn by small
stand-ins with the same text, filled with example node names.
"""

from __future__ import annotations

import sys
from pathlib import Path

from PySide6.QtCore import Property, QFile
from PySide6.QtUiTools import QUiLoader
from PySide6.QtWidgets import QApplication, QComboBox, QGroupBox, QPushButton, QWidget

UI_FILE = Path(__file__).resolve().parents[1] / "SpineInpaint" / "Resources" / "UI" / "SpineInpaint.ui"
#: Example nodes shown in the node selectors, by widget name.
EXAMPLE_NODES = {
    "inputVolumeSelector": "CT (spine, L3 lesion)",
    "segmentationSelector": "CT segmentation",
    "restoredVolumeSelector": "CT restored",
}


class ctkCollapsibleButton(QGroupBox):  # noqa: N801  (the class name the .ui asks for)
    def _get_text(self) -> str:
        return self.title()

    def _set_text(self, value: str) -> None:
        self.setTitle("\u25bc " + value)

    text = Property(str, _get_text, _set_text)


class qMRMLNodeComboBox(QComboBox):  # noqa: N801
    pass


class ctkDirectoryButton(QPushButton):  # noqa: N801
    def __init__(self, parent=None):
        super().__init__("/home/planner/prosthesis/case-017 ...", parent)


class qMRMLWidget(QWidget):  # noqa: N801
    pass


def render(out: Path) -> Path:
    app = QApplication.instance() or QApplication(sys.argv[:1])
    loader = QUiLoader()
    for cls in (ctkCollapsibleButton, qMRMLNodeComboBox, ctkDirectoryButton, qMRMLWidget):
        loader.registerCustomWidget(cls)
    handle = QFile(str(UI_FILE))
    handle.open(QFile.ReadOnly)
    panel = loader.load(handle)
    handle.close()
    for name, node in EXAMPLE_NODES.items():
        combo = panel.findChild(QComboBox, name)
        if combo is not None:
            combo.addItem(node)
    panel.resize(380, panel.sizeHint().height())
    panel.show()
    app.processEvents()
    out.parent.mkdir(parents=True, exist_ok=True)
    if not panel.grab().save(str(out)):
        raise SystemExit(f"could not write {out}")
    return out


if __name__ == "__main__":
    print(render(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/slicer_panel.png")))
