"""The CPU dtype is chosen by measuring, not by a CPU flag: bf16 only where its matmul is measurably faster."""
import json

import torch

from model import device


def fake_rates(monkeypatch, fp32: float, bf16: float, has_bf16: bool = True):
    calls = []

    def rate(shape, dtype, seconds=0.2):
        calls.append(dtype)
        return bf16 if dtype == torch.bfloat16 else fp32
    monkeypatch.setattr(device, "matmul_rate", rate)
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: has_bf16)
    return calls


def test_bf16_only_where_measured_faster_and_the_measure_is_cached(tmp_path, monkeypatch):
    cache = str(tmp_path / "cpu_dtype.json")
    calls = fake_rates(monkeypatch, fp32=290, bf16=140)  # the Intel Xeon of issue 17: avx512_bf16, yet slower
    choice, why = device.measured_cpu_dtype((2048, 512, 1408), cache)
    assert choice == "float32" and "140" in why and "290" in why and len(calls) == 2
    assert device.measured_cpu_dtype((2048, 512, 1408), cache)[0] == "float32" and len(calls) == 2  # cached
    calls = fake_rates(monkeypatch, fp32=90, bf16=400)  # an AMD EPYC
    assert device.measured_cpu_dtype((2048, 256, 704), cache)[0] == "bfloat16" and len(calls) == 2
    assert len(json.load(open(cache))) == 2
    fake_rates(monkeypatch, fp32=100, bf16=105)  # within noise: not worth bf16's rounding
    assert device.measured_cpu_dtype((64, 64, 64), cache)[0] == "float32"


def test_no_bf16_instructions_means_float32_without_a_probe(tmp_path, monkeypatch):
    calls = fake_rates(monkeypatch, fp32=1, bf16=1000, has_bf16=False)
    assert device.measured_cpu_dtype((2048, 256, 704), str(tmp_path / "c.json"))[0] == "float32" and not calls


def test_the_probe_measures_a_real_matmul():
    assert device.matmul_rate((64, 64, 64), torch.float32, seconds=0.01) > 0
