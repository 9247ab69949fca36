"""The one training loop shared by every training command, and its parts: schedule, distributed helpers,
checkpoints and logging."""
