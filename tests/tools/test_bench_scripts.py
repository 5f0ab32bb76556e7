"""scripts/bench/: the SFT benchmark's padding shares are exact on a small case, the DPO benchmark's loss is DPO's
(ln 2 at step 0, live or precomputed reference), and no benchmark imports a stage script (train_*.py)."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from model import PRESETS, TinyMindConfig, TinyMindForCausalLM
from model.data.preference import IndexedPairs, collate_pairs
from model.training.frozen import frozen_copy
from model.training.preference import precompute_reference_logps
from model.training.runtime import init_runtime
from scripts.bench import bench_dpo, bench_sft
from tests import ROOT

BENCHMARKS = sorted(name[:-3] for name in os.listdir(os.path.join(ROOT, "scripts", "bench"))
                    if name.endswith(".py") and name != "__init__.py")


def test_padding_fractions_are_exact_on_a_small_case():
    fractions = bench_sft.padding_fractions([100, 100, 300, 12], max_seq_len=512, batch_size=2)
    assert fractions["pad_to_max_seq_len"] == pytest.approx(1 - 512 / 2048)
    assert fractions["packed"] == 0.0  # 512 tokens fill exactly one row
    assert fractions["conversations_per_row"] == 4.0
    demo_like = bench_sft.padding_fractions(np.random.default_rng(0).integers(20, 150, 2000), 512, 8)
    assert demo_like["packed"] < 0.05 < demo_like["pad_to_batch_max"] < demo_like["pad_to_max_seq_len"]


def test_minimind_like_lengths_stay_within_the_row():
    lengths = bench_sft.minimind_like_lengths(500, seed=1)
    assert lengths.min() >= 16 and lengths.max() <= 512
    assert 150 < np.median(lengths) < 250  # a log-normal with median 200


def test_dpo_benchmark_loss_is_ln2_at_step_0_with_either_reference():
    runtime = init_runtime("cpu", "float32", 0)
    torch.manual_seed(0)
    model = TinyMindForCausalLM(TinyMindConfig(vocab_size=64, **PRESETS["nano"]))
    pairs = IndexedPairs(bench_dpo.random_pairs(4, 16, 64, torch.Generator().manual_seed(0)))
    batch = collate_pairs([pairs[i] for i in range(len(pairs))])
    table = precompute_reference_logps(model, pairs, runtime, batch_size=2)
    model.eval()  # no dropout: the policy must be exactly the reference function
    for reference, scores in ((frozen_copy(model), None), (None, table)):
        loss, _ = bench_dpo.make_loss_fn(reference, scores)(model, batch)
        assert loss.item() == pytest.approx(math.log(2), abs=1e-5)


def test_no_benchmark_imports_a_stage_script():
    code = (f"import importlib, sys\nfor name in {BENCHMARKS!r}:\n"
            "    importlib.import_module('scripts.bench.' + name)\n"
            "print(sorted(m for m in sys.modules if m.startswith('train_')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
