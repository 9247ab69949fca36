"""A procedurally generated image-caption world for testing vision-language pretraining.

Scenes of one to four coloured, patterned shapes on varied backgrounds, with captions of several
kinds, word-to-object links, boxes, relations, the most salient object, a held-out compositional
split, and the downstream tasks (retrieval, VQA, VE, NLVR, text assignment, minimal edits) in ALBEF's
formats. Everything is a pure function of the seed.

    from softmask.world import generate_world
    summary = generate_world("data/world", images=10000, size=128, seed=0)

Modules: :mod:`~softmask.world.vocab` (attributes and words), :mod:`~softmask.world.scene` (sampling,
occlusion, relations, saliency), :mod:`~softmask.world.render` (numpy drawing), :mod:`~softmask.world.language`
(phrases, references, truth), :mod:`~softmask.world.captions`, :mod:`~softmask.world.task_items` (VQA, VE,
minimal edits), :mod:`~softmask.world.pairs` (NLVR, text assignment), :mod:`~softmask.world.generate`.
"""

from softmask.world.generate import generate_world

__all__ = ["generate_world"]
