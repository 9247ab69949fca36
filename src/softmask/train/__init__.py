"""The one training loop shared by every task, and its parts: schedule, distributed helpers,
checkpoints and logging."""
