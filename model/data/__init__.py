"""The data side of TinyMind: reading MiniMind's jsonl (and the formats other tools write: formats.py) into training
batches, and cleaning raw corpora."""
