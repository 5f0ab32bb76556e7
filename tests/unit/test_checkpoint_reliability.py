"""Issue 18, checkpoints: a damaged or foreign file is refused with an error that names it and says what is wrong
(D6), and saves leave no temp files behind, not on a full disk, not after a kill (D10).

The errors are checked as BadInput, the class the stages' exit_on_user_error turns into one `error: ...` line."""
import errno
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import time
import zipfile

import pytest
import torch

import eval_model
import tests.stages.test_pretrain as pretrain_test  # as a module: its test functions must not be collected twice
import train_pretrain
from model import checkpoint
from model.checkpoint import load_state_into, load_weights, save_weights
from model.files import atomic_torch_save, atomic_write_text, process_start_time
from model.config import TinyMindConfig
from model.data.jsonl import BadInput
from model.lora import apply_lora, load_lora, save_lora
from model.model import TinyMindForCausalLM
from scripts import convert_model
from tests import ROOT, TOKENIZER

NANO = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def nano(vocab_size=100, seed=0, **overrides):
    torch.manual_seed(seed)
    return TinyMindForCausalLM(TinyMindConfig(vocab_size=vocab_size, **{**NANO, **overrides}))


def test_save_weights_records_the_stage_and_never_passes_an_inherited_one_on(tmp_path):
    """The stage goes into the config JSON (chat and serving pick their mode from it); a config loaded from the
    previous stage's weights (SFT starts from pretrain's) must not label the new weights with that stage."""
    model = nano()
    save_weights(model, str(tmp_path / "a_64.pth"), stage="pretrain")
    _, config = load_weights(str(tmp_path / "a_64.pth"))
    assert config.tinymind_stage == "pretrain" and checkpoint.recorded_stage(config) == "pretrain"
    assert checkpoint.recorded_stage(model.config) is None  # the model in memory is left as it was
    inherited = TinyMindForCausalLM(config)
    save_weights(inherited, str(tmp_path / "b_64.pth"))
    assert checkpoint.STAGE_KEY not in (tmp_path / "b_64.json").read_text()
    assert checkpoint.recorded_stage(inherited.config) == "pretrain"
    save_weights(inherited, str(tmp_path / "c_64.pth"), stage="full_sft")
    assert checkpoint.recorded_stage(load_weights(str(tmp_path / "c_64.pth"))[1]) == "full_sft"


@pytest.fixture
def weights(tmp_path):
    path = str(tmp_path / "full_sft_64.pth")
    save_weights(nano(), path)
    return path


def damage(path, how):
    data = open(path, "rb").read()
    blob = {"zero bytes": b"", "random bytes": os.urandom(4096), "text": b"not a checkpoint\n",
            "truncated 1%": data[:len(data) // 100], "truncated 50%": data[:len(data) // 2],
            "truncated by 1 byte": data[:-1]}[how]
    with open(path, "wb") as f:
        f.write(blob)
    return len(blob)


class RunsCode:
    """Unpickling this calls os.system: what a booby-trapped .pth does to torch.load(weights_only=False)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ============================================================================================ D6: loading


@pytest.mark.parametrize("how", ["zero bytes", "random bytes", "text", "truncated 1%", "truncated 50%",
                                 "truncated by 1 byte"])
def test_a_damaged_weight_file_is_named_with_what_is_wrong(weights, how):
    size = damage(weights, how)
    expected = "is empty" if size == 0 else rf"is not a complete PyTorch checkpoint \(truncated or corrupt; {size:,}"
    with pytest.raises(BadInput, match=rf"^{re.escape(weights)} {expected}.*: delete it or retrain") as error:
        load_weights(weights)
    assert "weights_only" not in str(error.value)


@pytest.mark.parametrize("inside_a_zip", [False, True], ids=["pickle", "torch-zip"])
def test_a_pickle_that_would_run_code_is_refused_without_running_it(weights, tmp_path, inside_a_zip):
    marker = tmp_path / "ran"
    if inside_a_zip:  # a real torch checkpoint whose data.pkl was swapped for the payload
        source = zipfile.ZipFile(weights)
        items = [(item, source.read(item.filename)) for item in source.infolist()]
        with zipfile.ZipFile(weights, "w") as target:
            for item, data in items:
                target.writestr(item, pickle.dumps({"x": RunsCode(marker)}, protocol=2)
                                if item.filename.endswith("data.pkl") else data)
    else:
        with open(weights, "wb") as f:
            pickle.dump(RunsCode(marker), f, protocol=2)
    refused = r"holds a Python object that is not a tensor \(posix.system\): refused unread, since loading it could run"
    with pytest.raises(BadInput, match=rf"^{re.escape(weights)} {refused}") as error:
        load_weights(weights)
    assert not marker.exists() and "weights_only" not in str(error.value)


def test_a_torch_file_that_is_not_weights_is_refused(weights, tmp_path):
    torch.save([1, 2, 3], weights)
    with pytest.raises(BadInput, match=rf"^{re.escape(weights)} is a PyTorch file but not model weights \(a list\)"):
        load_weights(weights)
    adapter = str(tmp_path / "adapter.pth")
    save_lora(apply_lora(nano(), r=4, alpha=8, verbose=False), adapter)
    with pytest.raises(BadInput, match=rf"^{re.escape(adapter)} is a LoRA adapter, not model weights: pass it as"):
        load_weights(adapter)


@pytest.mark.parametrize("text, reason", [
    ('{"hidden_size": 64,', r"is not valid JSON \(JSONDecodeError"),
    ("", r"is not valid JSON \(empty\)"),
    ("[1, 2]", r"is not a model config \(a JSON list, not an object\)"),
    ('{"hidden_size": "big"}', "hidden_size is 'big', not a positive integer"),
    ('{"num_attention_heads": 0}', "num_attention_heads is 0, not a positive integer"),
    ('{"model_type": "llama"}', "describes a 'llama' model, not a TinyMind one"),
], ids=["truncated", "empty", "list", "string-size", "zero-heads", "other-model"])
def test_a_malformed_config_json_is_named(weights, text, reason):
    config_file = checkpoint.config_path_for(weights)
    with open(config_file, "w") as f:
        f.write(text)
    with pytest.raises(BadInput, match=rf"^{re.escape(config_file)}:? {reason}"):
        load_weights(weights)


def test_weights_without_their_config_json_say_that_it_is_missing(weights):
    os.remove(checkpoint.config_path_for(weights))
    state, config = load_weights(weights)
    assert config is None
    config_file = checkpoint.config_path_for(weights)
    with pytest.raises(BadInput, match=rf"^checkpoint {re.escape(weights)} does not fit this model config: its "
                                       rf"config JSON {re.escape(config_file)} is missing, so the model was built"):
        load_state_into(nano(hidden_size=128), state, weights)


def test_a_damaged_resume_file_is_named(weights, tmp_path):
    resume = str(tmp_path / "full_sft_64_resume.pth")
    atomic_torch_save({"model": nano().state_dict(), "optimizer": {}, "scaler": {}, "train_state": {}, "rng": {}},
                      resume)
    assert set(checkpoint.load_resume_checkpoint(resume)) == set(checkpoint.RESUME_KEYS)
    size = damage(resume, "truncated 50%")
    with pytest.raises(BadInput, match=rf"^{re.escape(resume)} is not a complete PyTorch checkpoint \(truncated or "
                                       rf"corrupt; {size:,} bytes\): delete it to start the run from scratch"):
        checkpoint.load_resume_checkpoint(resume)
    with pytest.raises(BadInput, match=rf"^{re.escape(weights)} is not a resume checkpoint \(it has no model, "):
        checkpoint.load_resume_checkpoint(weights)  # plain weights copied over the resume file


def test_a_damaged_or_foreign_lora_adapter_is_named(tmp_path):
    adapter = str(tmp_path / "adapter.pth")
    save_lora(apply_lora(nano(), r=4, alpha=8, verbose=False), adapter)
    with pytest.raises(BadInput, match=rf"^{re.escape(adapter)} is not a LoRA adapter for this model: .*LoRA r=8"):
        load_lora(apply_lora(nano(), r=8, alpha=8, verbose=False), adapter)  # another rank
    with pytest.raises(BadInput, match=rf"^{re.escape(adapter)} is not a LoRA adapter for this model: .*shape"):
        load_lora(nano(hidden_size=128), adapter)  # another model's width
    size = damage(adapter, "truncated 50%")
    with pytest.raises(BadInput, match=rf"^{re.escape(adapter)} is not a complete PyTorch checkpoint .*{size:,} bytes"):
        load_lora(nano(), adapter)


# ================================================================================ D6: through the entry points


def test_stages_chat_and_export_end_with_one_error_line_naming_the_file(tmp_path, tokenizer, capsys):
    """What a user sees: SystemExit('error: <file> ...') from exit_on_user_error, or from the inference loader
    that chat, serving, the benchmark and the exporter share, instead of torch's traceback."""
    out = tmp_path / "out"
    weights = str(out / "pretrain_64.pth")
    save_weights(nano(len(tokenizer)), weights)
    size = damage(weights, "truncated 50%")
    damaged = rf"error: {re.escape(weights)} is not a complete PyTorch checkpoint \(truncated or corrupt; {size:,}"
    with pytest.raises(SystemExit, match=damaged):
        train_pretrain.main(pretrain_test.base_args(tmp_path, steps=1, extra=["--from_weight", weights]))
    with pytest.raises(SystemExit, match=damaged):
        eval_model.main(["--load_from", weights, "--tokenizer_path", TOKENIZER, "--device", "cpu", "--prompts",
                         "builtin", "--max_new_tokens", "1"])
    with pytest.raises(SystemExit, match=damaged):
        convert_model.main(["--load_from", weights, "--out_dir", str(tmp_path / "export")])

    # a config JSON from another run beside good weights: the mismatch stays a clear error
    save_weights(nano(len(tokenizer)), weights)
    with open(checkpoint.config_path_for(weights), "w") as f:
        f.write(TinyMindConfig(vocab_size=len(tokenizer), **{**NANO, "num_hidden_layers": 3}).to_json_string())
    with pytest.raises(SystemExit, match=rf"error: checkpoint {re.escape(weights)} does not fit this model config:\n"):
        train_pretrain.main(pretrain_test.base_args(tmp_path, steps=1, extra=["--from_weight", weights]))

    # an exported directory whose safetensors file was cut short, imported back
    save_weights(nano(len(tokenizer)), weights)
    convert_model.main(["--load_from", weights, "--out_dir", str(tmp_path / "export"), "--verify", "0"])
    tensors = tmp_path / "export" / "model.safetensors"
    size = damage(str(tensors), "truncated 50%")
    with pytest.raises(SystemExit, match=rf"error: {re.escape(str(tensors))} is not a complete safetensors file "
                                         rf"\(truncated or corrupt; {size:,} bytes\)"):
        convert_model.main(["--load_from", str(tmp_path / "export"), "--to_pth", str(tmp_path / "back.pth")])
    assert "Traceback" not in capsys.readouterr().err


# ============================================================================================ D10: saving


def write_half_then_fail(error):
    """A torch.save that writes half of the file, then fails as a full disk (or Ctrl-C) does."""
    real_save = torch.save

    def save(obj, f):
        import io
        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[:buffer.tell() // 2])
        raise error
    return save


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk-full", "ctrl-c"])
def test_a_failed_save_removes_its_temp_file_and_keeps_the_previous_one(tmp_path, monkeypatch, error):
    path = str(tmp_path / "pretrain_64.pth")
    save_weights(nano(seed=1), path)
    before = torch.load(path, weights_only=True)
    monkeypatch.setattr(torch, "save", write_half_then_fail(error))
    with pytest.raises(type(error)) as raised:
        save_weights(nano(seed=2), path)
    assert sorted(os.listdir(tmp_path)) == ["pretrain_64.json", "pretrain_64.pth"]  # no half-written temp file
    if isinstance(error, OSError):  # still a disk-full error, now naming the file
        assert raised.value.errno == errno.ENOSPC and path in str(raised.value)
    after = torch.load(path, weights_only=True)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_failed_text_save_removes_its_temp_file(tmp_path, monkeypatch):
    path = str(tmp_path / "pretrain_64.json")
    atomic_write_text("old", path)

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="No space left on device"):
        atomic_write_text("new" * 1000, path)
    assert os.listdir(tmp_path) == ["pretrain_64.json"] and open(path).read() == "old"


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_the_sweep_removes_temps_of_killed_saves_only(tmp_path):
    host, me = socket.gethostname(), os.getpid()
    (tmp_path / "lora").mkdir()
    names = {
        "dead writer": f"pretrain_64.pth.tmp.{host}.{dead_pid()}",
        "older naming, dead writer": f"pretrain_64.json.tmp.{dead_pid()}",
        "LoRA's naming, dead writer": f"lora/lora_identity_64.pth.tmp{dead_pid()}",
        "pid reused by a later process": f"full_sft_64.pth.tmp.{host}.{me}",
        "running writer": f"dpo_64.pth.tmp.{host}.{me}",
        "another host's writer": f"dpo_64.pth.tmp.elsewhere.{dead_pid()}",
        "not a temp file": "pretrain_64.pth",
        "not a checkpoint's temp": f"notes.txt.tmp.{host}.{dead_pid()}",
    }
    for name in names.values():
        (tmp_path / name).write_bytes(b"x" * 100)
    long_ago = time.time() - 10 * 365 * 86400  # before this process started: written by an earlier owner of its pid
    os.utime(tmp_path / names["pid reused by a later process"], (long_ago, long_ago))
    stale = ["dead writer", "older naming, dead writer", "LoRA's naming, dead writer", "pid reused by a later process"]
    if process_start_time(me) is None:  # no /proc: a reused pid cannot be told apart, so it is kept
        stale.remove("pid reused by a later process")
    removed = checkpoint.sweep_stale_temp_files(str(tmp_path))
    assert sorted(removed) == sorted(str(tmp_path / names[k]) for k in stale)
    assert all((tmp_path / names[k]).exists() for k in names if k not in stale)


def test_a_save_removes_the_temps_killed_saves_of_the_same_file_left(tmp_path):
    path = str(tmp_path / "pretrain_64.pth")
    leftover = tmp_path / f"pretrain_64.pth.tmp.{socket.gethostname()}.{dead_pid()}"
    leftover.write_bytes(b"x" * 1000)
    atomic_torch_save({"a": torch.zeros(2)}, path)
    assert os.listdir(tmp_path) == ["pretrain_64.pth"]


@pytest.mark.slow  # a second process, to kill
def test_a_save_killed_mid_write_is_swept(tmp_path):
    """kill -9 cannot be cleaned up after by the process itself: the next run's sweep does it."""
    path = str(tmp_path / "pretrain_64.pth")
    code = ("import time, torch; from model.files import atomic_torch_save\n"
            "def save(obj, f):\n    f.write(b'x' * 100000); f.flush(); print('writing', flush=True); time.sleep(120)\n"
            f"torch.save = save; atomic_torch_save({{}}, {path!r})")
    writer = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "writing"
        writer.send_signal(signal.SIGKILL)
    finally:
        writer.wait(timeout=60)
    assert [name.split(".tmp.")[0] for name in os.listdir(tmp_path)] == ["pretrain_64.pth"]  # the temp file
    assert checkpoint.sweep_stale_temp_files(str(tmp_path)) and os.listdir(tmp_path) == []
