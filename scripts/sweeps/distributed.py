"""Distributed fault sweep (issue 18, D11/D12): faults hit ONE rank of a 2-process torchrun pretraining run (gloo on
the CPU), under DDP and under DeepSpeed ZeRO-2. A case is clean when every rank exits within a bound (no hang), the
last good checkpoint is still there and loads, and the output says clearly what happened: the SIGTERM save line, or
an `error: rank N ...` line naming the likely cause. Raw otherwise.

    python -m scripts.sweeps.distributed                       # 8 cases, about 5 minutes on 2 CPU cores
    python -m scripts.sweeps.distributed --engines ddp --cases sigterm,sigstop --keep /tmp/sweep

The cases: SIGTERM one rank (preemption of a single process), SIGKILL one rank (OOM killer, kill -9), SIGSTOP one
rank with --ddp_timeout 5 (a frozen process; it is SIGKILLed once the others have exited), SIGKILL rank 0 while it
writes a checkpoint. The helpers here (Launch, pretrain_args) are what tests/stages/test_distributed.py runs too."""
import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKENIZER = os.path.join(ROOT, "model")


def free_port() -> int:
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_corpus(path: str, docs: int = 400, seed: int = 0):
    """A repetitive two-word grammar a nano model learns within a few steps."""
    rng = random.Random(seed)
    words = "the king queen love night moon river spring wind sword song heart".split()
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(docs):
            pairs = [rng.choice(words[:6]) + " and " + rng.choice(words[6:]) for _ in range(rng.randint(5, 30))]
            f.write(json.dumps({"text": " , ".join(pairs)}) + "\n")


def pretrain_args(work: str, steps: int, extra=()) -> list[str]:
    """A nano pretraining run in `work` (its corpus written once): constant learning rate after one warmup step, so
    runs of different lengths share their first steps exactly; dropout on, so every rank's RNG matters on resume."""
    data = os.path.join(work, "corpus.jsonl")
    if not os.path.exists(data):
        os.makedirs(work, exist_ok=True)
        write_corpus(data)
        write_corpus(os.path.join(work, "corpus_val.jsonl"), docs=40, seed=1)
    return ["--data_path", data, "--tokenizer_path", TOKENIZER, "--save_dir", os.path.join(work, "out"),
            "--preset", "nano", "--dropout", "0.1", "--max_steps", str(steps), "--epochs", "1000",
            "--batch_size", "4", "--max_seq_len", "32", "--learning_rate", "2e-3", "--min_lr_ratio", "1.0",
            "--warmup_steps", "1", "--log_interval", "1", "--eval_interval", "0", "--eval_batches", "1",
            "--sample_tokens", "0", "--dtype", "float32", "--num_threads", "1", "--device", "cpu", *extra]


def zero_config(work: str, stage: int) -> str:
    """The repository's ds_config.json (what the docs tell users to pass) with ZeRO `stage`, written into `work`;
    micro-batch, accumulation, clipping and precision come from the flags."""
    with open(os.path.join(ROOT, "ds_config.json")) as f:
        config = json.load(f)
    config["zero_optimization"]["stage"] = stage
    path = os.path.join(work, f"zero{stage}.json")
    with open(path, "w") as f:
        json.dump(config, f)
    return path


def losses(work: str, name: str = "pretrain") -> dict[int, float]:
    """step -> logged loss (the mean over ranks) from a run's metrics log; a resumed run appends to it."""
    with open(os.path.join(work, "out", "logs", f"{name}.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


class Launch:
    """A torchrun launch of a stage script: its output is read in the background (`text`), its ranks are found among
    torchrun's children by their RANK, and any of them can be signalled. `close()` SIGKILLs what is left, a
    stopped (SIGSTOP) process included, by pid."""

    def __init__(self, script: str, args: list[str], nproc: int = 2, torchrun_args=None, env=None):
        torchrun_args = torchrun_args or ["--nproc_per_node", str(nproc), "--master_port", str(free_port())]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled",
               "TOKENIZERS_PARALLELISM": "false", **(env or {})}
        self.process = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *torchrun_args,
                                         os.path.join(ROOT, script), *args], cwd=ROOT, env=env, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True)
        self.reader.start()

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float) -> re.Match | None:
        """The first output line matching `pattern`, waiting up to `timeout` s (None if the run ended first)."""
        deadline = time.time() + timeout
        while True:
            for line in list(self.lines):
                if match := re.search(pattern, line):
                    return match
            if time.time() > deadline or self.process.poll() is not None and not self.reader.is_alive():
                return None
            time.sleep(0.05)

    def ranks(self) -> dict:
        """rank -> psutil.Process of the workers alive now."""
        import psutil
        found = {}
        for child in psutil.Process(self.process.pid).children():
            try:
                rank = child.environ().get("RANK")
            except psutil.Error:  # exited meanwhile
                continue
            if rank is not None:
                found[int(rank)] = child
        return found

    def signal_rank(self, rank: int, sig: int):
        self.ranks()[rank].send_signal(sig)

    def wait(self, timeout: float) -> int | None:
        """torchrun's exit status, or None if it still runs after `timeout` s (a hang)."""
        try:
            status = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        self.reader.join(timeout=10)
        return status

    def close(self):
        import psutil
        with_children = [self.process.pid]
        try:
            with_children += [p.pid for p in psutil.Process(self.process.pid).children(recursive=True)]
        except psutil.Error:
            pass
        for pid in reversed(with_children):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait()
        self.reader.join(timeout=10)


def checkpoint_loads(out: str, engine: str) -> tuple[bool, str]:
    """Whether the resume checkpoint in `out` is complete and loads: TorchEngine's one file, or the DeepSpeed tag
    that `latest` names (its model file holds the train state; one optimizer shard per rank)."""
    import torch
    try:
        if engine == "ddp":
            state = torch.load(os.path.join(out, "pretrain_64_resume.pth"), weights_only=True)["train_state"]
        else:
            root = os.path.join(out, "pretrain_64_resume_ds")
            with open(os.path.join(root, "latest")) as f:
                tag = f.read().strip()
            shards = [name for name in os.listdir(os.path.join(root, tag)) if name.startswith("zero_pp_rank_")]
            state = torch.load(os.path.join(root, tag, "mp_rank_00_model_states.pt"), weights_only=False)
            state = state["train_state"]
            if len(shards) != 2:
                return False, f"tag {tag} has {len(shards)} optimizer shards, not 2"
            for name in shards:
                torch.load(os.path.join(root, tag, name), weights_only=False)
        return True, f"checkpoint at step {state['step']} loads"
    except Exception as error:  # the verdict, not a crash of the sweep
        return False, f"checkpoint does not load: {type(error).__name__}: {str(error)[:200]}"


def kill_during_save(launch: Launch, out: str, engine: str, timeout: float = 120) -> bool:
    """SIGKILL rank 0 as soon as a save is under way: TorchEngine's temp file, or a DeepSpeed tag that `latest` does
    not name yet. Returns whether a save was caught in the act (else rank 0 was killed between saves)."""
    deadline, caught = time.time() + timeout, False
    target = launch.ranks().get(0)
    ds_root = os.path.join(out, "pretrain_64_resume_ds")
    while time.time() < deadline and not caught:
        if engine == "ddp":
            caught = any(".tmp" in name for name in os.listdir(out))
        elif os.path.isdir(ds_root):
            latest = open(os.path.join(ds_root, "latest")).read().strip() if \
                os.path.exists(os.path.join(ds_root, "latest")) else None
            caught = any(name.startswith("step") and name != latest for name in os.listdir(ds_root))
        time.sleep(0.001)
    target.send_signal(signal.SIGKILL)
    return caught


CASES = ("sigterm", "sigkill", "sigstop", "kill_in_save")


def run_case(case: str, engine: str, work: str, bound: float) -> tuple[bool, str]:
    """One fault on one rank of a fresh run; (clean, why)."""
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    extra = ["--save_interval", "1" if case == "kill_in_save" else "3", "--ddp_timeout", "5"]
    if engine == "zero2":
        extra += ["--deepspeed", zero_config(work, 2)]
    args = pretrain_args(work, steps=100000, extra=extra)
    out = os.path.join(work, "out")
    launch = Launch("train_pretrain.py", args)
    try:
        if launch.wait_for(r"^step 4/", timeout=300) is None:
            return False, "HARNESS: the run did not reach step 4: " + launch.text[-500:]
        started = time.time()
        if case == "sigterm":
            launch.signal_rank(1, signal.SIGTERM)
        elif case == "sigkill":
            launch.signal_rank(1, signal.SIGKILL)
        elif case == "sigstop":
            stopped = launch.ranks()[1]
            stopped.send_signal(signal.SIGSTOP)
        else:
            caught = kill_during_save(launch, out, engine)
        if case == "sigstop":  # torchrun itself waits 30 s for a stopped process to honour SIGTERM: bound rank 0
            survivor = launch.ranks().get(0)
            try:
                survivor.wait(timeout=bound)
            except Exception:
                return False, f"rank 0 still runs {bound:.0f} s after rank 1 froze (a hang)"
            stopped.kill()
        status = launch.wait(timeout=bound)
        took = time.time() - started
        if status is None:
            return False, f"torchrun still runs {bound:.0f} s after the fault (a hang)"
        text = launch.text
        if case == "sigterm":
            message = re.search(r"SIGTERM: resume checkpoint written at step \d+.*", text)
        else:
            message = re.search(r"error: rank \d .*", text)
        if "Traceback" in text.split("torch.distributed.elastic")[0] and message is None:
            return False, f"a traceback and no clear line ({took:.0f} s)"
        if message is None:
            return False, f"no clear message in the output ({took:.0f} s): {text[-300:]!r}"
        loads, why = checkpoint_loads(out, "ddp" if engine == "ddp" else "zero")
        detail = f"{took:.0f} s; {why}; {message.group(0)[:110]!r}"
        if case == "kill_in_save":
            detail += "; killed mid-save" if caught else "; killed between saves (missed the save window)"
        return loads, detail
    finally:
        launch.close()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default="ddp,zero2", help="comma-separated: ddp, zero2")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated: {', '.join(CASES)}")
    parser.add_argument("--bound", type=float, default=90, help="seconds every rank gets to exit after the fault")
    parser.add_argument("--keep", default=None, help="keep the runs' folders here (default: a temp dir, removed)")
    args = parser.parse_args(argv)
    work = args.keep or tempfile.mkdtemp(prefix="tinymind_sweep_distributed_")
    tried = clean = 0
    started = time.time()
    try:
        for engine in args.engines.split(","):
            for case in args.cases.split(","):
                ok, why = run_case(case, engine, os.path.join(work, f"{engine}_{case}"), args.bound)
                tried, clean = tried + 1, clean + ok
                print(f"{'clean' if ok else 'RAW  '} | {engine:5s} | {case:12s} | {why}", flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\ndistributed sweep: {tried} tried, {clean} clean, {tried - clean} raw ({time.time() - started:.0f} s)")
    return 0 if clean == tried else 1


if __name__ == "__main__":
    sys.exit(main())
