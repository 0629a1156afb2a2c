"""The Logic's core: run a step in the background and bring its outputs into an MRML scene.

:class:`StepRunner` is what ``SpineInpaintLogic`` does with the scene, without Qt and without
``slicer.app``, so pytest runs it on a real ``vtkMRMLScene`` from slicer-core:

1. :meth:`StepRunner.start` writes the input volume (and a drawn 'Lesion' segment, or the vertebra
   segments for 'Detect lesions') to a temporary folder and starts the step's command line
   (:mod:`.steps`) in a background process;
2. the caller polls the returned :class:`~.steps.BackgroundStep` (a GUI timer) or waits on it
   (console, batch);
3. :meth:`StepRunner.finish` loads the outputs into the scene, all or nothing
   (:func:`SpineInpaintLib.mrml.load_outputs`), or raises the command's one-line error;
   :meth:`StepRunner.cancel` stops the process. Either way the temporary folder goes, the input
   node is never modified, and a cancelled or failed step adds no node.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from . import steps

__all__ = ["StepRunner", "StepFailed"]


class StepFailed(RuntimeError):
    """A step's command ended with an error (its one-line message is the exception's text)."""


class StepRunner:
    """Start, cancel and finish the module's steps on one scene.

    Parameters
    ----------
    scene
        The ``vtkMRMLScene`` (``slicer.mrmlScene`` in Slicer).
    python
        Interpreter of the background process (PythonSlicer in Slicer; default: this Python).
    environment
        Base environment of the background process (Slicer's start-up environment in Slicer).
    lesion_name
        Name of the segment that holds a lesion drawn by the user.
    """

    def __init__(self, scene, python: str | os.PathLike | None = None,
                 environment: Mapping[str, str] | None = None, lesion_name: str = "Lesion"):
        import sys

        self.scene = scene
        self.python = str(python or sys.executable)
        self.environment = environment
        self.lesion_name = lesion_name

    # --- inputs ----------------------------------------------------------------------------------
    def lesion_mask(self, segmentation_node, input_node):
        """The drawn lesion segment as a mask on the input grid, or None when there is none or it is
        empty (an empty one means: detect)."""
        from SpineInpaintLib import mrml

        if segmentation_node is None:
            return None
        if not segmentation_node.GetSegmentation().GetSegmentIdBySegmentName(self.lesion_name):
            return None
        mask = mrml.lesion_mask_from_segmentation(segmentation_node, input_node, self.lesion_name, allow_empty=True)
        return mask if mask.array.any() else None

    @staticmethod
    def vertebra_segments(segmentation_node) -> list[str]:
        """Names of the segments that are vertebrae (T1 ... S1, sacrum)."""
        from SpineInpaintLib.core import labels

        if segmentation_node is None:
            return []
        segmentation = segmentation_node.GetSegmentation()
        names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
        known = {labels.vertebra_name(v).lower() for v in labels.VERTEBRA_IDS}
        return [n for n in names if n.lower() in known]

    # --- the steps -------------------------------------------------------------------------------
    def start(self, step_key: str, input_node, segmentation_node=None, method: str = steps.DEFAULT_METHOD,
              device: str = "AUTO",
              segmentation_network: str = steps.DEFAULT_SEGMENTATION_NETWORK) -> steps.BackgroundStep:
        """Write the inputs to a temporary folder and start the step's command in the background.

        Returns the running :class:`~.steps.BackgroundStep` with ``stepKey``, ``workDir`` and
        ``outDir`` attached. Raises ValueError (no input), :class:`~.steps.StepNotAvailable` (the
        installed SpineInpaintLib lacks the command) or SpineInpaintError (a segment that cannot be
        exported) before anything starts; nothing is left behind then.
        """
        from SpineInpaintLib import mrml
        from SpineInpaintLib.core import io

        if input_node is None:
            raise ValueError("Select an input CT volume first.")
        work_dir = Path(tempfile.mkdtemp(prefix=f"SpineInpaint-{step_key}-"))
        input_path = work_dir / "input_ct.nii.gz"
        out_dir = work_dir / "out"
        try:
            lesion_path = spine_path = None
            lesion = self.lesion_mask(segmentation_node, input_node) if step_key == "restore" else None
            if lesion is not None:
                lesion_path = work_dir / "lesion_mask.nii.gz"
            vertebrae = self.vertebra_segments(segmentation_node) if step_key == "detect" else []
            if vertebrae:
                spine_path = work_dir / "spine_seg_in.nii.gz"
            # Checks that the command exists before anything heavy is written.
            command = steps.build_command(step_key, self.python, input_path, out_dir, lesion_path,
                                          method=method, device=device, spine_labels=spine_path,
                                          segmentation_network=segmentation_network)
            io.write_volume(mrml.volume_from_node(input_node), input_path)
            if lesion is not None:
                io.write_volume(lesion, lesion_path)
            if spine_path is not None:
                labels, _ = mrml.labels_from_segmentation(segmentation_node, input_node, vertebrae)
                io.write_volume(labels, spine_path)
            job = steps.BackgroundStep(command, env=steps.process_environment(self.environment), cwd=work_dir)
            job.stepKey, job.workDir, job.outDir = step_key, work_dir, out_dir
            logging.info("SpineInpaint: " + " ".join(command))
            job.start()
        except BaseException:
            shutil.rmtree(work_dir, ignore_errors=True)
            raise
        return job

    def cancel(self, job: steps.BackgroundStep) -> None:
        """Stop a running step and delete its temporary folder; the scene is left as it was."""
        job.cancel()
        shutil.rmtree(job.workDir, ignore_errors=True)

    def finish(self, job: steps.BackgroundStep, input_node, segmentation_node=None):
        """Bring a finished step's outputs into the scene (all or nothing).

        Returns :class:`SpineInpaintLib.mrml.SceneResults`, or None for a cancelled step. Raises
        :class:`StepFailed` with the command's one-line error when it failed; the scene is then
        left as it was.
        """
        from SpineInpaintLib import mrml

        try:
            job.poll()
            if job.cancelled:
                return None
            if job.returncode is None:
                raise RuntimeError("the step is still running: wait for it or cancel it first")
            if job.returncode != 0:
                raise StepFailed(job.last_error() or f"the step ended with exit code {job.returncode}")
            return mrml.load_outputs(self.scene, job.outDir, input_node, segmentation_node=segmentation_node)
        finally:
            if job.returncode is not None or job.cancelled:
                shutil.rmtree(job.workDir, ignore_errors=True)

    def run(self, step_key: str, input_node, segmentation_node=None, method: str = steps.DEFAULT_METHOD,
            device: str = "AUTO", timeout: float | None = None,
            segmentation_network: str = steps.DEFAULT_SEGMENTATION_NETWORK):
        """Start, wait for and finish a step (console and batch use; the GUI polls instead)."""
        job = self.start(step_key, input_node, segmentation_node, method=method, device=device,
                         segmentation_network=segmentation_network)
        try:
            job.wait(timeout)
        except BaseException:
            self.cancel(job)
            raise
        return self.finish(job, input_node, segmentation_node)
