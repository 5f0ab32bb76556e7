"""TinyMind, the package every script shares.

    model/            the network: config.py, layers.py, model.py, mla.py, moe.py, lora.py; checkpoint.py (weight
                      files), device.py, generation.py (batched generation), inference.py (chat, serving, export)
    model/data/       datasets in MiniMind's formats, and cleaning/ (the package behind clean_data.py)
    model/training/   runtime, the one Trainer loop, the stage losses, rewards and held-out evaluations

The network never imports from data/ or training/. The names below load lazily, so `import model.data.cleaning`
does not pull in torch and transformers."""

_EXPORTS = {"PRESETS": "config", "TinyMindConfig": "config", "TinyMindForCausalLM": "model",
            "TinyMindOutput": "model", "describe": "model"}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
