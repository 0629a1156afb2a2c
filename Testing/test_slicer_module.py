"""The Slicer module shell, checked without Slicer: .ui widget names, CMake lists, catalog entry,
icon, licence, the background-process helpers and the batch script."""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import py_compile
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "SpineInpaint"
MODULE_FILE = MODULE_DIR / "SpineInpaint.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "SpineInpaint.ui"
BATCH_FILE = MODULE_DIR / "Scripts" / "batch.py"


def load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def steps():
    sys.path.insert(0, str(MODULE_DIR))
    try:
        from SpineInpaintModuleLib import steps as module
    finally:
        sys.path.remove(str(MODULE_DIR))
    return module


@pytest.fixture(scope="module")
def ui_widgets() -> dict[str, ET.Element]:
    root = ET.parse(UI_FILE).getroot()
    return {w.get("name"): w for w in root.iter("widget")}


def ui_property(widget: ET.Element, name: str) -> str | None:
    for prop in widget.findall("property"):
        if prop.get("name") == name:
            leaf = next(iter(prop))
            if leaf.tag == "stringlist":
                return " ".join(item.text for item in leaf.findall("string"))
            return leaf.text
    return None


def module_ast() -> ast.Module:
    return ast.parse(MODULE_FILE.read_text())


def class_node(name: str) -> ast.ClassDef:
    for node in module_ast().body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node
    raise AssertionError(f"class {name} not found in SpineInpaint.py")


# --- the module file and its .ui -----------------------------------------------------------------
@pytest.mark.parametrize("path", [MODULE_FILE, BATCH_FILE, MODULE_DIR / "SpineInpaintModuleLib" / "steps.py",
                                  MODULE_DIR / "SpineInpaintModuleLib" / "runner.py"],
                         ids=lambda p: p.name)
def test_python_files_compile(path, tmp_path):
    py_compile.compile(str(path), cfile=str(tmp_path / "out.pyc"), doraise=True)


def test_every_widget_the_module_uses_is_in_the_ui(ui_widgets):
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_FILE.read_text()))
    assert {"segmentSpineButton", "detectLesionsButton", "restoreButton", "exportStlButton", "cancelButton",
            "progressBar", "statusLabel"} <= used
    missing = sorted(used - set(ui_widgets))
    assert not missing, f"SpineInpaint.py uses widgets the .ui lacks: {missing}"


def test_ui_has_the_panel_of_the_issue(ui_widgets):
    root = ET.parse(UI_FILE).getroot()
    assert root.find("widget").get("class") == "qMRMLWidget"
    classes = {name: w.get("class") for name, w in ui_widgets.items()}
    assert classes["inputVolumeSelector"] == classes["segmentationSelector"] == "qMRMLNodeComboBox"
    assert classes["methodComboBox"] == classes["deviceComboBox"] == "QComboBox"
    assert classes["progressBar"] == "QProgressBar" and classes["statusLabel"] == "QLabel"
    assert sum(c == "ctkCollapsibleButton" for c in classes.values()) >= 3
    texts = {ui_property(w, "text"): name for name, w in ui_widgets.items()
             if w.get("class") == "QPushButton"}
    for text in ("Segment spine", "Detect lesions", "Restore", "Export STL", "Cancel"):
        assert text in texts, f"no button '{text}'"
    assert ui_property(ui_widgets["inputVolumeSelector"], "nodeTypes") == "vtkMRMLScalarVolumeNode"
    assert ui_property(ui_widgets["segmentationSelector"], "nodeTypes") == "vtkMRMLSegmentationNode"


def test_ui_parameter_names_match_the_parameter_node(ui_widgets):
    fields = {item.target.id for item in class_node("SpineInpaintParameterNode").body
              if isinstance(item, ast.AnnAssign)}
    bound = {ui_property(w, "SlicerParameterName") for w in ui_widgets.values()} - {None}
    assert bound == fields, f"widgets bound {sorted(bound)}, parameters {sorted(fields)}"


def test_combo_items_match_the_enum_labels(ui_widgets):
    for combo, enum_name in (("methodComboBox", "Method"), ("deviceComboBox", "Device"),
                             ("segmentationNetworkComboBox", "SegmentationNetwork")):
        values = [item.value.value for item in class_node(enum_name).body if isinstance(item, ast.Assign)]
        items = [i.find("property/string").text for i in ui_widgets[combo].findall("item")]
        assert items == values


def test_module_has_the_four_classes_and_slicer_style():
    names = {n.name for n in module_ast().body if isinstance(n, ast.ClassDef)}
    assert {"SpineInpaint", "SpineInpaintWidget", "SpineInpaintLogic", "SpineInpaintTest"} <= names
    text = MODULE_FILE.read_text()
    assert "@parameterNodeWrapper" in text and "tryWithErrorDisplay" in text
    assert "slicer.util.pip_install" in text and "PyTorchUtils" in text
    # Slicer ships vtk and SimpleITK: the module must never pip-install them.
    assert not re.search(r"pip_install\([^)]*(vtk|SimpleITK)", text, re.IGNORECASE)


# --- CMake, catalog entry, icon, licence ---------------------------------------------------------
def cmake_list(text: str, variable: str, module_name: str) -> list[str]:
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert match, f"{variable} not set"
    return [entry.replace("${MODULE_NAME}", module_name) for entry in match.group(1).split()]


def test_module_cmake_lists_every_script_and_resource():
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    name = re.search(r"set\(MODULE_NAME\s+(\w+)\)", text).group(1)
    assert name == "SpineInpaint"
    scripts = cmake_list(text, "MODULE_PYTHON_SCRIPTS", name)
    resources = cmake_list(text, "MODULE_PYTHON_RESOURCES", name)
    listed = set(scripts) | set(resources)
    present = {
        p.relative_to(MODULE_DIR).as_posix() for p in MODULE_DIR.rglob("*")
        if p.is_file() and p.name != "CMakeLists.txt" and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }
    assert present - listed == set(), f"files not listed in CMake: {sorted(present - listed)}"
    assert listed - present == set(), f"listed files that do not exist: {sorted(listed - present)}"
    assert "slicerMacroBuildScriptedModule" in text
    assert re.search(r"slicer_add_python_unittest\(SCRIPT \$\{MODULE_NAME\}\.py\)", text)


def test_the_extension_ships_the_weights_where_the_library_looks_for_them():
    # CMake copies the inference modules and SpineInpaintLib/weights/**/*.{safetensors,json} into the
    # scripted-modules folder; the library resolves every weight file as SpineInpaintLib/weights/<stage>/.
    from SpineInpaintLib import detection, segmentation
    from SpineInpaintLib.inpainting import networks as gan

    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    assert "${_library_source_dir}/SpineInpaintLib/pipeline.py" in text
    assert ("${_library_source_dir}/SpineInpaintLib/weights/*.safetensors" in text
            and "${_library_source_dir}/SpineInpaintLib/weights/*.json" in text)
    library_parent = REPO
    for path in (segmentation.default_weights("unet"), segmentation.default_weights("vnet"),
                 detection.DEFAULT_WEIGHTS, gan.default_weights_path("wgan-gp", "binary", "generator"),
                 gan.default_weights_path("context", "grey", "generator")):
        assert path.is_file(), path
        assert path.relative_to(library_parent).parts[:2] == ("SpineInpaintLib", "weights"), path
        assert path.with_suffix(".json").is_file(), path
        assert path.stat().st_size < 40 * 2**20, path


def test_extension_cmake_and_catalog_entry_agree():
    text = (REPO / "CMakeLists.txt").read_text()
    meta = dict(re.findall(r'set\((EXTENSION_\w+) "([^"]*)"\)', text))
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_DEPENDS"):
        assert key in meta, key
    assert "add_subdirectory(SpineInpaint)" in text
    assert "${Slicer_EXTENSION_GENERATE_CONFIG}" in text and "${Slicer_EXTENSION_CPACK}" in text
    entry = json.loads((REPO / "SpineInpaint.json").read_text())
    allowed = {"$schema", "build_dependencies", "build_subdirectory", "category", "scm_revision", "scm_type",
               "scm_url", "tier"}
    assert set(entry) <= allowed and {"$schema", "category", "scm_url"} <= set(entry)
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.1.json#")
    assert entry["category"] == meta["EXTENSION_CATEGORY"]
    assert entry["build_dependencies"] == meta["EXTENSION_DEPENDS"].split()
    assert entry["scm_url"].startswith("https://")


def test_icon_is_a_128_pixel_png():
    import numpy as np
    from PIL import Image

    with Image.open(MODULE_DIR / "Resources" / "Icons" / "SpineInpaint.png") as icon:
        assert icon.format == "PNG" and icon.size == (128, 128)
        alpha = np.asarray(icon.convert("RGBA"))[..., 3]
    assert 0.2 < (alpha > 0).mean() < 0.9  # a shape on a transparent ground, not a filled square


def test_licence_is_apache_2():
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert "Copyright 2026 SpineInpaint contributors" in text


# --- steps: commands, progress, background process -----------------------------------------------
def contract_restore_parser(parser: argparse.ArgumentParser) -> None:
    """The 'restore' arguments of the command-line contract (README, Command line), plus --method."""
    parser.add_argument("ct")
    parser.add_argument("--out", required=True)
    parser.add_argument("--lesion-mask")
    parser.add_argument("--device", choices=["cpu", "cuda"])
    parser.add_argument("--method", choices=["context", "wgan-gp", "dcgan", "pggan", "biharmonic"])


def test_steps_missing_from_the_library_say_so(steps, monkeypatch):
    from SpineInpaintLib import cli

    monkeypatch.delitem(cli.COMMANDS, "segment", raising=False)
    with pytest.raises(steps.StepNotAvailable,
                       match=r"^'Segment spine' is not available yet in this version: SpineInpaintLib has no "
                             r"'segment' command$"):
        steps.build_command("segment", sys.executable, "ct.nii.gz", "out")
    assert issubclass(steps.StepNotAvailable, RuntimeError)


def test_restore_command_parses_with_the_contract(steps, monkeypatch):
    from SpineInpaintLib import cli

    monkeypatch.setitem(cli.COMMANDS, "restore", ("restore (contract)", contract_restore_parser, lambda a: 0))
    command = steps.build_command("restore", "/opt/Slicer/bin/PythonSlicer", "in.nii.gz", "outdir",
                                  lesion_mask="lesion.nii.gz", method="PGGAN", device="GPU")
    assert command[:4] == ["/opt/Slicer/bin/PythonSlicer", "-m", "SpineInpaintLib", "restore"]
    args = cli.build_parser().parse_args(command[3:])
    assert (args.ct, args.out, args.lesion_mask, args.device, args.method) == (
        "in.nii.gz", "outdir", "lesion.nii.gz", "cuda", "pggan")
    auto = steps.build_command("restore", "python", "in.nii.gz", "outdir")
    assert "--device" not in auto and auto[-2:] == ["--method", "context"]


def test_options_the_library_lacks_are_refused(steps, monkeypatch):
    from SpineInpaintLib import cli

    def without_method(parser):
        parser.add_argument("ct")
        parser.add_argument("--out", required=True)

    monkeypatch.setitem(cli.COMMANDS, "restore", ("restore", without_method, lambda a: 0))
    assert steps.build_command("restore", "python", "a", "b") == [
        "python", "-m", "SpineInpaintLib", "restore", "a", "--out", "b"]
    expected = r"choosing the inpainting method \(DCGAN\) is not available"
    with pytest.raises(steps.StepNotAvailable, match=expected):
        steps.build_command("restore", "python", "a", "b", method="DCGAN")
    with pytest.raises(steps.StepNotAvailable, match="has no --lesion-mask option"):
        steps.build_command("restore", "python", "a", "b", lesion_mask="m.nii.gz")
    with pytest.raises(ValueError, match="unknown device 'TPU'"):
        steps.build_command("restore", "python", "a", "b", device="TPU")


def test_segmentation_network_is_passed_to_every_step_that_segments(steps, monkeypatch):
    from SpineInpaintLib import cli, segmentation

    for step in ("segment", "detect", "restore"):
        default = steps.build_command(step, "python", "in.nii.gz", "outdir")
        args = cli.build_parser().parse_args(default[3:])
        assert args.seg_net == segmentation.DEFAULT_NETWORK == "vnet", step
        unet = steps.build_command(step, "python", "in.nii.gz", "outdir", segmentation_network="UNET")
        assert cli.build_parser().parse_args(unet[3:]).seg_net == "unet", step
    # Vertebra segments given to 'Detect lesions': nothing is segmented, no network named.
    reuse = steps.build_command("detect", "python", "in.nii.gz", "outdir", spine_labels="spine.nii.gz",
                                segmentation_network="UNET")
    assert "--seg-net" not in reuse
    with pytest.raises(ValueError, match="unknown segmentation network 'RESNET'"):
        steps.build_command("segment", "python", "a", "b", segmentation_network="RESNET")
    # A library without the option runs its own default, and refuses another choice in one line.
    monkeypatch.setitem(cli.COMMANDS, "restore", ("restore (contract)", contract_restore_parser, lambda a: 0))
    assert "--seg-net" not in steps.build_command("restore", "python", "a", "b")
    with pytest.raises(steps.StepNotAvailable,
                       match=r"choosing the segmentation network \(UNET\) is not available yet"):
        steps.build_command("restore", "python", "a", "b", segmentation_network="UNET")


def test_parse_progress_reads_tqdm_lines(steps):
    assert steps.parse_progress("Restore:  42%|####      | 42/100 [00:03<00:04]") == 42
    assert steps.parse_progress("100%|##########| 9/9") == 100
    assert steps.parse_progress("loaded 42% of the weights") is None
    assert steps.parse_progress("") is None


def test_requirements_never_touch_what_slicer_ships(steps):
    assert steps.missing_packages() == []  # the project's environment has them all
    for requirement in steps.REQUIRED_PACKAGES.values():
        if requirement:
            assert not any(p.lower() in requirement.lower() for p in steps.PROTECTED_PACKAGES)
    assert steps.REQUIRED_PACKAGES["torch"] is None  # from Slicer's PyTorch extension


def wait_for(job, seconds: float = 30.0) -> None:
    end = time.monotonic() + seconds
    while job.running and time.monotonic() < end:
        job.poll()
        time.sleep(0.02)
    job.poll()


def test_background_step_reports_progress_and_output(steps):
    script = ("import sys, time\n"
              "for i in (0, 50, 100):\n"
              "    sys.stderr.write(f'\\rRestore: {i:3d}%|#| {i}/100'); sys.stderr.flush()\n"
              "    time.sleep(0.05)\n"
              "print(); print('wrote restored_ct.nii.gz')\n")
    job = steps.BackgroundStep([sys.executable, "-c", script])
    job.start()
    seen = []
    end = time.monotonic() + 30
    while job.running and time.monotonic() < end:
        job.poll()
        if job.progress is not None:
            seen.append(job.progress)
        time.sleep(0.01)
    job.poll()
    assert job.returncode == 0 and not job.running
    assert job.progress == 100 and seen == sorted(seen)
    assert job.lines[-1] == "wrote restored_ct.nii.gz"


def test_background_step_failure_keeps_the_one_line_error(steps, tmp_path):
    env = steps.process_environment()
    command = [sys.executable, "-m", "SpineInpaintLib", "info", str(tmp_path / "missing.nii.gz")]
    job = steps.BackgroundStep(command, env=env, cwd=tmp_path)
    job.start()
    wait_for(job)
    assert job.returncode == 2
    assert "file not found" in job.last_error() and job.last_error().count("\n") == 0


def process_gone(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().split(")")[-1].split()[0] == "Z"  # a zombie is dead
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads process states from /proc")
def test_cancel_kills_the_process_and_its_children(steps):
    # Like PythonSlicer, the started process is a launcher whose child does the work.
    script = ("import subprocess, sys, time\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
              "print(child.pid, flush=True)\n"
              "time.sleep(60)\n")
    job = steps.BackgroundStep([sys.executable, "-c", script])
    job.start()
    end = time.monotonic() + 30
    while not job.lines and time.monotonic() < end:
        job.poll()
        time.sleep(0.02)
    child = int(job.lines[0])
    started = time.monotonic()
    job.cancel()
    assert time.monotonic() - started < 10
    assert job.cancelled and not job.running and job.returncode is not None
    end = time.monotonic() + 10
    while not process_gone(child) and time.monotonic() < end:
        time.sleep(0.05)
    assert process_gone(child)


def test_background_process_imports_the_library_from_anywhere(steps, tmp_path):
    env = steps.process_environment({"PATH": os.environ.get("PATH", "")})
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(REPO)
    done = subprocess.run([sys.executable, "-m", "SpineInpaintLib", "--version"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("SpineInpaintLib ")


# --- batch script ---------------------------------------------------------------------------------
def test_batch_arguments_pass_restore_options_through():
    batch = load_module("spineinpaint_batch", BATCH_FILE)
    args, rest = batch.parseArguments(["--", "--input", "ct.nii.gz", "--out", "out", "--device", "cpu"])
    assert (args.input, args.out, args.scene, rest) == ("ct.nii.gz", "out", False, ["--device", "cpu"])
    with pytest.raises(SystemExit):
        batch.parseArguments(["--out", "out"])  # --input is required


def test_batch_script_fails_in_one_line_on_bad_input(tmp_path):
    done = subprocess.run([sys.executable, str(BATCH_FILE), "--", "--input", str(tmp_path / "no_ct.nii.gz"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 2
    message = done.stderr.strip()
    assert message.count("\n") == 0 and "Traceback" not in message
    # Until the library has 'restore' the script says so; afterwards the command line reports the file.
    assert "not available yet" in message or "file not found" in message
