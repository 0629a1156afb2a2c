"""The bridge between SpineInpaintLib and a Slicer MRML scene.

Everything here needs only the ``slicer`` MRML libraries: the Slicer application provides them, and
so does the ``slicer-core`` package outside it. Nothing here touches Qt or ``slicer.app``, so the
module logic, Slicer batch mode and the pytest suite all run the same code.

Conventions
-----------
* A :class:`~SpineInpaintLib.io.Volume` is LPS (as ITK and every file on disk); MRML nodes are RAS.
  Geometry goes through ``Volume.ijk_to_ras()`` and its inverse, nothing else.
* Surfaces produced by the library (``surface``) are LPS millimetres, like the STL files Slicer
  writes; :func:`model_node_from_polydata` turns them into RAS model nodes.
* Segments carry the standard terminology Slicer uses (SNOMED CT codes, stored in the segment's
  ``TerminologyEntry`` tag in the string form that Slicer's own serializer writes) and the label
  value they came from (tag :data:`LABEL_VALUE_TAG`), so a label map survives a round trip through
  a segmentation bit for bit, even after the user edits segments in the Segment Editor.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from SpineInpaintLib import SpineInpaintError
from SpineInpaintLib.core import io
from SpineInpaintLib.core.io import Volume

__all__ = [
    "volume_to_node", "volume_from_node", "subject_hierarchy_item", "results_folder", "parameter_node",
    "RESULTS_FOLDER_NAME",
]


#: Subject-hierarchy folder that receives every result model.
RESULTS_FOLDER_NAME = "SpineInpaint results"

# RAS <-> LPS: flip the first two axes (a rotation by 180 degrees, so no mirror).
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _slicer():
    """The ``slicer`` MRML namespace, imported late so that the library imports without it."""
    try:
        import slicer
    except ImportError:  # pragma: no cover - depends on the environment
        raise SpineInpaintError(
            "the MRML libraries are missing: run inside 3D Slicer or install slicer-core"
        ) from None
    return slicer


# --- numpy <-> vtkImageData (the axis-order conversion lives in io) ---------------------------------
def _image_data_from_array(array: np.ndarray, size_xyz: Sequence[int]):
    """A vtkImageData holding a copy of ``array`` (z, y, x) with identity geometry (the node holds it);
    its dimensions are ``size_xyz``, the array's shape reversed."""
    return io.to_vtk_image(Volume(array))


def _array_from_image_data(image) -> np.ndarray:
    """A (z, y, x) copy of the scalars of a single-component vtkImageData."""
    return io.from_vtk_image(image).array


def _vtk_matrix(matrix: np.ndarray):
    from vtkmodules.vtkCommonMath import vtkMatrix4x4

    out = vtkMatrix4x4()
    for i in range(4):
        for j in range(4):
            out.SetElement(i, j, float(matrix[i, j]))
    return out


def _numpy_matrix(matrix) -> np.ndarray:
    return np.array([[matrix.GetElement(i, j) for j in range(4)] for i in range(4)])


# --- volumes -----------------------------------------------------------------------------------
def volume_to_node(scene, volume: Volume, name: str, node=None, labelmap: bool = False):
    """Put a :class:`Volume` into the scene as a scalar (or label map) volume node.

    Parameters
    ----------
    scene
        The ``vtkMRMLScene``.
    volume
        Voxels ``(z, y, x)`` and LPS geometry; the array is copied, its dtype kept (bool as uint8).
    name
        Node name (a new node's name; an existing ``node`` is renamed to it).
    node
        Update this node instead of adding a new one (its image and geometry are replaced).
    labelmap
        Make a ``vtkMRMLLabelMapVolumeNode`` (integer voxels needed).

    Returns
    -------
    vtkMRMLScalarVolumeNode or vtkMRMLLabelMapVolumeNode
    """
    array = volume.array
    if labelmap and not (array.dtype == bool or np.issubdtype(array.dtype, np.integer)):
        raise SpineInpaintError(f"a label map needs integer voxels, got {array.dtype}")
    if not (array.dtype == bool or np.issubdtype(array.dtype, np.number)):
        raise SpineInpaintError(f"cannot put voxels of type {array.dtype} into a volume node")
    class_name = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    if node is None:
        node = scene.AddNewNodeByClass(class_name, name)
    else:
        if not node.IsA("vtkMRMLScalarVolumeNode"):
            raise SpineInpaintError(f"node '{node.GetName()}' is a {node.GetClassName()}, not a volume node")
        node.SetName(name)
    node.SetAndObserveImageData(_image_data_from_array(array, volume.size_xyz))
    node.SetIJKToRASMatrix(_vtk_matrix(volume.ijk_to_ras()))
    node.CreateDefaultDisplayNodes()
    return node


def volume_from_node(node) -> Volume:
    """Read a scalar volume node (or label map node) into a :class:`Volume` (LPS, array copied).

    A linear parent transform is applied to the geometry (as hardening it would); a non-linear one
    is refused.
    """
    if node is None or not node.IsA("vtkMRMLScalarVolumeNode"):
        what = "nothing" if node is None else f"a {node.GetClassName()}"
        raise SpineInpaintError(f"a scalar volume node is needed, got {what}")
    image = node.GetImageData()
    if image is None or image.GetPointData().GetScalars() is None:
        raise SpineInpaintError(f"volume node '{node.GetName()}' holds no image")
    if image.GetNumberOfScalarComponents() != 1:
        raise SpineInpaintError(
            f"volume node '{node.GetName()}' has {image.GetNumberOfScalarComponents()} components per "
            "voxel; a scalar (grey-value) volume is needed"
        )
    if min(image.GetDimensions()) < 1:
        raise SpineInpaintError(f"volume node '{node.GetName()}' has an empty image")
    from vtkmodules.vtkCommonMath import vtkMatrix4x4

    ijk_to_ras = vtkMatrix4x4()
    node.GetIJKToRASMatrix(ijk_to_ras)
    m = _numpy_matrix(ijk_to_ras)
    # Voxel (0, 0, 0) of the array is the image's first extent index, not always IJK 0.
    start = np.array(image.GetExtent()[::2], dtype=float)
    if start.any():
        m[:3, 3] = m[:3, :3] @ start + m[:3, 3]
    transform = node.GetParentTransformNode()
    if transform is not None:
        if not transform.IsTransformToWorldLinear():
            raise SpineInpaintError(
                f"volume node '{node.GetName()}' is under a non-linear transform; harden it first"
            )
        to_world = vtkMatrix4x4()
        transform.GetMatrixTransformToWorld(to_world)
        m = _numpy_matrix(to_world) @ m
    ijk_to_lps = _LPS_TO_RAS @ m  # the flip is its own inverse
    axes = ijk_to_lps[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    return Volume(
        array=_array_from_image_data(image),
        spacing=tuple(spacing),
        origin=tuple(ijk_to_lps[:3, 3]),
        direction=axes / spacing,
    )


def _remove_node(scene, node) -> None:
    display = node.GetDisplayNode() if hasattr(node, "GetDisplayNode") else None
    storage = node.GetStorageNode() if hasattr(node, "GetStorageNode") else None
    scene.RemoveNode(node)
    for extra in (display, storage):
        if extra is not None and extra.GetScene() is not None:
            scene.RemoveNode(extra)


# --- subject hierarchy and models ----------------------------------------------------------------
def _subject_hierarchy(scene):
    sh = _slicer().vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if sh is None:
        raise SpineInpaintError("the scene has no subject hierarchy")
    return sh


def subject_hierarchy_item(scene, node) -> int:
    """The subject-hierarchy item of a data node, made under the scene if it has none yet.

    In the Slicer application a plugin makes the item as the node is added; elsewhere (slicer-core)
    nothing does, so every function here that files a node asks for its item through this one.
    """
    sh = _subject_hierarchy(scene)
    item = sh.GetItemByDataNode(node)
    if not item:
        item = sh.CreateItem(sh.GetSceneItemID(), node)
    return int(item)


def results_folder(scene, name: str = RESULTS_FOLDER_NAME) -> int:
    """The subject-hierarchy folder ``name`` under the scene (made if missing); returns its item id."""
    sh = _subject_hierarchy(scene)
    scene_item = sh.GetSceneItemID()
    item = sh.GetItemChildWithName(scene_item, name)
    if item and sh.GetItemLevel(item) == "Folder":
        return int(item)
    return int(sh.CreateFolderItem(scene_item, name))


# --- parameter node ------------------------------------------------------------------------------
def parameter_node(scene, module_name: str = "SpineInpaint"):
    """The module's parameter node: the scene's singleton ``vtkMRMLScriptedModuleNode`` tagged with
    ``module_name`` (made if missing), found and made the way Slicer's scripted-module logic does.
    """
    node = scene.GetSingletonNode(module_name, "vtkMRMLScriptedModuleNode")
    if node is None:
        node = _slicer().vtkMRMLScriptedModuleNode()
        node.SetSingletonTag(module_name)
        node.SetName(scene.GenerateUniqueName(module_name))
        node.SetAttribute("ModuleName", module_name)
        node = scene.AddNode(node)
    elif node.GetAttribute("ModuleName") != module_name:
        node.SetAttribute("ModuleName", module_name)
    return node
