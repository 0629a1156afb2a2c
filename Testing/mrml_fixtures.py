"""A real MRML scene for tests, set up with the logic classes the way the Slicer application does.

``slicer-core`` ships Slicer's MRML and module-logic libraries without ``slicer.app`` and without
the Qt side. This fixture builds what the application's start-up builds around its scene
(``qSlicerCoreApplication`` and the module loaders):

* a ``vtkMRMLScene`` with the default crosshair node;
* ``vtkSlicerApplicationLogic`` on that scene, with its colour logic and the default colour nodes;
* the data IO (remote IO logic with a cache folder, data IO manager logic) that reading an .mrb needs;
* the Volumes, Segmentations and Subject Hierarchy module logics, registered with the application
  logic under their module names;
* what Slicer's Qt subject-hierarchy plugin logic does and ``slicer-core`` lacks: every data node
  added to the scene gets a subject-hierarchy item under the scene, and loses it when removed.

The Terminologies logic is left out: ``slicer-core`` has none of Slicer's terminology JSON files,
and the segments' ``TerminologyEntry`` tags need only Slicer's static (de)serializer.

Test modules import the fixtures by name: ``from mrml_fixtures import mrml_app, scene``.
"""

from __future__ import annotations

import dataclasses
import tempfile

import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (the MRML libraries) is not installed")
from vtkmodules.util.misc import calldata_type  # noqa: E402
from vtkmodules.vtkCommonCore import VTK_OBJECT  # noqa: E402

__all__ = ["MRMLApplication", "make_mrml_application", "mrml_app", "mrml_app_factory", "scene"]


@dataclasses.dataclass
class MRMLApplication:
    """A scene with its application logic and module logics (what the fixture yields)."""

    scene: object
    app_logic: object
    volumes_logic: object
    segmentations_logic: object
    subject_hierarchy_logic: object
    remote_io: object
    data_io_logic: object
    cache_dir: tempfile.TemporaryDirectory
    observer_tags: list[int] = dataclasses.field(default_factory=list)

    def close(self) -> None:
        """Remove the observers, clear the scene and delete the IO cache folder."""
        for tag in self.observer_tags:
            self.scene.RemoveObserver(tag)
        self.observer_tags = []
        self.scene.Clear(True)
        self.cache_dir.cleanup()


def _register(app_logic, scene, logic, name: str):
    # Same order as the module loader: scene first, then the application logic.
    logic.SetMRMLScene(scene)
    logic.SetMRMLApplicationLogic(app_logic)
    app_logic.SetModuleLogic(name, logic)
    return logic


def _add_subject_hierarchy_items(scene) -> list[int]:
    """Observers that keep subject-hierarchy items in step with data nodes, as the SH plugins do."""

    @calldata_type(VTK_OBJECT)
    def on_node_added(caller, event, node):
        # Items of a scene being read come from the file; the application skips those too.
        if scene.IsImporting() or node is None:
            return
        if not node.IsA("vtkMRMLDisplayableNode") or node.GetHideFromEditors():
            return
        sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
        if sh is not None and not sh.GetItemByDataNode(node):
            sh.CreateItem(sh.GetSceneItemID(), node)

    @calldata_type(VTK_OBJECT)
    def on_node_about_to_be_removed(caller, event, node):
        sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
        if sh is None or node is None or node is sh:
            return
        item = sh.GetItemByDataNode(node)
        if item:
            sh.RemoveItem(item, False, False)  # the item only: the scene is removing the node

    return [
        scene.AddObserver(slicer.vtkMRMLScene.NodeAddedEvent, on_node_added),
        scene.AddObserver(slicer.vtkMRMLScene.NodeAboutToBeRemovedEvent, on_node_about_to_be_removed),
    ]


def make_mrml_application() -> MRMLApplication:
    """Build a scene and its logics as the Slicer application does at start-up."""
    scene = slicer.vtkMRMLScene()
    crosshair = slicer.vtkMRMLCrosshairNode()
    crosshair.SetCrosshairName("default")
    scene.AddNode(crosshair)

    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    app_logic.GetColorLogic().SetMRMLScene(scene)
    app_logic.GetColorLogic().AddDefaultColorNodes()

    cache_dir = tempfile.TemporaryDirectory(prefix="spineinpaint-mrml-cache-")
    remote_io = slicer.vtkMRMLRemoteIOLogic()
    remote_io.SetMRMLScene(scene)
    remote_io.SetMRMLApplicationLogic(app_logic)
    remote_io.GetCacheManager().SetRemoteCacheDirectory(cache_dir.name)
    data_io_logic = slicer.vtkDataIOManagerLogic()
    data_io_logic.SetMRMLScene(scene)
    data_io_logic.SetMRMLApplicationLogic(app_logic)
    data_io_logic.SetAndObserveDataIOManager(remote_io.GetDataIOManager())
    remote_io.AddDataIOToScene()

    app = MRMLApplication(
        scene=scene,
        app_logic=app_logic,
        volumes_logic=_register(app_logic, scene, slicer.vtkSlicerVolumesLogic(), "Volumes"),
        segmentations_logic=_register(
            app_logic, scene, slicer.vtkSlicerSegmentationsModuleLogic(), "Segmentations"
        ),
        subject_hierarchy_logic=_register(
            app_logic, scene, slicer.vtkSlicerSubjectHierarchyModuleLogic(), "SubjectHierarchy"
        ),
        remote_io=remote_io,
        data_io_logic=data_io_logic,
        cache_dir=cache_dir,
    )
    app.observer_tags = _add_subject_hierarchy_items(scene)
    return app


@pytest.fixture
def mrml_app_factory():
    """Make any number of independent applications (e.g. one to save a scene, one to read it)."""
    made: list[MRMLApplication] = []

    def factory() -> MRMLApplication:
        made.append(make_mrml_application())
        return made[-1]

    yield factory
    for app in made:
        app.close()


@pytest.fixture
def mrml_app(mrml_app_factory) -> MRMLApplication:
    """One scene with the application and module logics set up."""
    return mrml_app_factory()


@pytest.fixture
def scene(mrml_app):
    """The ``vtkMRMLScene`` of :func:`mrml_app`."""
    return mrml_app.scene
