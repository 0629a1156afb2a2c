"""The module's long steps, run as a background process on SpineInpaintLib's command line.

Slicer's GUI must never freeze: each step ('Segment spine', 'Detect lesions', 'Restore') runs
``python -m SpineInpaintLib <command> ...`` in a separate process (PythonSlicer inside Slicer), a
thread reads its output, and the widget polls :class:`BackgroundStep` from a timer for new lines
and progress. Cancel kills the whole process tree.

A step whose command the installed SpineInpaintLib does not have yet raises
:class:`StepNotAvailable` with a one-line reason, before anything starts. Nothing here imports Qt
or ``slicer``, so pytest checks it outside Slicer.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = [
    "Step",
    "STEPS",
    "METHODS",
    "DEVICES",
    "DEFAULT_METHOD",
    "REQUIRED_PACKAGES",
    "PROTECTED_PACKAGES",
    "StepNotAvailable",
    "library_root",
    "command_options",
    "build_command",
    "process_environment",
    "parse_progress",
    "missing_packages",
    "BackgroundStep",
    "kill_process_tree",
]


@dataclasses.dataclass(frozen=True)
class Step:
    """One step of the panel and the command-line command behind it."""

    key: str
    title: str
    command: str
    #: Files the command writes into ``--out`` (names from SpineInpaintLib.core.outputs.OUTPUT_FILES).
    outputs: tuple[str, ...]


STEPS: dict[str, Step] = {
    "segment": Step("segment", "Segment spine", "segment", ("spine_seg.nii.gz",)),
    "detect": Step("detect", "Detect lesions", "detect", ("lesion_seg.nii.gz",)),
    "restore": Step(
        "restore", "Restore", "restore",
        ("restored_ct.nii.gz", "spine_seg.nii.gz", "lesion_seg.nii.gz", "restored_seg.nii.gz",
         "restored_spine.stl", "report.json", "report.png"),
    ),
}

#: Inpainting method: the module's enum name -> the command line's value.
METHODS: dict[str, str] = {
    "CONTEXT": "context", "WGAN_GP": "wgan-gp", "DCGAN": "dcgan", "PGGAN": "pggan", "BIHARMONIC": "biharmonic",
}
#: The method the library uses when none is given: the context generator, which restores destructive
#: lesions best (README, 'evaluate inpainting'); WGAN-GP is the paper's.
DEFAULT_METHOD = "CONTEXT"
#: Segmentation network: the module's enum name -> the command line's value.
SEGMENTATION_NETWORKS: dict[str, str] = {"VNET": "vnet", "UNET": "unet"}
#: The network the library uses when none is given: the V-Net (more accurate; the U-Net is faster).
DEFAULT_SEGMENTATION_NETWORK = "VNET"
#: Device: the module's enum name -> the command line's value (None: let the library choose).
DEVICES: dict[str, str | None] = {"AUTO": None, "CPU": "cpu", "GPU": "cuda"}

#: Import name -> pip requirement of what Slicer lacks. torch comes from Slicer's PyTorch extension.
REQUIRED_PACKAGES: dict[str, str | None] = {
    "torch": None,
    "torchvision": None,
    "monai": "monai>=1.6,<1.7",
    "skimage": "scikit-image>=0.26",
    "scipy": "scipy",
    "safetensors": "safetensors",
    "tqdm": "tqdm",
    "matplotlib": "matplotlib",
}
#: Slicer ships its own builds of these; installing them with pip would break Slicer.
PROTECTED_PACKAGES = ("vtk", "SimpleITK")


class StepNotAvailable(RuntimeError):
    """The installed SpineInpaintLib cannot do this step (yet)."""


def library_root() -> Path | None:
    """The folder that holds the ``SpineInpaintLib`` package.

    Installed extension: the scripted-modules folder (``SpineInpaintLib`` beside ``SpineInpaint.py``).
    Source tree: the repository root, one level above the module folder.
    """
    module_dir = Path(__file__).resolve().parents[1]
    for candidate in (module_dir, module_dir.parent):
        if (candidate / "SpineInpaintLib" / "__init__.py").is_file():
            return candidate
    return None


def _import_cli():
    root = library_root()
    if root is not None and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        from SpineInpaintLib import cli
    except ImportError as err:
        raise StepNotAvailable(f"SpineInpaintLib cannot be imported: {err}") from None
    return cli


def command_options(command: str) -> set[str] | None:
    """Option strings (``--out``, ``--device`` ...) of a command of SpineInpaintLib's command line.

    Returns None when the installed library has no such command.
    """
    import argparse

    parser = _import_cli().build_parser()
    for action in parser._actions:  # argparse keeps sub-commands only here
        if isinstance(action, argparse._SubParsersAction):
            sub = action.choices.get(command)
            if sub is None:
                return None
            return {s for a in sub._actions for s in a.option_strings}
    return None


def build_command(
    step_key: str,
    python: str | os.PathLike,
    input_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    lesion_mask: str | os.PathLike | None = None,
    method: str = DEFAULT_METHOD,
    device: str = "AUTO",
    spine_labels: str | os.PathLike | None = None,
    segmentation_network: str = DEFAULT_SEGMENTATION_NETWORK,
) -> list[str]:
    """The command line that runs a step.

    Parameters
    ----------
    step_key
        'segment', 'detect' or 'restore'.
    python
        The interpreter (PythonSlicer inside Slicer).
    method, device, segmentation_network
        Enum names of the module's parameter node (see :data:`METHODS`, :data:`DEVICES`,
        :data:`SEGMENTATION_NETWORKS`).
    spine_labels
        Vertebra labels already in the scene ('Detect lesions' then skips segmenting again).

    Raises
    ------
    StepNotAvailable
        When the installed SpineInpaintLib lacks the command or one of the options asked for.
    """
    if step_key not in STEPS:
        raise ValueError(f"unknown step '{step_key}' (known: {', '.join(STEPS)})")
    if method not in METHODS:
        raise ValueError(f"unknown method '{method}' (known: {', '.join(METHODS)})")
    if device not in DEVICES:
        raise ValueError(f"unknown device '{device}' (known: {', '.join(DEVICES)})")
    if segmentation_network not in SEGMENTATION_NETWORKS:
        raise ValueError(f"unknown segmentation network '{segmentation_network}' "
                         f"(known: {', '.join(SEGMENTATION_NETWORKS)})")
    step = STEPS[step_key]
    options = command_options(step.command)
    if options is None:
        raise StepNotAvailable(
            f"'{step.title}' is not available yet in this version: SpineInpaintLib has no "
            f"'{step.command}' command"
        )

    def need(option: str, what: str) -> None:
        if option not in options:
            raise StepNotAvailable(
                f"{what} is not available yet in this version: '{step.command}' has no {option} option"
            )

    need("--out", f"'{step.title}'")
    command = [str(python), "-m", "SpineInpaintLib", step.command, str(input_path), "--out", str(out_dir)]
    if lesion_mask is not None:
        need("--lesion-mask", "a lesion drawn in the Segment Editor")
        command += ["--lesion-mask", str(lesion_mask)]
    if spine_labels is not None:
        need("--spine-seg", "reusing the vertebra segments")
        command += ["--spine-seg", str(spine_labels)]
    if DEVICES[device] is not None:
        need("--device", f"choosing the device ({device})")
        command += ["--device", DEVICES[device]]
    # Every step segments (detect when no vertebra segments are given); the network is named whenever
    # the library takes it, so the command says which one ran.
    if spine_labels is None:
        if "--seg-net" in options:
            command += ["--seg-net", SEGMENTATION_NETWORKS[segmentation_network]]
        elif segmentation_network != DEFAULT_SEGMENTATION_NETWORK:
            need("--seg-net", f"choosing the segmentation network ({segmentation_network})")
    if step_key == "restore":
        if "--method" in options:
            command += ["--method", METHODS[method]]
        elif method != DEFAULT_METHOD:
            need("--method", f"choosing the inpainting method ({method})")
    return command


def process_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment of the background process: the library importable, output unbuffered."""
    env = dict(os.environ if base is None else base)
    root = library_root()
    if root is not None:
        paths = [str(root)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"  # progress lines arrive as they are printed
    return env


# tqdm prints "Restore:  42%|####      | 42/100 [...]"
_PERCENT = re.compile(r"(\d{1,3})%\|")


def parse_progress(line: str) -> int | None:
    """Percentage (0-100) from a tqdm progress line, or None."""
    found = _PERCENT.findall(line)
    if not found:
        return None
    value = int(found[-1])
    return value if 0 <= value <= 100 else None


def missing_packages() -> list[str]:
    """Import names from :data:`REQUIRED_PACKAGES` that this Python cannot import."""
    importlib.invalidate_caches()  # packages pip installed while Slicer runs
    return [name for name in REQUIRED_PACKAGES if importlib.util.find_spec(name) is None]


# --- the background process ---------------------------------------------------------------------
def _new_process_group() -> dict:
    # A group of its own lets Cancel stop the launcher and the Python it starts (PythonSlicer is a
    # launcher: killing only it would leave the real interpreter running).
    if os.name == "nt":
        flags = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        return {"creationflags": flags}
    return {"start_new_session": True}


def kill_process_tree(process: subprocess.Popen) -> None:
    """Kill a process started by :class:`BackgroundStep` and every process it started."""
    if process.poll() is not None:
        return
    if os.name == "nt":
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], capture_output=True, check=False)
    else:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the group id is the leader's pid
        except ProcessLookupError:
            pass
    process.wait()


class BackgroundStep:
    """A command running in the background; poll it from a GUI timer, never block on it.

    Examples
    --------
    >>> job = BackgroundStep([sys.executable, "-c", "print('done')"])
    >>> job.start()
    >>> job.wait(30)
    0
    >>> job.poll()
    ['done']
    """

    def __init__(self, command: Sequence[str], env: Mapping[str, str] | None = None,
                 cwd: str | os.PathLike | None = None):
        self.command = [str(c) for c in command]
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.process: subprocess.Popen | None = None
        self.progress: int | None = None
        self.cancelled = False
        self.lines: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        """Start the process and the thread that reads its output."""
        if self.process is not None:
            raise RuntimeError("this step was started already")
        self.process = subprocess.Popen(
            self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            text=True, errors="replace", env=self.env, cwd=self.cwd, **_new_process_group(),
        )
        self._reader = threading.Thread(target=self._read, name="SpineInpaint output reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:  # text mode: '\r' of progress bars ends a line too
            self._queue.put(line.rstrip())
        self.process.stdout.close()

    def poll(self) -> list[str]:
        """New output lines since the last call (never blocks); updates :attr:`progress`."""
        new = []
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if not line:
                continue
            new.append(line)
            value = parse_progress(line)
            if value is not None:
                self.progress = value
        self.lines.extend(new)
        return new

    @property
    def running(self) -> bool:
        """True while the process runs or its output is still being read."""
        if self.process is None:
            return False
        return self.process.poll() is None or (self._reader is not None and self._reader.is_alive())

    @property
    def returncode(self) -> int | None:
        """Exit code once finished (None while running)."""
        return None if self.process is None else self.process.poll()

    def wait(self, timeout: float | None = None) -> int:
        """Block until the process ends (for batch mode and tests, not the GUI)."""
        if self.process is None:
            raise RuntimeError("this step was not started")
        code = self.process.wait(timeout)
        if self._reader is not None:
            self._reader.join(timeout)
        return code

    def cancel(self) -> None:
        """Stop the process and everything it started."""
        self.cancelled = True
        if self.process is not None:
            kill_process_tree(self.process)
            if self._reader is not None:
                self._reader.join(5)

    def last_error(self) -> str:
        """The last output line (the command line prints its one-line error there)."""
        self.poll()
        return self.lines[-1] if self.lines else ""
