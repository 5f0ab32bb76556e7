"""Export a TinyMind checkpoint (and a LoRA adapter) to GGUF for llama.cpp, Ollama and LM Studio.

    python -m scripts.export_gguf --load_from out/full_sft_512.pth --llama_cpp ~/llama.cpp --outfile tm.gguf
    python -m scripts.export_gguf --load_from out/full_sft_512.pth --llama_cpp ~/llama.cpp --outfile tm-f16.gguf \
        --outtype f16
    python -m scripts.export_gguf --load_from out/full_sft_512.pth --lora_name lora_identity \
        --llama_cpp ~/llama.cpp --outfile tm.gguf --lora_outfile identity.gguf     # base + adapter GGUF
    llama-cli -m tm.gguf --lora identity.gguf -cnv                               # chat with both in llama.cpp

Two steps, each done by the tool that owns the format: scripts/convert_model.py writes the transformers directory
(plain Llama/Qwen3 for dense models, DeepseekV3 for MLA; checked against our logits), then llama.cpp's own
convert_hf_to_gguf.py (convert_lora_to_gguf.py for an adapter) turns it into GGUF. --llama_cpp is a llama.cpp
checkout (`git clone https://github.com/ggml-org/llama.cpp`; its requirements/requirements-convert_hf_to_gguf.txt
lists what the converter imports: gguf-py comes with the checkout, sentencepiece has to be installed).

One thing llama.cpp does not know is our tokenizer: its converter recognises a BPE tokenizer by the hash of how it
splits a test string, and stops on an unknown one ("BPE pre-tokenizer was not recognized"). Ours splits text
exactly as GPT-2 does (a byte-level BPE, GPT-2's split regex, no prefix space, no normalizer), so we tell the
converter "gpt-2" for a tokenizer.json of that shape, from outside, without editing llama.cpp's files; any other
tokenizer still stops with llama.cpp's own message. tests/tools/test_gguf.py runs the result in llama.cpp and
compares its tokens and greedy output with ours.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

from model.training.cli import exit_on_user_error
from scripts import convert_model

# Runs in the converter's own process: llama.cpp's files first on sys.path (its gguf-py shadows any pip `gguf`), our
# pre-tokenizer rule wrapped around get_vocab_base_pre, then the converter's main() with its own arguments.
CONVERTER_BOOTSTRAP = """
import json, os, runpy, sys
llama_cpp, script, tokenizer_json = sys.argv[1:4]
sys.path[:0] = [llama_cpp, os.path.join(llama_cpp, "gguf-py")]
from conversion import base

recognised = base.TextModel.get_vocab_base_pre

def get_vocab_base_pre(self, tokenizer):
    try:
        return recognised(self, tokenizer)
    except NotImplementedError:
        with open(tokenizer_json, encoding="utf-8") as f:
            spec = json.load(f)
        split = spec.get("pre_tokenizer") or {}
        if (spec.get("normalizer") is None and split.get("type") == "ByteLevel" and split.get("use_regex", True)
                and not split.get("add_prefix_space", False)):
            return "gpt-2"
        raise

base.TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv = [os.path.join(llama_cpp, script)] + sys.argv[4:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def check_llama_cpp(directory: str) -> None:
    for name in ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "gguf-py"):
        if not os.path.exists(os.path.join(directory, name)):
            raise SystemExit(f"--llama_cpp {directory}: no {name} there; point it at a llama.cpp checkout "
                             "(git clone https://github.com/ggml-org/llama.cpp)")
    if not os.path.isdir(os.path.join(directory, "conversion")):
        raise SystemExit(f"--llama_cpp {directory}: this llama.cpp predates the conversion/ package its converter "
                         "now lives in; update the checkout (git pull)")
    try:
        import sentencepiece  # noqa: F401  (the converter imports it even for BPE tokenizers)
    except ImportError:
        raise SystemExit("llama.cpp's converter needs sentencepiece: pip install sentencepiece") from None


def check_llama_cpp_runs(hf_dir: str) -> None:
    """Refuse, before converting, what llama.cpp cannot run (measured in tests/tools/test_gguf.py)."""
    with open(os.path.join(hf_dir, "config.json")) as f:
        config = json.load(f)
    architecture = config["architectures"][0]
    if architecture not in ("LlamaForCausalLM", "Qwen3ForCausalLM", "DeepseekV3ForCausalLM"):
        raise SystemExit(f"this model exports as {architecture} (our own code): llama.cpp has no such architecture; "
                         "dense, and MLA with or without a sigmoid-routed MoE, export to GGUF")
    if architecture == "DeepseekV3ForCausalLM" and not config.get("q_lora_rank"):
        raise SystemExit("an MLA model without --q_lora_rank (queries projected at full rank) converts, but llama.cpp "
                         "refuses to load it: its deepseek2 loader requires the query's low-rank projection")


def run_converter(llama_cpp: str, script: str, hf_dir: str, arguments: list[str]) -> None:
    command = [sys.executable, "-c", CONVERTER_BOOTSTRAP, os.path.abspath(llama_cpp), script,
               os.path.join(hf_dir, "tokenizer.json"), *arguments]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"llama.cpp's {script} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load_from", required=True, help="a checkpoint (.pth) or a stage name found in --save_dir")
    parser.add_argument("--llama_cpp", required=True,
                        help="a llama.cpp checkout: its convert_hf_to_gguf.py, conversion/ and gguf-py/ are used")
    parser.add_argument("--outfile", required=True, help="the GGUF file to write (the base model)")
    parser.add_argument("--outtype", default="f32", choices=["f32", "f16", "bf16", "q8_0"],
                        help="tensor type in the GGUF: f32 keeps our weights exactly; f16/bf16 halve the file; "
                             "q8_0 quarters it (llama.cpp's 8-bit blocks)")
    parser.add_argument("--lora_name", default=None,
                        help="also export this LoRA adapter (found in <save_dir>/lora/) as a GGUF adapter: the base "
                             "GGUF stays the plain model, llama.cpp applies the adapter at load (--lora)")
    parser.add_argument("--lora_outfile", default=None,
                        help="where the adapter GGUF goes (default: <outfile without .gguf>-<lora_name>.gguf)")
    parser.add_argument("--save_dir", default="out", help="where stage names and --lora_name are looked up")
    parser.add_argument("--tokenizer_path", default=None, help="tokenizer folder (default: the checkpoint's own)")
    parser.add_argument("--hf_dir", default=None,
                        help="keep the intermediate transformers directory here (default: a temporary folder)")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    check_llama_cpp(args.llama_cpp)
    with tempfile.TemporaryDirectory(prefix="tinymind-gguf-") as scratch:
        hf_dir = args.hf_dir or os.path.join(scratch, "hf")
        export = ["--load_from", args.load_from, "--out_dir", hf_dir, "--save_dir", args.save_dir]
        export += ["--tokenizer_path", args.tokenizer_path] if args.tokenizer_path else []
        peft_dir = os.path.join(scratch, "peft")
        export += ["--lora_name", args.lora_name, "--peft_dir", peft_dir] if args.lora_name else []
        convert_model.main(export)  # writes the base (and the adapter apart) and checks both against our model
        check_llama_cpp_runs(hf_dir)
        os.makedirs(os.path.dirname(os.path.abspath(args.outfile)), exist_ok=True)
        run_converter(args.llama_cpp, "convert_hf_to_gguf.py", hf_dir,
                      [hf_dir, "--outfile", args.outfile, "--outtype", args.outtype])
        print(f"wrote {args.outfile} ({args.outtype})")
        if args.lora_name:
            lora_outfile = args.lora_outfile or f"{os.path.splitext(args.outfile)[0]}-{args.lora_name}.gguf"
            # the adapter's base is named by path: the converter looks a name up on the hub, a --base folder it reads
            run_converter(args.llama_cpp, "convert_lora_to_gguf.py", hf_dir,
                          [peft_dir, "--base", hf_dir, "--outfile", lora_outfile,
                           "--outtype", "f32" if args.outtype == "f32" else "f16"])
            print(f"wrote {lora_outfile} (LoRA adapter; load it beside {args.outfile} with llama.cpp's --lora)")


if __name__ == "__main__":
    main()
