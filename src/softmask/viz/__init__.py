"""Visualisation: figures of word-level Grad-CAM maps (computed by :mod:`softmask.eval.word_gradcam`)."""

from softmask.viz.gradcam import (
    default_layer,
    draw_gradcam,
    gradcam_figures,
    load_for_gradcam,
    save_comparison,
    save_overlays,
    upsample_map,
)

__all__ = ["default_layer", "draw_gradcam", "gradcam_figures", "load_for_gradcam", "save_comparison",
           "save_overlays", "upsample_map"]
