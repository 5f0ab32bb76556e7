"""A reward that differs between samples of the same prompt even for the untrained nano model (share of distinct
characters), so the golden GRPO run has non-zero advantages and a loss that can move."""


def distinct_characters(completions, **kwargs):
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]  # conversational or plain
    return [len(set(text)) / max(1, len(text)) for text in texts]
