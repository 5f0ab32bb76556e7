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


def free_port() -> int:
    """A loopback port nothing listens on right now (for torchrun's rendezvous or a test server)."""
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun(script: str, args: list, nproc: int = 2, timeout: int = 300):
    """Run a stage script under torchrun on this machine (gloo on CPU, one thread per rank) on a free port;
    returns the CompletedProcess with its output captured."""
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                           "--master_port", str(free_port()), os.path.join(ROOT, script), *args], cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=timeout)
