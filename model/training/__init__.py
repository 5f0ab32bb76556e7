"""The training side of TinyMind: runtime and distributed setup, the one training loop, checkpoints of a run, the
stage losses and rewards, and the held-out evaluations every stage reports."""
