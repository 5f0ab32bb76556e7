"""TinyMind: the model, its config and presets; the training helpers live in model.train_utils."""
from transformers import AutoConfig, AutoModelForCausalLM

from .config import PRESETS, TinyMindConfig
from .model import TinyMindForCausalLM, TinyMindOutput, describe

AutoConfig.register("tinymind", TinyMindConfig, exist_ok=True)
AutoModelForCausalLM.register(TinyMindConfig, TinyMindForCausalLM, exist_ok=True)

__all__ = ["PRESETS", "TinyMindConfig", "TinyMindForCausalLM", "TinyMindOutput", "describe"]
