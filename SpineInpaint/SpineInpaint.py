"""SpineInpaint: restore tumour-destroyed vertebrae in spine CT, inside 3D Slicer.

The module is a thin shell. The widget reads the panel into a parameter node and calls the logic;
the logic moves data between MRML nodes and SpineInpaintLib (through ``SpineInpaintLib.mrml``) and
runs the long steps as a background process on SpineInpaintLib's command line, so the GUI never
freezes and Cancel stops the work. The science lives in SpineInpaintLib.
"""

import enum
import logging
import os
import pathlib
import shutil
import sys
import tempfile

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin


def _addLibraryToPath():
    """Make SpineInpaintLib importable: beside this file once installed, one level up in a source tree."""
    moduleDir = os.path.dirname(os.path.abspath(__file__))
    for folder in (moduleDir, os.path.dirname(moduleDir)):
        if os.path.isfile(os.path.join(folder, "SpineInpaintLib", "__init__.py")):
            if folder not in sys.path:
                sys.path.insert(0, folder)
            return


_addLibraryToPath()

from SpineInpaintModuleLib import runner, steps  # noqa: E402

#
# SpineInpaint
#


class SpineInpaint(ScriptedLoadableModule):
    """Module description shown in Slicer's module list and help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SpineInpaint")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["SpineInpaint contributors"]
        self.parent.helpText = _(
            "Restores vertebrae destroyed by a tumour in a spine CT, for the design of a 3D-printed "
            "vertebral prosthesis: segment the spine, detect the lesion (or draw it in the Segment "
            "Editor as the 'Lesion' segment), restore the CT by GAN inpainting (WGAN-GP, DCGAN, PGGAN) "
            "or biharmonic filling, and export watertight surfaces as STL.<br>"
            "The input CT is never modified: the restored CT is a new volume, and the models go to "
            "the subject-hierarchy folder 'SpineInpaint results'."
        )
        self.parent.acknowledgementText = _(
            "The method follows Miao et al., 'Spinal Neoplasm Image Inpainting with Deep Convolutional "
            "Neural Networks'. Built on MONAI, PyTorch, VTK and 3D Slicer."
        )
        slicer.app.connect("startupCompleted()", self.onStartupCompleted)

    def onStartupCompleted(self):
        SpineInpaintLogic.registerTerminology()


#
# SpineInpaintParameterNode
#


class Method(enum.Enum):
    """Inpainting method (names match SpineInpaintModuleLib.steps.METHODS)."""

    CONTEXT = "Context generator (best)"
    WGAN_GP = "WGAN-GP"
    DCGAN = "DCGAN"
    PGGAN = "PGGAN"
    BIHARMONIC = "Biharmonic"

    def label(self):
        return self.value


class SegmentationNetwork(enum.Enum):
    """Spine segmentation network (names match SpineInpaintModuleLib.steps.SEGMENTATION_NETWORKS)."""

    VNET = "V-Net (best)"
    UNET = "U-Net (faster)"

    def label(self):
        return self.value


class Device(enum.Enum):
    """Where the networks run (names match SpineInpaintModuleLib.steps.DEVICES)."""

    AUTO = "Auto"
    CPU = "CPU"
    GPU = "GPU"

    def label(self):
        return self.value


@parameterNodeWrapper
class SpineInpaintParameterNode:
    """The module's settings, stored in the scene (a saved scene restores them).

    inputVolume - CT to restore (never modified).
    segmentation - vertebra segments and the 'Lesion' segment.
    method - inpainting method.
    segmentationNetwork - network that segments the spine.
    device - where the networks run.
    stlFolder - folder for Export STL.
    restoredVolume - the restored CT of the last Restore.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    segmentation: vtkMRMLSegmentationNode
    method: Method = Method.CONTEXT
    segmentationNetwork: SegmentationNetwork = SegmentationNetwork.VNET
    device: Device = Device.AUTO
    stlFolder: pathlib.Path
    restoredVolume: vtkMRMLScalarVolumeNode


#
# SpineInpaintWidget
#


class SpineInpaintWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: reads the GUI into the parameter node, starts steps, shows progress."""

    #: How often the running step is asked for output (milliseconds).
    POLL_INTERVAL_MS = 300

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._pollTimer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SpineInpaint.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = SpineInpaintLogic()
        self.logic.registerTerminology()  # also when the module is reloaded after start-up

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.segmentSpineButton.connect("clicked()", lambda: self.onRunStep("segment"))
        self.ui.detectLesionsButton.connect("clicked()", lambda: self.onRunStep("detect"))
        self.ui.restoreButton.connect("clicked()", lambda: self.onRunStep("restore"))
        self.ui.exportStlButton.connect("clicked()", self.onExportStl)
        self.ui.editLesionButton.connect("clicked()", self.onEditLesion)
        self.ui.cancelButton.connect("clicked()", self.onCancel)

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(self.POLL_INTERVAL_MS)
        self._pollTimer.connect("timeout()", self.onPollJob)

        self.initializeParameterNode()
        self._setRunning(False)

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        if self._job is not None:
            self.logic.cancelStep(self._job)
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        if self._job is not None:
            self.onCancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode and not firstVolumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets carry a SlicerParameterName property in the .ui: connectGui ties them both ways.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._checkCanApply()

    def _checkCanApply(self, caller=None, event=None) -> None:
        running = self._job is not None
        hasInput = bool(self._parameterNode and self._parameterNode.inputVolume)
        hasSegmentation = bool(self._parameterNode and self._parameterNode.segmentation)
        for button in (self.ui.segmentSpineButton, self.ui.detectLesionsButton, self.ui.restoreButton):
            button.enabled = hasInput and not running
        self.ui.editLesionButton.enabled = hasInput and not running
        self.ui.exportStlButton.enabled = hasSegmentation and not running
        self.ui.cancelButton.enabled = running

    def _setRunning(self, running: bool) -> None:
        if not running:
            self._job = None
            self._pollTimer.stop()
        self.ui.progressBar.setRange(0, 100)
        self.ui.progressBar.value = 0
        self._checkCanApply()

    # --- steps -----------------------------------------------------------------------------------
    def onRunStep(self, stepKey: str) -> None:
        title = steps.STEPS[stepKey].title
        failed = _("'{title}' could not start.").format(title=title)
        with slicer.util.tryWithErrorDisplay(failed, waitCursor=True):
            if not self.logic.ensureDependencies():
                missing = _("'{title}' needs Python packages that are not installed.")
                self.ui.statusLabel.text = missing.format(title=title)
                return
            self._job = self.logic.startStep(stepKey, self._parameterNode)
            self.ui.statusLabel.text = _("{title}: running...").format(title=title)
            self.ui.progressBar.setRange(0, 0)  # busy until the first percentage arrives
            self._checkCanApply()
            self._pollTimer.start()

    def onPollJob(self) -> None:
        job = self._job
        if job is None:
            self._pollTimer.stop()
            return
        lines = job.poll()
        for line in lines:
            logging.info(line)
        if lines:
            self.ui.statusLabel.text = lines[-1]
        if job.progress is not None:
            self.ui.progressBar.setRange(0, 100)
            self.ui.progressBar.value = job.progress
        if job.running:
            return
        self._pollTimer.stop()
        title = steps.STEPS[job.stepKey].title
        try:
            with slicer.util.tryWithErrorDisplay(_("'{title}' failed.").format(title=title), waitCursor=True):
                results = self.logic.finishStep(job, self._parameterNode)
                if job.stepKey == "detect" and (results is None or results.segmentation is None):
                    self.ui.statusLabel.text = _("Detect lesions: no lesion found.")
                else:
                    self.ui.statusLabel.text = _("{title}: done.").format(title=title)
        finally:
            self._setRunning(False)

    def onCancel(self) -> None:
        if self._job is None:
            return
        title = steps.STEPS[self._job.stepKey].title
        self.logic.cancelStep(self._job)
        self.ui.statusLabel.text = _("{title}: cancelled.").format(title=title)
        self._setRunning(False)

    def onExportStl(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Export STL failed."), waitCursor=True):
            files = self.logic.exportStl(self._parameterNode)
            self.ui.statusLabel.text = _("Wrote {count} STL files to {folder}.").format(
                count=len(files), folder=str(self._parameterNode.stlFolder))

    def onEditLesion(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Cannot open the Segment Editor."), waitCursor=True):
            segmentationNode = self.logic.prepareLesionSegment(self._parameterNode)
            slicer.util.selectModule("SegmentEditor")
            editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
            editor.setSegmentationNode(segmentationNode)
            # Slicer 5.4 renamed the master volume to source volume.
            setSource = getattr(editor, "setSourceVolumeNode", None) or editor.setMasterVolumeNode
            setSource(self._parameterNode.inputVolume)
            segmentId = segmentationNode.GetSegmentation().GetSegmentIdBySegmentName(self.logic.lesionName)
            editor.setCurrentSegmentID(segmentId)


#
# SpineInpaintLogic
#


class SpineInpaintLogic(ScriptedLoadableModuleLogic):
    """Moves data between the scene and SpineInpaintLib; runs the steps in a background process.

    Usable without the GUI, e.g. from the Python console::

        logic = slicer.util.getModuleLogic("SpineInpaint")
        params = logic.getParameterNode()
        params.inputVolume = getNode("CT")
        job = logic.startStep("restore", params)
        job.wait()
        logic.finishStep(job, params)
    """

    lesionName = "Lesion"

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return SpineInpaintParameterNode(super().getParameterNode())

    @staticmethod
    def registerTerminology() -> None:
        """Load the module's terminology (SNOMED CT codes of the vertebrae and the lesion) into Slicer's
        Terminologies module, so that the segments show their standard names and colours."""
        terminologies = getattr(slicer.modules, "terminologies", None)
        if terminologies is None:
            return
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "Resources",
                            "SegmentationCategoryTypeModifier-SpineInpaint.term.json")
        terminologies.logic().LoadTerminologyFromFile(path)

    # --- dependencies ----------------------------------------------------------------------------
    def ensureDependencies(self, askConfirmation: bool = True) -> bool:
        """Install what Slicer lacks, after asking: torch through Slicer's PyTorch extension, the rest
        with pip. vtk and SimpleITK are never installed (Slicer ships its own)."""
        missing = steps.missing_packages()
        if not missing:
            return True
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
            _("SpineInpaint needs Python packages that this Slicer does not have yet:\n\n{packages}\n\n"
              "Install them now? This downloads several hundred megabytes and takes a few minutes.").format(
                packages=", ".join(missing)),
            windowTitle=_("Install SpineInpaint dependencies"),
        ):
            return False
        with slicer.util.WaitCursor():
            if "torch" in missing or "torchvision" in missing:
                try:
                    import PyTorchUtils
                except ImportError:
                    raise RuntimeError(_("Install the 'PyTorch' extension from the Extensions Manager first, "
                                         "then restart Slicer.")) from None
                if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False) is None:
                    raise RuntimeError(_("PyTorch could not be installed."))
            for name in missing:
                requirement = steps.REQUIRED_PACKAGES[name]
                if requirement is None:
                    continue
                if any(protected.lower() in requirement.lower() for protected in steps.PROTECTED_PACKAGES):
                    raise RuntimeError(f"refusing to pip-install {requirement}: Slicer ships its own")
                slicer.util.pip_install(requirement)
        return not steps.missing_packages()

    # --- steps -----------------------------------------------------------------------------------
    @staticmethod
    def pythonExecutable() -> str:
        """PythonSlicer: Slicer's Python, set up like the application's, without a GUI."""
        return shutil.which("PythonSlicer") or sys.executable

    def runner(self):
        """The Qt-free core that runs the steps on the scene (:class:`runner.StepRunner`)."""
        return runner.StepRunner(slicer.mrmlScene, python=self.pythonExecutable(),
                                 environment=self._startupEnvironment(), lesion_name=self.lesionName)

    def startStep(self, stepKey: str, parameterNode):
        """Write the inputs to a temporary folder and start the step's command in the background.

        Returns a :class:`steps.BackgroundStep` (with ``stepKey``, ``workDir`` and ``outDir`` attached)
        to poll; raises with a one-line reason when the step cannot run, in particular when the
        installed SpineInpaintLib does not provide it yet.
        """
        return self.runner().start(stepKey, parameterNode.inputVolume, parameterNode.segmentation,
                                   method=parameterNode.method.name, device=parameterNode.device.name,
                                   segmentation_network=parameterNode.segmentationNetwork.name)

    @staticmethod
    def _startupEnvironment():
        # The launcher (PythonSlicer) sets Slicer's paths itself from a clean environment.
        try:
            return slicer.util.startupEnvironment()
        except Exception:
            return None

    def cancelStep(self, job) -> None:
        """Stop a running step and delete its temporary folder; the scene is left as it was."""
        self.runner().cancel(job)

    def finishStep(self, job, parameterNode):
        """Bring a finished step's outputs into the scene (all or nothing) and show them.

        Returns SceneResults (None for a cancelled step); raises the command's one-line error when
        the step failed, leaving the scene as it was.
        """
        results = self.runner().finish(job, parameterNode.inputVolume, parameterNode.segmentation)
        if results is None:
            return None
        if results.segmentation is not None:
            parameterNode.segmentation = results.segmentation
        if results.restored_volume is not None:
            parameterNode.restoredVolume = results.restored_volume
        self.showResults(parameterNode, results)
        return results

    def showResults(self, parameterNode, results) -> None:
        """Restored CT in the slice views, segments outlined, segments and models in 3D."""
        if results.restored_volume is not None:
            # Restored CT behind, the input in front at zero opacity: the slice-view fader compares them.
            slicer.util.setSliceViewerLayers(
                background=results.restored_volume, foreground=parameterNode.inputVolume,
                foregroundOpacity=0.0, fit=True)
        else:
            slicer.util.setSliceViewerLayers(background=parameterNode.inputVolume, fit=True)
        if results.segmentation is not None:
            results.segmentation.CreateClosedSurfaceRepresentation()
            results.segmentation.GetDisplayNode().SetVisibility(True)
        for model in results.models:
            model.GetDisplayNode().SetVisibility(True)
        layoutManager = slicer.app.layoutManager()
        if layoutManager and layoutManager.threeDViewCount:
            layoutManager.threeDWidget(0).threeDView().resetFocalPoint()

    # --- segment editor and export ---------------------------------------------------------------
    def prepareLesionSegment(self, parameterNode):
        """The segmentation to draw in, with a coded, empty 'Lesion' segment if it has none."""
        from SpineInpaintLib import mrml

        if parameterNode.inputVolume is None:
            raise ValueError(_("Select an input CT volume first."))
        segmentationNode = parameterNode.segmentation
        if segmentationNode is None:
            segmentationNode = slicer.mrmlScene.AddNewNodeByClass(
                "vtkMRMLSegmentationNode", parameterNode.inputVolume.GetName() + " segmentation")
            segmentationNode.CreateDefaultDisplayNodes()
            parameterNode.segmentation = segmentationNode
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(parameterNode.inputVolume)
        segmentation = segmentationNode.GetSegmentation()
        if not segmentation.GetSegmentIdBySegmentName(self.lesionName):
            segmentId = segmentation.AddEmptySegment(self.lesionName, self.lesionName,
                                                     mrml.segment_color(self.lesionName))
            segmentation.GetSegment(segmentId).SetTerminology(mrml.terminology_entry(self.lesionName))
        return segmentationNode

    def exportStl(self, parameterNode):
        """One STL per vertebra segment and the merged restored_spine.stl, through Slicer's export."""
        from SpineInpaintLib import mrml

        segmentationNode = parameterNode.segmentation
        if segmentationNode is None:
            raise ValueError(_("There is no segmentation to export: run 'Segment spine' or 'Restore' first."))
        folder = pathlib.Path(str(parameterNode.stlFolder))
        if str(folder) in ("", "."):
            raise ValueError(_("Choose the folder for the STL files first."))
        segmentation = segmentationNode.GetSegmentation()
        names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
        names = [n for n in names if n != self.lesionName]
        if not names:
            raise ValueError(_("The segmentation has no vertebra segments to export."))
        files = mrml.export_segments_to_stl(segmentationNode, folder, names)
        files += mrml.export_segments_to_stl(segmentationNode, folder, names, merge=True,
                                             file_name="restored_spine.stl")
        return files


#
# SpineInpaintTest
#


class SpineInpaintTest(ScriptedLoadableModuleTest):
    """Self-test: the MRML bridge on synthetic data and the steps' availability (no network needed)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_MRMLBridge()
        self.setUp()
        self.test_StepsAreRunnableOrSayWhyNot()

    def test_MRMLBridge(self):
        import numpy as np

        from SpineInpaintLib import mrml
        from SpineInpaintLib.core import io

        self.delayDisplay("MRML bridge")
        array = np.full((20, 24, 28), -1000, np.int16)
        labels = np.zeros(array.shape, np.uint8)
        labels[4:10, 6:18, 8:20] = 29  # L3
        labels[11:17, 6:18, 8:20] = 30  # L2
        array[labels > 0] = 400
        ct = io.Volume(array, spacing=(0.8, 0.8, 2.0), origin=(10.0, -20.0, 30.0))
        ctNode = mrml.volume_to_node(slicer.mrmlScene, ct, "SpineInpaint self-test CT")
        self.assertTrue(mrml.volume_from_node(ctNode).same_grid(ct))
        segmentationNode = mrml.segmentation_from_labels(slicer.mrmlScene, ct.with_array(labels), ctNode)
        back, names = mrml.labels_from_segmentation(segmentationNode, ctNode)
        self.assertEqual(names, {29: "L3", 30: "L2"})
        self.assertTrue((back.array == labels).all())
        folder = mrml.results_folder(slicer.mrmlScene)
        models = mrml.models_from_segmentation(slicer.mrmlScene, segmentationNode, folder, ["L3"])
        self.assertEqual(len(models), 1)
        outDir = tempfile.mkdtemp(prefix="SpineInpaint-selftest-")
        try:
            files = mrml.export_segments_to_stl(segmentationNode, outDir, ["L3", "L2"])
            self.assertEqual(len(files), 2)
        finally:
            shutil.rmtree(outDir, ignore_errors=True)
        self.delayDisplay("MRML bridge passed")

    def test_StepsAreRunnableOrSayWhyNot(self):
        self.delayDisplay("Steps")
        for key in steps.STEPS:
            try:
                command = steps.build_command(key, SpineInpaintLogic.pythonExecutable(), "in.nii.gz", "out")
            except steps.StepNotAvailable as err:
                self.assertIn("not available yet", str(err))
            else:
                self.assertEqual(command[1:4], ["-m", "SpineInpaintLib", steps.STEPS[key].command])
        self.delayDisplay("Steps passed")
