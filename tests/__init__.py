"""TinyMind's tests, grouped so a reader sees what each kind checks:

    unit/    the algorithms against their references on tiny random configs: the model against transformers'
             Llama/Qwen3 and DeepseekV3 (MLA, MoE), LoRA against PEFT, the DPO/GRPO/distillation losses against TRL
    stages/  each training script end to end on tiny generated data (learning, bad input, resume, SIGTERM, DDP),
             the whole quick pipeline, and the golden numbers every refactor must reproduce
    tools/   data cleaning, the tokenizer, export, serving, chat, benchmarks and the demo data

`python -m pytest -m "not slow"` is CI's set; `-m slow` adds the multi-process and long end-to-end runs."""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
TOKENIZER = os.environ.get("TINYMIND_TEST_TOKENIZER", os.path.join(ROOT, "model"))  # the shipped tokenizer
