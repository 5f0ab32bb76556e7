"""Checkpoint sweep (issue 18, D6): damaged and foreign weight, config, resume and adapter files, fed to every entry
point that loads one. A run is clean when it stops (exit != 0) with an `error: ...` line that names the file, and no
traceback; raw otherwise (a traceback, an unclear exit, or the bad file accepted).

    python -m scripts.sweeps.checkpoints                      # in-process: 266 runs in about a minute (2 cores)
    python -m scripts.sweeps.checkpoints --subprocess 1 --cases "truncated to 50%"    # real processes, 5-10 s each
    python -m scripts.sweeps.checkpoints --only eval_model,convert --keep /tmp/sweep   # some entry points; keep files

A tiny pretraining run (a subprocess) makes the good files: weights + config JSON + resume checkpoint; a LoRA adapter
and a transformers export are made from them. Every case is one damaged copy of one of these. In-process runs call
each script's main() as `python script.py` would: SystemExit(message) is what the process prints before exiting 1,
any other exception is the traceback it would print. Each entry point first runs once on the good files (the
control), so a broken harness is not mistaken for clean refusals."""
import argparse
import contextlib
import importlib
import io
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from typing import NamedTuple

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKENIZER = os.path.join(ROOT, "model")
NANO = ["--preset", "nano"]
TRAIN = ["--tokenizer_path", TOKENIZER, "--device", "cpu", "--num_threads", "1", "--max_steps", "1",
         "--batch_size", "2", "--max_seq_len", "64", "--eval_interval", "0", "--eval_batches", "1",
         "--log_interval", "1"]
CHAT = ["--eval_prompts", "0"]


class RunsCode:
    """Unpickled, this would run a shell command: what a booby-trapped .pth does to torch.load(weights_only=False)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ================================================================================================ good files


def head(src: str, dst: str, lines: int):
    with open(os.path.join(ROOT, src), encoding="utf-8") as f, open(dst, "w", encoding="utf-8") as out:
        out.writelines(line for _, line in zip(range(lines), f))


def make_good_files(work: str) -> dict:
    """Small data files for every stage, then weights + config + resume from a real (tiny) pretraining run."""
    data = os.path.join(work, "data")
    os.makedirs(data)
    for name, count in [("pretrain", 80), ("sft", 16), ("dpo", 16), ("grpo", 8)]:
        head(f"dataset/demo_{name}.jsonl", os.path.join(data, f"{name}.jsonl"), count)
        head(f"dataset/demo_{name}_val.jsonl", os.path.join(data, f"{name}_val.jsonl"), 4)
    good = os.path.join(work, "good")
    run = subprocess.run([sys.executable, "train_pretrain.py", "--data_path", os.path.join(data, "pretrain.jsonl"),
                          "--save_dir", good, *NANO, *TRAIN, "--max_steps", "2", "--save_interval", "1",
                          "--dtype", "float32", "--sample_tokens", "0"],
                         cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if run.returncode != 0:
        raise SystemExit(f"the tiny pretraining run failed:\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}")
    files = {"data": data, "weights": os.path.join(good, "pretrain_64.pth"),
             "resume": os.path.join(good, "pretrain_64_resume.pth"), "adapter": os.path.join(good, "adapter_64.pth"),
             "export": os.path.join(good, "export")}
    from model.checkpoint import load_weights
    from model.lora import apply_lora, save_lora
    from model.model import TinyMindForCausalLM
    state, config = load_weights(files["weights"])
    model = TinyMindForCausalLM(config)
    model.load_state_dict(state)
    save_lora(apply_lora(model, r=4, alpha=8, verbose=False), files["adapter"])
    from scripts import convert_model
    with contextlib.redirect_stdout(io.StringIO()):
        convert_model.main(["--load_from", files["weights"], "--out_dir", files["export"], "--verify", "0"])
    return files


def other_model_state(width: int = 32) -> dict:
    from model.config import TinyMindConfig
    from model.model import TinyMindForCausalLM
    return TinyMindForCausalLM(TinyMindConfig(vocab_size=6400, hidden_size=width, num_hidden_layers=1,
                                              num_attention_heads=2, num_key_value_heads=1)).state_dict()


# ===================================================================================================== cases


def truncate(path: str, keep):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:keep(len(data))])


def overwrite(path: str, blob: bytes):
    with open(path, "wb") as f:
        f.write(blob)


def malicious_zip(path: str, marker: str):
    """A real torch checkpoint whose data.pkl was swapped for a payload that runs a command."""
    source = zipfile.ZipFile(path)
    items = [(item, source.read(item.filename)) for item in source.infolist()]
    source.close()
    with zipfile.ZipFile(path, "w") as target:
        for item, data in items:
            target.writestr(item, pickle.dumps({"x": RunsCode(marker)}, protocol=2)
                            if item.filename.endswith("data.pkl") else data)


def damage_file(path: str, how: str, marker: str):
    """The ways any torch file (weights, resume, adapter) gets damaged or swapped."""
    if how == "zero bytes":
        overwrite(path, b"")
    elif how.startswith("truncated to "):
        share = float(how.split()[-1].rstrip("%")) / 100
        truncate(path, lambda n: max(1, int(n * share)))
    elif how == "truncated by 1 byte":
        truncate(path, lambda n: n - 1)
    elif how == "random bytes":
        overwrite(path, os.urandom(20000))
    elif how == "a text file":
        overwrite(path, b"these are not the weights you are looking for\n")
    elif how == "pickle that runs code":
        overwrite(path, pickle.dumps(RunsCode(marker), protocol=2))
    elif how == "torch zip that runs code":
        malicious_zip(path, marker)
    elif how == "a list, not a dict":
        torch.save([1, 2, 3], path)
    else:
        raise ValueError(how)


FILE_DAMAGE = ["zero bytes", "truncated to 1%", "truncated to 10%", "truncated to 50%", "truncated to 90%",
               "truncated by 1 byte", "random bytes", "a text file", "pickle that runs code",
               "torch zip that runs code", "a list, not a dict"]
CONFIG_DAMAGE = {
    "config JSON missing": None,
    "config JSON truncated": lambda text: text[:len(text) // 2],
    "config JSON empty": lambda text: "",
    "config JSON not an object": lambda text: "[64, 2, 4]",
    "config JSON with a string size": lambda text: text.replace('"hidden_size": 64', '"hidden_size": "64px"'),
    "config JSON of another run (3 layers)": lambda text: text.replace('"num_hidden_layers": 2',
                                                                       '"num_hidden_layers": 3'),
    "config JSON of a llama": lambda text: text.replace('"model_type": "tinymind"', '"model_type": "llama"'),
}


class Case(NamedTuple):
    kind: str  # weights, resume, adapter or export
    how: str  # what was done to the file ("good": the control)
    target: str  # what the entry point is given: a file, or a folder (resume: --save_dir; export: --load_from)
    names: list  # the paths a clean error may name
    marker: str  # the file a payload that ran would have created


def case_folder(work: str, kind: str, how: str) -> str:
    folder = os.path.join(work, "cases", kind, re.sub(r"[^A-Za-z0-9]+", "_", how).strip("_"))
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    return folder


def weight_cases(files: dict, work: str):
    """Damaged weights and damaged, missing or foreign config JSON beside good weights."""
    from model.checkpoint import config_path_for
    for how in ["good"] + FILE_DAMAGE + ["a LoRA adapter", "another model's tensors"] + list(CONFIG_DAMAGE):
        folder = case_folder(work, "weights", how)
        os.makedirs(folder)
        path, marker = os.path.join(folder, "full_sft_64.pth"), os.path.join(folder, "RAN")
        config = config_path_for(path)
        shutil.copy(files["weights"], path)
        shutil.copy(config_path_for(files["weights"]), config)
        if how in CONFIG_DAMAGE:
            if CONFIG_DAMAGE[how] is None:
                os.remove(config)
            else:
                with open(config) as f:
                    text = f.read()
                with open(config, "w") as f:
                    f.write(CONFIG_DAMAGE[how](text))
        elif how == "a LoRA adapter":
            shutil.copy(files["adapter"], path)
        elif how == "another model's tensors":
            torch.save(other_model_state(), path)
        elif how != "good":
            damage_file(path, how, marker)
        yield Case("weights", how, path, [path, config], marker)


def resume_cases(files: dict, work: str):
    """A damaged resume checkpoint in the --save_dir of a run with --from_resume 1 (one per stage name)."""
    for how in ["good"] + FILE_DAMAGE + ["plain weights", "another model's resume"]:
        folder = case_folder(work, "resume", how)
        os.makedirs(folder)
        marker, paths = os.path.join(folder, "RAN"), []
        for stage in ("pretrain", "full_sft"):
            path = os.path.join(folder, f"{stage}_64_resume.pth")
            paths.append(path)
            shutil.copy(files["resume"], path)
            if how == "plain weights":
                shutil.copy(files["weights"], path)
            elif how == "another model's resume":
                checkpoint = torch.load(path, weights_only=True)
                checkpoint["model"] = other_model_state()
                torch.save(checkpoint, path)
            elif how != "good":
                damage_file(path, how, marker)
        yield Case("resume", how, folder, paths, marker)


def adapter_cases(files: dict, work: str):
    """A damaged or foreign LoRA adapter added to good weights."""
    from model.config import TinyMindConfig
    from model.lora import apply_lora, save_lora
    from model.model import TinyMindForCausalLM
    for how in ["good"] + FILE_DAMAGE + ["model weights", "an adapter of another model"]:
        folder = case_folder(work, "adapter", how)
        os.makedirs(folder)
        path, marker = os.path.join(folder, "lora_x_64.pth"), os.path.join(folder, "RAN")
        shutil.copy(files["adapter"], path)
        if how == "model weights":
            shutil.copy(files["weights"], path)
        elif how == "an adapter of another model":
            other = TinyMindForCausalLM(TinyMindConfig(vocab_size=6400, hidden_size=32, num_hidden_layers=2,
                                                       num_attention_heads=2, num_key_value_heads=1))
            save_lora(apply_lora(other, r=4, alpha=8, verbose=False), path)
        elif how != "good":
            damage_file(path, how, marker)
        yield Case("adapter", how, path, [path], marker)


def export_cases(files: dict, work: str):
    """A transformers directory (scripts/convert_model.py's export) with a damaged config.json or safetensors."""
    for how in ["good", "config.json truncated", "config.json empty", "config.json of another run (3 layers)",
                "model.safetensors zero bytes", "model.safetensors truncated to 50%",
                "model.safetensors truncated by 1 byte", "model.safetensors random bytes"]:
        folder = case_folder(work, "export", how)
        shutil.copytree(files["export"], folder)
        marker = os.path.join(folder, "RAN")
        target = os.path.join(folder, how.split()[0])
        if how.startswith("config.json"):
            with open(target) as f:
                text = f.read()
            damaged = {"truncated": text[:len(text) // 2], "empty": ""}.get(how.split()[1])
            with open(target, "w") as f:
                f.write(damaged if damaged is not None else text.replace('"num_hidden_layers": 2',
                                                                           '"num_hidden_layers": 3'))
        elif how != "good":
            damage_file(target, how.split(" ", 1)[1], marker)
        yield Case("export", how, folder, [folder, target], marker)


# ============================================================================================== entry points


def entry_points(files: dict, runs: str) -> dict:
    """kind -> {entry point: (`python` argv without the case, the case's flags from its target)}. Training runs
    write into runs/<entry>/ (a resume case's --save_dir is the case itself)."""
    data = files["data"]

    def stage(script, *flags, save=True):
        own_dir = ["--save_dir", os.path.join(runs, script[:-3])] if save else []
        return [script, *flags, *TRAIN, *own_dir]

    def load(*argv):
        if "scripts.convert_model" in argv:  # always on the CPU, with the shipped tokenizer
            return list(argv)
        return [*argv, "--device", "cpu", "--tokenizer_path", TOKENIZER]

    chats = ["--data_path", os.path.join(data, "sft.jsonl"), *CHAT]
    pretrain = ["--data_path", os.path.join(data, "pretrain.jsonl"), "--sample_tokens", "0"]
    from_weight = lambda path: ["--from_weight", path]  # noqa: E731
    load_from = lambda path: ["--load_from", path]  # noqa: E731
    export_to = os.path.join(runs, "export")
    weights = {
        "train_full_sft --from_weight": (stage("train_full_sft.py", *chats), from_weight),
        "train_lora --from_weight": (stage("train_lora.py", *chats, "--replay_data_path", "none",
                                           "--general_val_path", os.path.join(data, "sft_val.jsonl")), from_weight),
        "train_dpo --from_weight": (stage("train_dpo.py", "--data_path", os.path.join(data, "dpo.jsonl")),
                                    from_weight),
        "train_distillation --teacher_weight": (stage("train_distillation.py", "--data_path",
                                                      os.path.join(data, "sft.jsonl"), "--from_weight", "none",
                                                      *NANO), lambda path: ["--teacher_weight", path]),
        "train_grpo --from_weight": (stage("train_grpo.py", "--data_path", os.path.join(data, "grpo.jsonl"),
                                           "--num_generations", "2", "--max_gen_len", "8", "--eval_samples", "2",
                                           "--eval_batch_size", "2", "--show_completions", "0"), from_weight),
        "train_pretrain --from_weight": (stage("train_pretrain.py", *pretrain), from_weight),
        "eval_model --load_from": (load("eval_model.py", "--prompts", "builtin", "--max_new_tokens", "2"),
                                   load_from),
        "convert_model --load_from": (load("-m", "scripts.convert_model", "--verify", "0", "--out_dir", export_to),
                                      load_from),
        "eval_bench --load_from": (load("-m", "scripts.eval_bench", "mc", "--limit", "1"), load_from),
        "serve_openai_api --load_from": (load("-m", "scripts.serve_openai_api", "--port", "1"), load_from),
    }
    resume = {
        "train_pretrain --from_resume 1": (stage("train_pretrain.py", *pretrain, *NANO, "--from_resume", "1",
                                                 save=False), lambda folder: ["--save_dir", folder]),
        "train_full_sft --from_resume 1": (stage("train_full_sft.py", *chats, "--from_resume", "1",
                                                 "--from_weight", files["weights"], save=False),
                                           lambda folder: ["--save_dir", folder]),
    }
    adapter = {
        "eval_model --lora_name": (load("eval_model.py", "--prompts", "builtin", "--max_new_tokens", "2",
                                        "--load_from", files["weights"]), lambda path: ["--lora_name", path]),
        "convert_model --lora_name": (load("-m", "scripts.convert_model", "--verify", "0", "--out_dir", export_to,
                                           "--load_from", files["weights"]), lambda path: ["--lora_name", path]),
    }
    export = {
        "convert_model --to_pth": (load("-m", "scripts.convert_model", "--to_pth",
                                        os.path.join(runs, "imported_64.pth")), load_from),
        "eval_model --load_from (export)": (load("eval_model.py", "--prompts", "builtin", "--max_new_tokens", "2"),
                                            load_from),
    }
    return {"weights": weights, "resume": resume, "adapter": adapter, "export": export}


def call_in_process(argv: list[str]):
    """Run `python <argv>` in this process: (exit status, what it printed on stderr at exit, traceback or None)."""
    if argv[0] == "-m":
        module, args = argv[1], argv[2:]
    else:
        module, args = argv[0][:-len(".py")], argv[1:]
    mod = importlib.import_module(module)
    if module == "scripts.serve_openai_api":  # only its loading: a server that loaded would never return
        parser = argparse.ArgumentParser()
        mod.add_server_args(parser, default_weights=["full_sft"])
        main = lambda a: mod.load_models(parser.parse_args(a))  # noqa: E731
    else:
        main = mod.main
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            main(args)
        return 0, "", None
    except SystemExit as done:
        if done.code is None or done.code == 0:
            return 0, "", None
        return (1, str(done.code), None) if isinstance(done.code, str) else (done.code, sink.getvalue()[-500:], None)
    except BaseException:  # noqa: B036 - whatever a script lets out is the traceback a user would see
        return 1, "", traceback.format_exc()


def call_subprocess(argv: list[str], timeout: float = 300):
    try:
        run = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                             env=dict(os.environ, OMP_NUM_THREADS="1"))
    except subprocess.TimeoutExpired:
        return 0, "", "timed out: the bad file was accepted?"
    has_traceback = "Traceback (most recent call last)" in run.stderr
    return run.returncode, run.stderr, run.stderr if has_traceback else None


def verdict(status: int, message: str, trace: str | None, names: list[str], marker: str) -> tuple[bool, str]:
    if os.path.exists(marker):
        return False, "RAN THE FILE'S CODE"
    if trace is not None:
        return False, "traceback: " + trace.strip().splitlines()[-1][:160]
    if status == 0:
        return False, "accepted (exit 0)"
    lines = [line for line in message.strip().splitlines() if line.startswith("error:")]
    if lines and any(name in lines[0] for name in names):
        return True, lines[0][:160]
    return False, "unclear: " + (message.strip().splitlines() or ["(nothing printed)"])[-1][:160]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subprocess", type=int, default=0, choices=[0, 1],
                        help="1: run every case as its own process (exact stderr; ~10 s each)")
    parser.add_argument("--only", default=None, help="comma-separated substrings: run only matching entry points")
    parser.add_argument("--cases", default=None, help="comma-separated substrings: run only matching cases")
    parser.add_argument("--keep", default=None, help="build the cases in this (new) directory and keep them")
    parser.add_argument("--verbose", type=int, default=0, choices=[0, 1], help="1: print every run, clean ones too")
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)
    work = args.keep or tempfile.mkdtemp(prefix="tinymind_checkpoint_sweep_")
    os.makedirs(work, exist_ok=True)
    started = time.time()
    files = make_good_files(work)
    print(f"good files from a tiny pretraining run ({time.time() - started:.0f} s): {files['weights']} (+ .json, "
          f"resume), an adapter and an export", flush=True)
    cases = {"weights": list(weight_cases(files, work)), "resume": list(resume_cases(files, work)),
             "adapter": list(adapter_cases(files, work)), "export": list(export_cases(files, work))}
    call = call_subprocess if args.subprocess else call_in_process
    tried = clean = 0
    raw = []
    for kind, entries in entry_points(files, os.path.join(work, "runs")).items():
        for entry, (base, flags) in entries.items():
            if args.only and not any(part in entry for part in args.only.split(",")):
                continue
            for case in cases[kind]:
                if args.cases and case.how != "good" and not any(part in case.how for part in args.cases.split(",")):
                    continue
                if case.how == "good":  # the control: the harness must work on the good files
                    if not (args.subprocess and "serve" in entry):  # a server that loads serves forever
                        status, message, trace = call([*base, *flags(case.target)])
                        if status != 0 or trace:
                            print(f"HARNESS: {entry} fails on the good files: {(trace or message).strip()[-800:]}")
                    continue
                status, message, trace = call([*base, *flags(case.target)])
                ok, why = verdict(status, message, trace, case.names, case.marker)
                tried, clean = tried + 1, clean + ok
                if not ok:
                    raw.append((entry, case.how, why))
                if args.verbose or not ok:
                    print(f"{'clean' if ok else 'RAW  '} | {entry:36s} | {kind}: {case.how:38s} | {why}", flush=True)
        print(f"... {kind}: {tried} tried so far, {clean} clean ({time.time() - started:.0f} s)", flush=True)
    print(f"\ncheckpoint sweep: {tried} tried, {clean} clean, {tried - clean} raw "
          f"({'subprocesses' if args.subprocess else 'in-process'}, {time.time() - started:.0f} s)")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return {"tried": tried, "clean": clean, "raw": raw}


if __name__ == "__main__":
    main()
