"""Visualisation: word-level Grad-CAM maps of the ITM match logit and their figures."""

from softmask.viz.gradcam import (
    default_layer,
    gradcam_figures,
    group_words,
    save_comparison,
    save_overlays,
    upsample_map,
    vocab_strings,
    word_gradcam,
)

__all__ = ["default_layer", "gradcam_figures", "group_words", "save_comparison", "save_overlays", "upsample_map",
           "vocab_strings", "word_gradcam"]
