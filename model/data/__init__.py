"""The data side of TinyMind: reading MiniMind-format jsonl into training batches, and cleaning raw corpora."""
