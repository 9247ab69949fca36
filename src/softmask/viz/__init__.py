"""Visualisation: figures of word-level Grad-CAM maps (computed by :mod:`softmask.eval.word_gradcam`)."""

from softmask.viz.gradcam import default_layer, gradcam_figures, save_comparison, save_overlays, upsample_map

__all__ = ["default_layer", "gradcam_figures", "save_comparison", "save_overlays", "upsample_map"]
