"""scripts/bench/gpu.py, the one prepared GPU run, and its table: a failing or overrunning section costs only itself,
the recipe projection's arithmetic, the synthetic MiniMind-shaped files, the markdown; and (slow) the whole dry run
on the CPU at tiny shapes, every section with figures."""
import json
import math
import os
import subprocess
import sys
import time
import types

import pytest
import torch

from scripts.bench import gpu, gpu_to_table
from tests import ROOT


def test_a_failing_or_overrunning_section_costs_only_itself(tmp_path):
    def fine(ctx, out):
        out["tokens_per_sec"] = 1.0

    def boom(ctx, out):
        out["partial"] = 2.0
        raise ValueError("no such kernel")

    def exits(ctx, out):  # bench_train's MiniMind run exits like this when MiniMind's trainer fails
        raise SystemExit("error: MiniMind's trainer did not run to the end")

    def slow(ctx, out):
        out["eager"] = 3.0
        time.sleep(30)
        out["compiled"] = 4.0

    sections = {"boom": (boom, 5), "exits": (exits, 5), "slow": (slow, 1), "fine": (fine, 5)}
    report, output = {"sections": {}}, str(tmp_path / "bench.json")
    ctx = types.SimpleNamespace(device=torch.device("cpu"))
    start = time.perf_counter()
    gpu.run_sections(ctx, sections, list(sections), report, output)
    assert time.perf_counter() - start < 15  # the slow section was stopped at its deadline, not slept out
    written = json.load(open(output))["sections"]
    assert written["boom"]["status"] == "error" and "ValueError: no such kernel" in written["boom"]["error"]
    assert written["boom"]["results"] == {"partial": 2.0}
    assert written["exits"]["status"] == "error" and "SystemExit" in written["exits"]["error"]
    assert written["slow"]["status"] == "timeout" and written["slow"]["results"] == {"eager": 3.0}
    assert written["fine"]["status"] == "ok" and written["fine"]["results"] == {"tokens_per_sec": 1.0}


def test_time_an_early_section_leaves_goes_to_the_later_ones(tmp_path):
    sections = {"quick": (lambda ctx, out: None, 10), "next": (lambda ctx, out: None, 10)}
    report = {"sections": {}}
    gpu.run_sections(types.SimpleNamespace(device=torch.device("cpu")), sections, ["quick", "next"], report,
                     str(tmp_path / "bench.json"))
    # its own 10 s and what the first left: most of its 10 s (the bookkeeping between sections, a garbage collection
    # of a long test session's heap included, took over a second once in CI, so "nearly all" is not asserted)
    assert report["sections"]["next"]["budget_s"] > 15


def test_recipe_arithmetic():
    assert gpu.parse_describe("pretrain: 1,234 samples, 39 steps/epoch, 200 steps (batch 32 x accum 1 x 1 ranks)") \
        == {"samples": 1234, "steps_per_epoch": 39}
    assert gpu.parse_describe("grpo: 2,080 prompts, 3 optimizer steps: 8 prompts x 8 completions") == {"prompts": 2080}
    assert gpu.parse_describe("step 10/200 | loss 3.2") is None
    records = [{"step": 10, "elapsed": 5.0, "tokens_per_sec": 100.0}, {"step": 20, "elapsed": 6.0,
                                                                      "tokens_per_sec": 300.0, "mfu": 0.4},
               {"step": 30, "elapsed": 7.5, "tokens_per_sec": 500.0, "mfu": 0.5}, {"eval/val_loss": 2.0}]
    timing = gpu.steps_per_second_from_log(records)
    assert timing["s_per_step"] == pytest.approx(0.125) and timing["logged_steps"] == 30
    assert timing["tokens_per_sec"] == pytest.approx(400.0) and timing["mfu"] == pytest.approx(0.45)
    params = {"epochs": 2, "max_steps": -1, "batch_size": 16, "accumulation_steps": 1, "num_iterations": None}
    assert gpu.full_recipe_steps(params, {"steps_per_epoch": 39}, scale=50) == 39 * 50 * 2
    assert gpu.full_recipe_steps(dict(params, max_steps=2000), {"steps_per_epoch": 39}, scale=50) == 2000
    grpo = {"epochs": 1, "max_steps": -1, "batch_size": 8, "accumulation_steps": 1, "num_iterations": 2}
    assert gpu.full_recipe_steps(grpo, {"prompts": 2080}, scale=1.0) == 2080 // 8 * 2


def test_projection_adds_the_stages_and_the_zero_recipe():
    params = {"epochs": 2}
    out = {"stages": {"pretrain": {"projected_s": 3600.0, "full_steps": 100},
                      "sft": {"projected_s": 1800.0, "full_steps": 200, "setup_s": 0.0, "s_per_step": 8.0,
                              "params": params},
                      "grpo": {"status": "not run: out of time"}},
           "tokenize": {"pretrain_hq.jsonl": {"projected_s": 360.0}, "sft_mini_512.jsonl": {"projected_s": 240.0}}}
    result = gpu.projection(out)
    assert result["projected_hours"] == pytest.approx((3600 + 1800 + 600) / 3600)
    assert result["zero_recipe_minutes"] == pytest.approx((3600 + 100 * 8.0 + 600) / 60)  # one epoch of SFT
    assert "grpo" in result["projected_missing_stages"] and "pretrain" not in result["projected_missing_stages"]


def test_synthetic_files_have_minimind_names_and_shapes(tmp_path):
    sizes = gpu.write_minimind_files(str(tmp_path), {"pretrain_hq.jsonl": 0.05, "sft_mini_512.jsonl": 0.05,
                                                     "dpo.jsonl": 0.02, "r1_mix_1024.jsonl": 0.02})
    assert sorted(os.listdir(tmp_path)) == sorted(gpu.MINIMIND_FILE_MB)  # and no _val.jsonl twins
    assert sizes["pretrain_hq.jsonl"] >= 0.05
    texts = [row["text"] for row in gpu.read_jsonl(str(tmp_path / "pretrain_hq.jsonl"))]
    assert all(t.startswith("<|im_start|>") and t.endswith("<|im_end|>") and len(t) < 540 for t in texts)
    assert len(set(texts)) == len(texts)  # mixtures of lines: the cleaning stage's dedup keeps them
    for row in gpu.read_jsonl(str(tmp_path / "sft_mini_512.jsonl")):
        roles = [m["role"] for m in row["conversations"]]
        assert roles and roles == ["user", "assistant"] * (len(roles) // 2)
    assert all({"chosen", "rejected"} <= set(row) for row in gpu.read_jsonl(str(tmp_path / "dpo.jsonl")))


def test_plain_makes_the_report_json_ready():
    assert gpu.plain({"dtype": torch.bfloat16, "nan": float("nan"), "t": (1, 2)}) == \
        {"dtype": "bfloat16", "nan": None, "t": [1, 2]}


def sample_report() -> dict:
    """A report of the shape gpu.py writes, with made-up figures."""
    train = {"useful_tok_s": 400000.0, "all_tok_s": 400000.0, "pad_fraction": 0.0, "mfu": 0.41, "peak_mem_gb": 9.1,
             "warmup_s": 41.0, "of_measured_matmul": 0.5}
    ok = {"status": "ok", "seconds": 1.0}
    return {"command": "python -m scripts.bench.gpu", "started": "2026-01-01T00:00:00+00:00", "device": "cuda",
            "tiny": False, "sections": {
                "machine": {**ok, "results": {"gpu": "NVIDIA H200", "torch": "2.11.0", "cuda": "13.0",
                                              "matmul_tflops_measured": 790.0, "peak_flops_spec": 989e12,
                                              "flash_sdpa": "runs", "git_commit": "abcdef0123"}},
                "pretrain_small": {**ok, "results": {"preset": "small", "params_m": 25.8, "batch": 32, "seq_len": 512,
                                                     "packed_bf16": train, "packed_bf16_compile": train}},
                "pretrain_base": {"status": "timeout", "seconds": 80, "error": "stopped at its deadline",
                                  "results": {"preset": "base", "params_m": 104.0, "packed_bf16": train}},
                "minimind": {**ok, "results": {
                    "minimind_style": dict(train, useful_tok_s=100000.0, pad_fraction=0.4, dtype="bfloat16"),
                    "minimind_style_source": "our re-implementation", "ours": dict(train, dtype="bfloat16"),
                    "minimind_own_error": "SystemExit: error: MiniMind's trainer did not run to the end:\nNo module",
                    "compared_with": "minimind_style"}},
                "sft": {**ok, "results": {"preset": "small", "max_seq_len": 512,
                                          "packed": {"tokens_per_sec": 9.0e4, "pad_share": 0.02},
                                          "pad_to_max_seq_len": {"tokens_per_sec": 3.0e4, "pad_share": 0.6},
                                          "packed_vs_pad_to_max_seq_len": 3.0}},
                "dpo": {"status": "error", "seconds": 2, "error": "Traceback...\nRuntimeError: CUDA out of memory",
                        "results": {}},
                "grpo": {**ok, "results": {"prompts": 8, "generations": 8, "new_tokens": 256,
                                           "batched_tokens_per_sec": 9000.0, "sequential_tokens_per_sec": 300.0}},
                "distill": {**ok, "results": {"student": "small", "teacher": "base", "batch": 16, "seq_len": 1024,
                                              "sft_step": {"step_s": 0.1, "tokens_per_sec": 1.6e5},
                                              "distill_step": {"step_s": 0.15, "tokens_per_sec": 1.1e5}}},
                "decode": {**ok, "results": {"preset": "small", "new_tokens": 128,
                                             **{a: {"kv_bytes_per_token_per_layer": 512, "batch_1_tokens_per_sec": 200,
                                                    "batch_64_tokens_per_sec": 9000} for a in ("MHA", "GQA", "MLA")}}},
                "moe": {**ok, "results": {"batch": 32, "seq_len": 512, "moe_vs_dense_step_time": 1.8,
                                          "dense": {"active_params_m": 20, "params_m": 20, "tokens_per_sec": 5e5},
                                          "moe": {"active_params_m": 20, "params_m": 35, "tokens_per_sec": 2.8e5}}},
                "recipe": {**ok, "results": {
                    "stages": {"clean": {"projected_s": 300.0}, "pretrain": {"logged_steps": 200, "s_per_step": 0.05,
                                                                             "setup_s": 9.0, "full_steps": 90000,
                                                                             "projected_s": 4509.0, "returncode": 0},
                               "lora": {"status": "not run: out of time"}},
                    "tokenize": {"pretrain_hq.jsonl": {"seconds": 3.0, "mb": 32, "projected_s": 150.0}},
                    "projected_hours": 1.38, "zero_recipe_minutes": 80.0, "projected_missing_stages": ["lora"],
                    "note": "how it was projected"}}}}


def test_the_table_shows_every_section_and_what_stopped_it():
    markdown = gpu_to_table.to_markdown(sample_report())
    for expected in ["NVIDIA H200", "790 TFLOP/s", "| small, 25.8M | torch.compile | 400,000 | 41.0% |",
                     "*pretrain_base: timeout: stopped at its deadline*", "| base, 104.0M | eager |",
                     "| MiniMind-style padded loop (our re-implementation) | bfloat16 | 100,000 | 40.0% |", "4.00x",
                     "MiniMind's own trainer failed: No module", "| packed | 90,000 | 2.0% | 1.00x |",
                     "3.00x", "*dpo: error: RuntimeError: CUDA out of memory*",
                     "| one batched KV-cached generate | 9,000 |", "| distillation | 110,000 | 0.150 |",
                     "tokens/s, batch 64", "| MLA | 512 | 200 | 9,000 |",
                     "MoE step time 1.80x dense", "| pretrain | 200 | 0.050 |", "whole recipe 1.38 h",
                     "80 min", "not measured: lora", "| lora |", "not run: out of time"]:
        assert expected in markdown, expected
    assert all(len(line) < 400 for line in markdown.splitlines())


def test_the_table_reads_a_run_and_its_rerun(tmp_path, capsys):
    run, rerun = tmp_path / "run.json", tmp_path / "rerun.json"
    run.write_text(json.dumps(sample_report()))
    dpo = {"pairs_per_step": 16, "seq_len": 1024, "live": {"step_s": 0.2, "peak_mb": 9000.0},
           "precomputed": {"step_s": 0.15, "peak_mb": 8000.0}}
    rerun.write_text(json.dumps({"sections": {"dpo": {"status": "ok", "results": dpo},
                                              "grpo": {"status": "error", "error": "x", "results": {}}}}))
    gpu_to_table.main([str(run), str(rerun)])
    markdown = capsys.readouterr().out
    assert "| MHA | 512 |" in markdown and "| live | 0.200 | 9,000 |" in markdown and "out of memory" not in markdown
    assert "| one batched KV-cached generate | 9,000 |" in markdown  # a failed rerun does not replace a result


@pytest.mark.slow
def test_the_dry_run_fills_every_section_with_figures(tmp_path):
    """`--device cpu --tiny`, as the issue's dry run, with two recipe stages (the pipeline test runs them all):
    every section ends ok and holds numbers, and the table shows each."""
    output = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "-m", "scripts.bench.gpu", "--device", "cpu", "--tiny", "--output",
                           str(output), "--recipe_stages", "pretrain,sft", "--budget_scale", "6"],
                          cwd=ROOT, capture_output=True, text=True, timeout=3000,
                          env=dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="2"))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads(output.read_text())
    assert list(report["sections"]) == list(gpu.SECTIONS)

    def numbers(value):
        if isinstance(value, dict):
            return [n for v in value.values() for n in numbers(v)]
        if isinstance(value, list):
            return [n for v in value for n in numbers(v)]
        return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else []

    for name, entry in report["sections"].items():
        assert entry["status"] == "ok", (name, entry.get("error"), entry.get("traceback"))
        assert numbers(entry["results"]) and all(math.isfinite(n) for n in numbers(entry["results"])), name
    recipe = report["sections"]["recipe"]["results"]
    for stage in ("clean", "tokenizer", "pretrain", "sft"):
        assert recipe["stages"][stage]["projected_s"] > 0, stage
    assert recipe["zero_recipe_minutes"] > 0
    markdown = gpu_to_table.to_markdown(report)
    assert "*" + "not run*" not in markdown and "Tiny shapes" in markdown
