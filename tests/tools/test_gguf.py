"""scripts/export_gguf.py against llama.cpp itself: llama.cpp's own converter (from the llama-cpp-python source
release on PyPI, which vendors llama.cpp) writes the GGUF, and llama.cpp's prebuilt CPU build (node-llama-cpp's,
from npm) runs it. llama.cpp must split text into the same tokens as our tokenizer, pick the same greedy tokens as
our model with the same probabilities, and apply an exported LoRA adapter as our merged model does.
The tools are installed once into ~/.cache/tinymind (~170 MB); each test then takes seconds."""
import json
import os
import platform
import shutil
import subprocess

import pytest
import torch
from transformers import AutoTokenizer

from model.checkpoint import save_weights
from model.lora import apply_lora, remove_lora, save_lora
from scripts import export_gguf
from tests import ROOT, TOKENIZER
from tests.tool_cache import npm_packages, pypi_sdist_members
from tests.tools.test_convert import MLA, MOE, checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

LLAMA_CPP_PYTHON = "0.3.36"  # its vendor/llama.cpp holds the converter
NODE_LLAMA_CPP = "3.22.1"  # llama.cpp prebuilt for linux-x64 CPUs
CONVERTER_FILES = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
PROMPTS = ["<|im_start|>user\n床前明月光的下一句是什么？<|im_end|>\n<|im_start|>assistant\n",
           "To be, or not to be, that is the question:", "  spaces,\ttabs\nand 3.14159 + 42 = ?",
           "🦙 emoji and 中英 mixed text: 春眠不觉晓"]


@pytest.fixture(scope="module")
def llama_cpp():
    return pypi_sdist_members(f"llama.cpp-converter-{LLAMA_CPP_PYTHON}", "llama-cpp-python", LLAMA_CPP_PYTHON,
                              "vendor/llama.cpp", keep=CONVERTER_FILES)


@pytest.fixture(scope="module")
def llama_cpp_runner():
    if (platform.system(), platform.machine()) != ("Linux", "x86_64"):
        pytest.skip("the test runs llama.cpp's prebuilt linux-x64 build")
    folder = npm_packages(f"node-llama-cpp-{NODE_LLAMA_CPP}", f"node-llama-cpp@{NODE_LLAMA_CPP}",
                          f"@node-llama-cpp/linux-x64@{NODE_LLAMA_CPP}")
    script = os.path.join(folder, "llama_cpp_generate.mjs")  # node resolves node_modules from the script's folder
    shutil.copyfile(os.path.join(ROOT, "tests", "tools", "fixtures", "llama_cpp_generate.mjs"), script)

    def run(model_path, lora=None, max_new_tokens=12):
        request = {"model": str(model_path), "lora": str(lora) if lora else None, "prompts": PROMPTS,
                   "max_new_tokens": max_new_tokens}
        result = subprocess.run(["node", script, json.dumps(request)], capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(result.stdout.strip().splitlines()[-1])
    return run


def peaked(model):
    """Random weights give near-uniform next-token probabilities, where rounding alone could flip a greedy choice:
    a sharper output layer makes each step's winner clear."""
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    return model


@torch.no_grad()
def our_greedy(model, tokenizer, max_new_tokens=12):
    """Per prompt: our tokens, our greedy continuation (stopping at <|im_end|> as llama.cpp stops at its end of
    generation tokens) and the probability of each chosen token."""
    results = []
    for text in PROMPTS:
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids, generated, probabilities = torch.tensor([tokens]), [], []
        while len(generated) < max_new_tokens:
            step = model(ids).logits[0, -1].float().softmax(-1)
            token = int(step.argmax())
            generated.append(token)
            probabilities.append(float(step[token]))
            if token in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")):
                break
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        results.append({"tokens": tokens, "generated": generated, "probabilities": probabilities})
    return results


def assert_same_run(theirs, ours, probability_tolerance):
    for their, our, prompt in zip(theirs, ours, PROMPTS):
        assert their["tokens"] == our["tokens"], prompt
        assert their["generated"] == our["generated"], prompt
        assert their["probabilities"] == pytest.approx(our["probabilities"], abs=probability_tolerance), prompt


def save_peaked(tmp_path, name, **settings):
    model, _ = checkpoint(tmp_path, len(AutoTokenizer.from_pretrained(TOKENIZER)), name=name, **settings)
    peaked(model)
    save_weights(model, str(tmp_path / f"{name}.pth"))
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("name, settings, outtype, tolerance", [
    ("llama", dict(), "f32", 1e-4),
    ("llama", dict(), "f16", 2e-2),  # half-precision weights: same tokens, probabilities within rounding
    ("qwen3", dict(use_qk_norm=True), "f32", 1e-4),
    # MLA exports as DeepseekV3, which llama.cpp runs as deepseek2; llama.cpp needs the query's low-rank
    # projection (q_lora_rank), as every DeepSeek-V3 has: without it the GGUF does not load (docs/serving_and_export.md)
    ("deepseek2", dict(MLA, q_lora_rank=32), "f32", 1e-4),
])
def test_gguf_runs_in_llama_cpp_as_in_ours(tmp_path, llama_cpp, llama_cpp_runner, name, settings, outtype, tolerance):
    model = save_peaked(tmp_path, "full_sft_64", **settings)
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    gguf = tmp_path / f"{name}-{outtype}.gguf"
    export_gguf.main(["--load_from", str(tmp_path / "full_sft_64.pth"), "--llama_cpp", llama_cpp,
                      "--outfile", str(gguf), "--outtype", outtype, "--tokenizer_path", TOKENIZER])
    assert_same_run(llama_cpp_runner(gguf), our_greedy(model, tokenizer), tolerance)


@pytest.mark.slow
def test_lora_adapter_gguf_applies_in_llama_cpp_as_our_merged_model(tmp_path, llama_cpp, llama_cpp_runner):
    base = save_peaked(tmp_path, "full_sft_64")
    adapted = apply_lora(base, r=4, alpha=8, verbose=False)
    with torch.no_grad():
        for key, p in adapted.named_parameters():
            if "lora_B" in key:
                p.normal_(std=0.3)
    save_lora(adapted, tmp_path / "lora" / "lora_x_64.pth")
    merged = remove_lora(adapted, merge=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    export_gguf.main(["--load_from", str(tmp_path / "full_sft_64.pth"), "--llama_cpp", llama_cpp, "--outfile",
                      str(tmp_path / "base.gguf"), "--lora_name", "lora_x", "--save_dir", str(tmp_path),
                      "--tokenizer_path", TOKENIZER])
    ours = our_greedy(merged, tokenizer)
    # llama.cpp adds the adapter's x·A·B beside the base matmul where ours was merged into W: 1e-3 relative apart
    assert_same_run(llama_cpp_runner(tmp_path / "base.gguf", lora=tmp_path / "base-lora_x.gguf"), ours, 5e-4)
    plain = llama_cpp_runner(tmp_path / "base.gguf")  # without --lora llama.cpp runs the unadapted base
    assert [r["generated"] for r in plain] != [r["generated"] for r in ours]


def test_a_folder_without_llama_cpps_converter_is_named(tmp_path):
    with pytest.raises(SystemExit, match="no convert_hf_to_gguf.py there"):
        export_gguf.main(["--load_from", "x.pth", "--llama_cpp", str(tmp_path), "--outfile", "x.gguf"])


@pytest.mark.parametrize("settings, refusal", [(dict(MLA), "without --q_lora_rank"),
                                               (dict(MOE), "llama.cpp has no such architecture")])
def test_what_llama_cpp_cannot_run_is_refused_before_converting(tmp_path, settings, refusal):
    """A converter run would succeed (MLA without q_lora_rank) or fail deep in llama.cpp (our own architecture)."""
    checkpoint(tmp_path, len(AutoTokenizer.from_pretrained(TOKENIZER)), **settings)
    llama_cpp = tmp_path / "llama.cpp"
    for name in ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "gguf-py", "conversion"):
        (llama_cpp / name).mkdir(parents=True)
    with pytest.raises(SystemExit, match=refusal):
        export_gguf.main(["--load_from", str(tmp_path / "full_sft_64.pth"), "--llama_cpp", str(llama_cpp),
                          "--outfile", str(tmp_path / "x.gguf"), "--tokenizer_path", TOKENIZER])
    assert not (tmp_path / "x.gguf").exists()
