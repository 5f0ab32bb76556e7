"""Bad data against every stage that reads it (issue 18): pretraining, SFT, DPO, GRPO prompts, distillation and
clean_data, each run through its real entry point on a tiny config.

    python -m scripts.sweeps.data                        # every case; a few minutes on 2 cores
    python -m scripts.sweeps.data --stages dpo,grpo      # some stages
    python -m scripts.sweeps.data --fresh                # one process per run, exactly as typed (~15 s a run)

Each case writes a data file (good lines around the bad one, or a bad file as a whole) with a good _val.jsonl beside
it, and runs the stage twice: with --skip_bad_lines 1 first, then without, which also reuses the token cache the
first run built (a cache built skipping lines must not let the second run train on the file silently). A run is

    clean  ended with one line `error: ...` naming the data file (exit status 1), or with the flag, trained with the
           bad lines skipped and counted; a good-but-unusual file (a BOM, tool calls) trained with nothing skipped;
           clean_data reports each bad line with its file and line number (it skips them by design)
    raw    a traceback, an error line that does not name the file, a bad line trained on without being counted,
           or a good file refused

By default each stage's runs share one worker process that calls the script's main() run after run (a fresh
Python with torch and transformers costs ~15 s on a busy 2-core machine); `--fresh` starts one per run."""
import argparse
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKENIZER = os.path.join(ROOT, "model")
SCRIPTS = {"pretrain": "train_pretrain", "sft": "train_full_sft", "dpo": "train_dpo", "grpo": "train_grpo",
           "distill": "train_distillation", "clean": "clean_data"}
COMMON = ["--tokenizer_path", TOKENIZER, "--max_steps", "1", "--batch_size", "2", "--log_interval", "1",
          "--eval_interval", "0", "--dtype", "float32", "--num_threads", "1", "--device", "cpu"]

# ----------------------------------------------------------------------------------------------------- good lines


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def good_lines(stage: str, count: int, offset: int = 0) -> list:
    rows = []
    for i in range(offset, offset + count):
        if stage in ("pretrain", "clean"):
            rows.append({"text": f"Document {i}: the moon rose over the river while the wind moved the pines."})
        elif stage in ("sft", "distill"):
            rows.append({"conversations": [user(f"What is {i} + 1?"), assistant(f"{i} + 1 = {i + 1}.")]})
        elif stage == "dpo":
            prompt = [user(f"What is {i} + 1?")]
            rows.append({"chosen": prompt + [assistant(f"{i + 1}.")], "rejected": prompt + [assistant("No idea.")]})
        else:  # grpo
            rows.append({"conversations": [user(f"{i} + 1 = ?")], "answer": str(i + 1)})
    return rows


# ----------------------------------------------------------------------------------------------------- the cases
# A case: (name, what the data file holds, kind). The file holds good lines around `bad` (one line: a dict is
# written as JSON, bytes as they are), or exactly `whole` (a whole file). kind "bad": refused or skipped and
# counted; "fatal": nothing usable, an error even with the flag; "good": must be accepted with nothing skipped.

TRUNCATED = b'{"text": "a line cut off in the mid'
BINARY = bytes(range(11, 256)) * 2
NESTED = b"[" * 50_000


def surrogate_line(stage: str) -> bytes:
    """Valid JSON whose text holds half a UTF-16 surrogate pair: no tokenizer or UTF-8 writer takes it."""
    row = good_lines(stage, 1)[0]
    for messages in [row.get("conversations"), row.get("chosen"), row.get("rejected")]:
        if messages:
            messages[0]["content"] = "half a pair @@"
    if "text" in row:
        row["text"] = "half a pair @@"
    return json.dumps(row).encode().replace(b"@@", b"\\ud800")


def line_cases(stage: str) -> list:
    """Bad lines every format shares, then the format's own."""
    cases = [("malformed json", {"bad": b"{'text': 'single quotes'}"}, "bad"),
             ("truncated line", {"bad": TRUNCATED}, "bad"),
             ("not an object", {"bad": b"[1, 2, 3]"}, "bad"),
             ("binary garbage", {"bad": BINARY}, "bad"),
             ("json nested 50k deep", {"bad": NESTED}, "bad"),
             ("lone utf-16 surrogate", {"bad": surrogate_line(stage)}, "bad"),
             ("empty file", {"whole": b""}, "fatal"),
             ("blank file", {"whole": b"\n  \n\t\n"}, "fatal"),
             ("only garbage", {"whole": BINARY + b"\n" + TRUNCATED}, "fatal"),
             ("truncated last line", {"tail": TRUNCATED}, "bad"),
             ("utf-8 BOM before line 1", {"bom": True}, "good")]
    if stage in ("pretrain",):
        cases += [("missing text", {"bad": {"txt": "wrong key"}}, "bad"),
                  ("text is a number", {"bad": {"text": 42}}, "bad"),
                  ("text is null", {"bad": {"text": None}}, "bad")]
    if stage in ("sft", "distill", "grpo", "clean"):
        ask = user("What is 2 + 2?")
        cases += [("missing conversations", {"bad": {"messages": [ask]}}, "bad"),
                  ("conversations not a list", {"bad": {"conversations": "What is 2 + 2?"}}, "bad"),
                  ("conversations empty", {"bad": {"conversations": []}}, "bad"),
                  ("messages are strings", {"bad": {"conversations": ["What is 2 + 2?", "4"]}}, "bad"),
                  ("unknown role human", {"bad": {"conversations": [{"role": "human", "content": "hi"},
                                                                    assistant("4")]}}, "bad"),
                  ("role missing", {"bad": {"conversations": [{"content": "hi"}, assistant("4")]}}, "bad"),
                  ("content missing", {"bad": {"conversations": [{"role": "user"}, assistant("4")]}}, "bad"),
                  ("content null", {"bad": {"conversations": [user(None), assistant("4")]}}, "bad"),
                  ("content a number", {"bad": {"conversations": [user(4), assistant("4")]}}, "bad"),
                  ("tool_calls a string", {"bad": {"conversations": [ask, {"role": "assistant", "content": "",
                                                                           "tool_calls": '[{"name": "add"}]'}]}},
                   "bad"),
                  ("functions not json", {"bad": {"conversations": [{"role": "system", "content": "s",
                                                                     "functions": "{oops"}, ask, assistant("4")]}},
                   "bad")]
    if stage in ("sft", "distill"):
        call = {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}}
        cases += [("no assistant turn", {"bad": {"conversations": [user("hi")]}}, "bad"),
                  ("tool call, content null", {"extra": {"conversations": [
                      user("2 + 2?"), {"role": "assistant", "content": None, "tool_calls": [call]},
                      {"role": "tool", "content": "4"}, assistant("4")]}}, "good")]
    if stage == "grpo":
        cases += [("assistant turn only", {"bad": {"conversations": [assistant("4")], "answer": "4"}}, "bad"),
                  ("ends with system turn", {"bad": {"conversations": [{"role": "system", "content": "s"}],
                                                     "answer": "4"}}, "bad"),
                  ("rlaif reference answer", {"extra": {"conversations": [user("2 + 2 = ?"), assistant("4")],
                                                        "answer": "4"}}, "good")]
    if stage == "dpo":
        ask = [user("What is 2 + 2?")]
        cases += [("missing rejected", {"bad": {"chosen": ask + [assistant("4")]}}, "bad"),
                  ("chosen not a list", {"bad": {"chosen": "4", "rejected": ask + [assistant("5")]}}, "bad"),
                  ("chosen ends with user", {"bad": {"chosen": ask, "rejected": ask + [assistant("5")]}}, "bad"),
                  ("different prompts", {"bad": {"chosen": ask + [assistant("4")],
                                                 "rejected": [user("Other?"), assistant("5")]}}, "bad"),
                  ("content missing", {"bad": {"chosen": [{"role": "user"}, assistant("4")],
                                               "rejected": [{"role": "user"}, assistant("5")]}}, "bad"),
                  ("unknown role human", {"bad": {"chosen": [{"role": "human", "content": "q"}, assistant("4")],
                                                  "rejected": [{"role": "human", "content": "q"},
                                                               assistant("5")]}}, "bad"),
                  ("all pairs bad", {"whole": b"{broken\n" + json.dumps({"chosen": []}).encode() + b"\n"}, "fatal")]
    return cases


def write_case(directory: str, stage: str, spec: dict) -> str:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "data.jsonl")
    encode = lambda row: row if isinstance(row, bytes) else json.dumps(row, ensure_ascii=False).encode()  # noqa: E731
    if "whole" in spec:
        content = spec["whole"]
    else:
        rows = [encode(row) for row in good_lines(stage, 24)]
        for key in ("bad", "extra"):
            if key in spec:
                rows.insert(5, encode(spec[key]))
        content = b"\n".join(rows) + b"\n"
        if spec.get("bom"):
            content = b"\xef\xbb\xbf" + content
        if "tail" in spec:
            content += spec["tail"]  # no newline: the file ends mid-line
    with open(path, "wb") as f:
        f.write(content)
    if stage != "clean":
        with open(os.path.join(directory, "data_val.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in good_lines(stage, 8, offset=500))
    return path


def stage_argv(stage: str, data: str, out: str, checkpoint: str, skip: bool) -> list:
    if stage == "clean":
        return ["--input", data, "--output", os.path.join(out, "clean.jsonl"), "--stages", "filter,dedup"]
    argv = ["--data_path", data, "--save_dir", out, *COMMON, "--skip_bad_lines", str(int(skip))]
    return argv + {
        "pretrain": ["--preset", "nano", "--from_weight", "none", "--max_seq_len", "16", "--eval_batches", "1",
                     "--sample_tokens", "0"],
        "sft": ["--preset", "nano", "--from_weight", "none", "--max_seq_len", "128", "--eval_batches", "1",
                "--eval_prompts", "0"],
        "dpo": ["--from_weight", checkpoint, "--max_seq_len", "64", "--eval_batches", "1"],
        "grpo": ["--preset", "nano", "--from_weight", "none", "--num_generations", "2", "--max_gen_len", "4",
                 "--eval_samples", "0", "--max_seq_len", "64"],
        "distill": ["--from_weight", checkpoint, "--teacher_weight", checkpoint, "--max_seq_len", "128",
                    "--eval_batches", "1"],
    }[stage]


# ----------------------------------------------------------------------------------------------------- judging

SKIPPED = re.compile(r"skipped (\d+) bad lines|(\d+) bad lines skipped")


def skipped_count(text: str) -> int:
    return max([int(next(g for g in m.groups() if g)) for m in SKIPPED.finditer(text)], default=0)


def error_line(stderr: str) -> str:
    lines = [line for line in re.split(r"[\r\n]", stderr) if line.strip()]
    return lines[-1] if lines else ""


def judge(stage: str, kind: str, skip: bool, data: str, status: int, stdout: str, stderr: str) -> tuple[str, str]:
    """("clean" or "raw", how the run ended)."""
    if "Traceback (most recent call last)" in stderr:
        return "raw", "traceback: " + error_line(stderr)[:150]
    last = error_line(stderr)
    if status != 0:
        names_file = last.startswith("error: ") and data in last and "\n" not in last
        if kind == "good":
            return "raw", "a good file refused: " + last[:150]
        return ("clean" if names_file else "raw"), last[:150]
    if stage == "clean":  # clean_data skips bad lines by design, and must say which
        reported = re.findall(rf"malformed: {re.escape(data)}:\d+", stdout)
        if kind == "good":
            return ("clean", "kept") if not reported else ("raw", "a good line reported malformed")
        return ("clean", f"reported {reported[0]}") if reported else ("raw", "silently accepted")
    count = skipped_count(stdout + stderr)
    if kind == "good":
        return ("clean", "trained, nothing skipped") if count == 0 else ("raw", f"{count} good lines skipped")
    if skip and count > 0:
        return "clean", f"trained, {count} skipped and counted"
    return "raw", "silently accepted (trained, nothing counted)"


# ----------------------------------------------------------------------------------------------------- running


def run_in_worker(stage: str, argv: list) -> tuple[int, str, str]:
    """main(argv) of the stage's script in this process, as `python script.py argv` would end: its exit status and
    output, a traceback printed for an exception that is not SystemExit."""
    import importlib
    module = importlib.import_module(SCRIPTS[stage])
    out, err, status = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            module.main(argv)
        except SystemExit as exit_:
            if isinstance(exit_.code, str):
                print(exit_.code, file=sys.stderr)
                status = 1
            else:
                status = exit_.code or 0
        except BaseException:  # noqa: BLE001 (what the interpreter would print)
            traceback.print_exc()
            status = 1
    return status, out.getvalue(), err.getvalue()


def worker(stage: str, jobs_file: str):
    """One stage's runs, in order; one JSON line of results each."""
    os.environ.setdefault("WANDB_MODE", "disabled")
    with open(jobs_file) as f:
        jobs = json.load(f)
    for job in jobs:
        status, stdout, stderr = run_in_worker(stage, job["argv"])
        print(json.dumps({"id": job["id"], "status": status, "stdout": stdout[-20000:], "stderr": stderr[-20000:]}),
              flush=True)


def make_checkpoint(path: str):
    """A nano model for the stages that start from weights (DPO, distillation: student and teacher)."""
    import torch
    from transformers import AutoTokenizer

    from model import TinyMindConfig, TinyMindForCausalLM
    from model.checkpoint import save_weights
    from model.config import PRESETS
    torch.manual_seed(0)
    vocab = len(AutoTokenizer.from_pretrained(TOKENIZER))
    save_weights(TinyMindForCausalLM(TinyMindConfig(vocab_size=vocab, **PRESETS["nano"])), path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default=",".join(SCRIPTS), help=f"comma list of {', '.join(SCRIPTS)}")
    parser.add_argument("--fresh", action="store_true", help="one process per run instead of one per stage")
    parser.add_argument("--keep", default=None, help="work in this folder and keep it (default: a temp folder)")
    parser.add_argument("--worker", nargs=2, metavar=("STAGE", "JOBS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(*args.worker)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = set(stages) - set(SCRIPTS)
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}")
    root = args.keep or tempfile.mkdtemp(prefix="sweep_data_")
    os.makedirs(root, exist_ok=True)
    checkpoint = os.path.join(root, "nano.pth")
    if {"dpo", "distill"} & set(stages) and not os.path.exists(checkpoint):
        make_checkpoint(checkpoint)
    env = dict(os.environ, WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))

    # every run of every stage, in the order they go: with the flag first (it builds the cache), then without
    runs = []
    for stage in stages:
        for index, (name, spec, kind) in enumerate(line_cases(stage)):
            directory = os.path.join(root, stage, f"{index:02d}")
            data = write_case(directory, stage, spec)
            flags = [None] if stage == "clean" else [False] if kind == "good" else [True, False]
            for skip in flags:
                out = os.path.join(directory, f"out_{int(bool(skip))}")
                runs.append({"id": len(runs), "stage": stage, "case": name, "kind": kind, "skip": bool(skip),
                             "data": data, "argv": stage_argv(stage, data, out, checkpoint, bool(skip))})

    start, results = time.time(), {}
    for stage in stages:
        jobs = [run for run in runs if run["stage"] == stage]
        if args.fresh:
            for job in jobs:
                done = subprocess.run([sys.executable, os.path.join(ROOT, f"{SCRIPTS[stage]}.py"), *job["argv"]],
                                      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
                results[job["id"]] = {"status": done.returncode, "stdout": done.stdout, "stderr": done.stderr}
        else:
            jobs_file = os.path.join(root, f"{stage}_jobs.json")
            with open(jobs_file, "w") as f:
                json.dump([{"id": job["id"], "argv": job["argv"]} for job in jobs], f)
            done = subprocess.run([sys.executable, "-m", "scripts.sweeps.data", "--worker", stage, jobs_file],
                                  cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
            for line in done.stdout.splitlines():
                if line.startswith('{"id"'):
                    result = json.loads(line)
                    results[result["id"]] = result
            for job in jobs:  # a worker that died mid-way (a segfault, a kill): its remaining runs are raw
                results.setdefault(job["id"], {"status": done.returncode, "stdout": "",
                                               "stderr": "Traceback (most recent call last): the worker died\n"
                                                         + done.stderr[-500:]})
        print(f"{stage}: {len(jobs)} runs, {time.time() - start:.0f} s so far", file=sys.stderr, flush=True)

    clean = 0
    print(f"{'stage':9} {'case':27} {'flag':5} {'result':6} how it ended")
    for run in runs:
        result = results[run["id"]]
        verdict, how = judge(run["stage"], run["kind"], run["skip"], run["data"], result["status"],
                             result["stdout"], result["stderr"])
        clean += verdict == "clean"
        flag = "-" if run["stage"] == "clean" else "skip" if run["skip"] else "no"
        print(f"{run['stage']:9} {run['case'][:27]:27} {flag:5} {verdict:6} {how}")
    print(f"\ntried {len(runs)}, clean {clean}, raw {len(runs) - clean} ({time.time() - start:.0f} s)")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return clean == len(runs)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
