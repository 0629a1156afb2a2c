"""SpineInpaint in Slicer batch mode: restore a CT and write the command line's outputs.

    Slicer --no-main-window --python-script SpineInpaint/Scripts/batch.py -- --input CT --out DIR
           [--scene] [any option of 'python -m SpineInpaintLib restore', e.g. --lesion-mask MASK --device cpu]

Runs ``SpineInpaintLib.cli.main(['restore', CT, '--out', DIR, ...])`` and so writes exactly what the
command line writes (restored_ct.nii.gz, spine_seg.nii.gz, lesion_seg.nii.gz, restored_seg.nii.gz,
restored_spine.stl, report.json, report.png). With ``--scene`` it also loads the input and the
results into Slicer's scene, as the module does, and saves ``DIR/SpineInpaint.mrb``.
The exit code is the command line's: 0 done, 2 bad input (one-line reason on stderr).
"""

import argparse
import os
import sys


def _addLibraryToPath():
    """SpineInpaintLib sits beside the module once installed, at the repository root in a source tree."""
    here = os.path.dirname(os.path.abspath(__file__))
    for folder in (os.path.dirname(here), os.path.dirname(os.path.dirname(here))):
        if os.path.isfile(os.path.join(folder, "SpineInpaintLib", "__init__.py")):
            if folder not in sys.path:
                sys.path.insert(0, folder)
            return folder
    return None


def parseArguments(argv):
    parser = argparse.ArgumentParser(
        prog="Slicer --no-main-window --python-script batch.py --",
        description="Restore a spine CT with SpineInpaint and write the outputs to a folder.",
    )
    parser.add_argument("--input", required=True, help="CT volume (NIfTI, NRRD, MHA or a DICOM folder)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--scene", action="store_true",
                        help="also save the scene with the results as DIR/SpineInpaint.mrb")
    if argv and argv[0] == "--":  # Slicer may hand the separator on to the script
        argv = argv[1:]
    return parser.parse_known_args(argv)


def saveScene(inputPath, outDir):
    """Load the input and the outputs into Slicer's scene (as the module does) and save it."""
    import slicer

    from SpineInpaintLib import mrml
    from SpineInpaintLib.core import io

    ctNode = mrml.volume_to_node(slicer.mrmlScene, io.read_volume(inputPath), "CT")
    mrml.load_outputs(slicer.mrmlScene, outDir, ctNode)
    path = os.path.join(outDir, "SpineInpaint.mrb")
    if not slicer.util.saveScene(path):
        raise RuntimeError(f"could not save the scene to {path}")
    print(f"scene saved to {path}")


def main(argv):
    args, restoreOptions = parseArguments(argv)
    if _addLibraryToPath() is None and "SpineInpaintLib" not in sys.modules:
        print("batch.py: error: SpineInpaintLib not found beside the module", file=sys.stderr)
        return 2
    from SpineInpaintLib import cli

    if "restore" not in cli.COMMANDS:
        print("batch.py: error: 'restore' is not available yet in this version of SpineInpaintLib",
              file=sys.stderr)
        return 2
    code = cli.main(["restore", args.input, "--out", args.out, *restoreOptions])
    if code == 0 and args.scene:
        saveScene(args.input, args.out)
    return code


if __name__ == "__main__":
    exitCode = main(sys.argv[1:])
    try:
        import slicer

        app = getattr(slicer, "app", None)
    except ImportError:
        app = None
    if app is not None:
        slicer.util.exit(exitCode)  # leaves Slicer with this code
    else:
        sys.exit(exitCode)
