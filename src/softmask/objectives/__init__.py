"""ALBEF pretraining objectives as pure functions, and the momentum feature queue.

Modules (import what you need from them; nothing is re-exported here):

- :mod:`softmask.objectives.itc`: image-text contrastive loss with momentum distillation
  (``similarities``, ``one_hot_positives``, ``id_positives``, ``itc_targets``, ``itc_loss``,
  ``soft_cross_entropy``).
- :mod:`softmask.objectives.itm`: image-text matching with in-batch hard negatives
  (``sample_hard_negatives``, ``itm_labels``, ``itm_loss``).
- :mod:`softmask.objectives.mlm`: masked language modelling with momentum distillation
  (``mask_tokens``, ``mlm_loss``).
- :mod:`softmask.objectives.queue`: ``FeatureQueue``, a ring buffer of momentum features (and
  optionally ids) kept in the module's state_dict.

Shapes: B batch, K = B + queue length candidates, E embedding size, M masked tokens, V vocabulary.
Every loss is computed in float32, also under autocast.
"""
