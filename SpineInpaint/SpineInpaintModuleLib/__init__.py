"""Helpers of the SpineInpaint Slicer module that need neither Qt nor ``slicer.app`` (tested by pytest)."""
