"""Every TinyMind stage, one after the other, on the demo data, ending in a report card (out/report.md).

    python -m scripts.run_pipeline                          # the CPU demo (tiny model), one stage at a time
    python -m scripts.run_pipeline --jobs 2                 # two stages at a time: faster on 2 cores (docs/README.md)
    python -m scripts.run_pipeline --stages sft,lora        # a subset (stages whose output exists are skipped)
    python -m scripts.run_pipeline --force --stages dpo     # rerun a stage even though its output exists
    python -m scripts.run_pipeline --quick --save_dir /tmp/ci/out     # seconds per stage: a smoke test (CI)
    python -m scripts.run_pipeline --recipe minimind_gpu    # MiniMind's datasets on one GPU (see README)
    python -m scripts.run_pipeline --recipe minimind_gpu --nproc 8    # the same under torchrun on 8 GPUs
    python -m scripts.run_pipeline --recipe minimind_gpu --quick --data_dir D   # its commands, a few steps each

Each stage is the same command a user would type (printed before it runs), so the pipeline doubles as the
documentation of the recipe. A stage whose output file exists is skipped unless --force, and a training stage that
was killed goes on from its last resume checkpoint (--from_resume 1), so a killed pipeline continues where it
stopped. --force reruns the chosen stages from scratch.
"""
import argparse
import datetime
import json
import os
import queue
import re
import resource
import shlex
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# In the demo, the RL stages whose gain must stand out from seed noise run twice more, from the same checkpoint with
# other seeds (<stage>_seed1, <stage>_seed2; the stage's own run keeps the scripts' default seed): the report shows
# the three side by side. The GPU recipe runs each stage once.
EXTRA_SEEDS = {"grpo": [1, 2], "reward": [1, 2], "ppo": [1, 2], "agent": [1, 2]}
# share of the agent's SFT sums answered from memory, not with the calculator (build_agent_data --guess_share)
AGENT_GUESS_SHARE = "0.3"
SEED_RUNS = {f"{stage}_seed{seed}": stage for stage, seeds in EXTRA_SEEDS.items() for seed in seeds}
ORDER = ["clean", "tokenizer", "pretrain", "sft", "lora", "dpo", "teacher", "distill", "distill_ce", "reason", "grpo",
         "grpo_seed1", "grpo_seed2", "reward", "reward_seed1", "reward_seed2", "ppo", "ppo_seed1", "ppo_seed2",
         "agent_sft", "agent", "agent_seed1", "agent_seed2", "eval", "report"]
# RLHF end to end (reward model -> PPO) and tool-using agent RL: a second, opt-in pipeline on top of the demo models
RL_STAGES = ["reward", "reward_seed1", "reward_seed2", "ppo", "ppo_seed1", "ppo_seed2", "agent_sft", "agent",
             "agent_seed1", "agent_seed2"]
STAGE_GROUPS = {"demo": [s for s in ORDER if s not in RL_STAGES], "rl": RL_STAGES + ["report"], "all": ORDER}
# The stages whose output each stage reads: with --jobs N a stage starts once these have finished (or were not asked
# for in this run: their output is then assumed to exist, as the sequential run assumes).
TRAINED = ["pretrain", "sft", "lora", "dpo", "distill", "distill_ce", "reason", "grpo"]
NEEDS = {"pretrain": ["clean", "tokenizer"], "sft": ["pretrain"], "lora": ["sft"], "dpo": ["sft"],
         "teacher": ["clean", "tokenizer"], "distill": ["sft", "teacher"], "distill_ce": ["sft", "teacher"],
         "reason": ["sft"], "grpo": ["reason"], "reward": ["sft"], "ppo": ["reward"], "agent_sft": ["reason"],
         "agent": ["agent_sft"], "eval": TRAINED, "report": [s for s in ORDER if s != "report"]}
NEEDS.update({run: NEEDS[stage] for run, stage in SEED_RUNS.items()})  # a seed rerun reads what its stage reads
# Which ready stage starts first when several could: the longest chains first (the teacher, and reason -> grpo),
# so that the short stages fill the gaps beside them instead of leaving one core idle at the end.
PRIORITY = ["clean", "tokenizer", "pretrain", "teacher", "sft", "reason", "grpo", "grpo_seed1", "grpo_seed2",
            "agent_sft", "agent", "agent_seed1", "agent_seed2", "reward", "reward_seed1", "reward_seed2", "ppo",
            "ppo_seed1", "ppo_seed2", "distill", "distill_ce", "dpo", "lora", "eval", "report"]


# MiniMind's file for each stage (its dataset page on ModelScope / Hugging Face); none has a _val.jsonl twin, so each
# stage holds out a share of its file (--val_fraction). GRPO keeps our arithmetic set: its rewards are verifiable.
SHIPPED_TOKENIZER = "model/tokenizer.json"  # the demo recipe's tokenizer stage writes here
MINIMIND_FILES = {"pretrain": "pretrain_hq.jsonl", "sft": "sft_mini_512.jsonl", "lora": "lora_identity.jsonl",
                  "dpo": "dpo.jsonl", "reason": "r1_mix_1024.jsonl"}


def build_recipe(out: str, quick: bool, recipe: str = "demo", data_dir: str = "dataset", nproc: int = 1,
                 resume: bool = True, dtype: str | None = None) -> dict:
    """Stage -> (commands, the file that proves the stage is done).

    demo: the embedded data and the tiny model (4.6M), sized for 2 CPU cores. minimind_gpu: MiniMind's files from
    `data_dir`, the small model (25.8M, MiniMind2-Small's shape) and a base-sized teacher (MiniMind2's shape), under
    torchrun when nproc > 1. `quick` shrinks either to a few steps of the nano model: a smoke test of the same
    commands (CI runs both recipes that way on stand-in files). `resume`: a training stage that was killed goes on
    from its last resume checkpoint (--from_resume 1) instead of starting over; --force turns it off. `dtype`: every
    training command's --dtype (default: each script's own choice)."""
    gpu = recipe == "minimind_gpu"
    py = sys.executable
    launch = ["torchrun", "--nproc_per_node", str(nproc)] if nproc > 1 else [py]
    saving = ["--save_dir", out] + (["--from_resume", "1"] if resume else []) + (["--dtype", dtype] if dtype else [])
    q = ["--max_steps", "4", "--eval_batches", "2", "--log_interval", "2", "--save_interval", "1000"] if quick else []
    small_eval = ["--eval_prompts", "4", "--max_new_tokens", "16"] if quick else []
    if quick:
        student, teacher = ["--preset", "nano"], ["--hidden_size", "96", "--num_hidden_layers", "2"]
    elif gpu:
        student, teacher = ["--preset", "small"], ["--preset", "base"]
    else:
        student = ["--preset", "tiny"]
        teacher = ["--hidden_size", "384", "--num_hidden_layers", "4", "--num_attention_heads", "6",
                   "--num_key_value_heads", "2"]
    hidden = {"nano": "64", "tiny": "256", "small": "512"}[student[1]]
    teacher_hidden = {"base": "768"}.get(teacher[1], teacher[1])
    size = ["--hidden_size", hidden]  # later stages find the checkpoint <stage>_<hidden>.pth by its width
    # The shipped tokenizer learned classical poems and Shakespeare (under 1 character per token on modern Chinese
    # prose); on MiniMind's data the GPU recipe learns its own, and every stage then uses it.
    tokenizer_dir = f"{out}/tokenizer" if gpu else os.path.dirname(SHIPPED_TOKENIZER)
    tokenizer = ["--tokenizer_path", tokenizer_dir] if gpu else []

    def data(stage: str) -> list:  # the demo files are each script's default --data_path
        return ["--data_path", os.path.join(data_dir, MINIMIND_FILES[stage])] if gpu else []

    raw_corpus = os.path.join(data_dir, MINIMIND_FILES["pretrain"]) if gpu else "dataset/demo_pretrain.jsonl"
    corpus = f"{out}/data/{os.path.splitext(os.path.basename(raw_corpus))[0]}_clean.jsonl"
    # Gopher's "80% of words contain a letter" rule drops verse drama (speaker names, short lines): keep it.
    clean_flags = ["--num_workers", "16"] if gpu and not quick else \
        ["--min_alpha_words_frac", "0", "--num_workers", "2"]
    pretrain_data = ["--data_path", corpus, *tokenizer] + \
        ([] if gpu else ["--val_data_path", "dataset/demo_pretrain_val.jsonl"])
    sft_data = data("sft") + tokenizer
    # real data at the GPU recipe's sizes: each held-out split is big enough; MiniMind's identity set is small
    lora_flags = data("lora") + tokenizer + (["--keyword", "MiniMind", "--val_fraction", "0.1"] if gpu else [])
    # The demo's adapter: eight passes with half of every row replayed keep the general chats within the forgetting
    # target, and dropout on the adapter's input keeps the keyword rate steady from seed to seed. The verse task's
    # chats stay out of the replay: replayed, they made the adapter answer some identity questions with a verse
    # (docs/lora.md)
    lora_flags += [] if gpu else ["--replay_skip_replies", "The next line is:"]
    lora_flags += [] if gpu or quick else ["--epochs", "8", "--lora_dropout", "0.1"]
    # Six passes over the demo's two-digit sums (370 steps each): the model then copies a prompt's numbers into its
    # digit steps, or answers an addition at once as the data's quick replies do (docs/grpo.md)
    reason_flags = data("reason") + tokenizer + (["--max_seq_len", "1024"] if gpu and not quick else []) + \
        (["--epochs", "6"] if not gpu and not quick else [])
    # packed rows of 512 tokens hold ~8 demo chats: two a step are the 16 chats a step the padded batches had
    distill_flags = ["--max_steps", "2000"] if gpu and not quick else ([] if quick else ["--batch_size", "2"])
    # The teacher must beat what the student reaches alone: in the demo it gets three passes over the SFT chats
    # (one left it worse than the CE-only student, docs/distillation.md); on MiniMind's large file one is plenty.
    teacher_sft_flags = ["--epochs", "1"] if gpu and not quick else ([] if quick else ["--epochs", "3"])
    grpo_flags = ["--num_generations", "4", "--max_gen_len", "16", "--eval_samples", "8"] if quick else \
        ([] if gpu else ["--batch_size", "16", "--learning_rate", "1e-4", "--temperature", "0.7", "--max_steps", "60",
                         "--eval_interval", "20", "--max_gen_len", "64"])  # worked replies ~40 tokens; at lr 2e-5
    # GRPO leaves the choice between working and answering at once where it was (docs/grpo.md)
    # one pass over the demo's 2,384 pairs leaves the held-out gain within seed noise; three passes lift every seed
    # clear of the starts (the loops and off-topic replies are what it can learn: docs/reward_model.md)
    reward_flags = [] if gpu or quick else ["--epochs", "3"]
    ppo_flags = ["--max_gen_len", "16", "--eval_samples", "8"] if quick else ([] if gpu else ["--max_steps", "64"])
    agent_flags = ["--num_generations", "2", "--max_gen_len", "24", "--eval_samples", "4"] if quick else \
        ([] if gpu else ["--max_steps", "30", "--learning_rate", "2e-5"])  # 5e-5 and up undo the copies
    agent_eval = ["--samples", "4", "--max_gen_len", "24"] if quick else []
    recipe = {
        "clean": ([[py, "clean_data.py", "--input", raw_corpus, "--output", corpus, *clean_flags]], corpus),
        "tokenizer": ([[py, "-m", "scripts.train_tokenizer", "--out_dir", tokenizer_dir,
                        *(["--data", raw_corpus, os.path.join(data_dir, MINIMIND_FILES["sft"]),
                           "--max_mb", "1" if quick else "200"] if gpu else [])]],
                      f"{tokenizer_dir}/tokenizer.json"),
        "pretrain": ([[*launch, "train_pretrain.py", *saving, *pretrain_data, *student, *q]],
                     f"{out}/pretrain_{hidden}.pth"),
        "sft": ([[*launch, "train_full_sft.py", *saving, *sft_data, *size, *q, *small_eval]],
                f"{out}/full_sft_{hidden}.pth"),
        "lora": ([[*launch, "train_lora.py", *saving, *lora_flags, *size, *q, *small_eval]],
                 f"{out}/lora/lora_identity_{hidden}.pth"),
        "dpo": ([[*launch, "train_dpo.py", *saving, *data("dpo"), *tokenizer, *size, *q]],
                f"{out}/dpo_{hidden}.pth"),
        "teacher": ([[*launch, "train_pretrain.py", *saving, "--save_weight", "teacher_pretrain", *teacher,
                      *pretrain_data, *q],
                     [*launch, "train_full_sft.py", *saving, "--save_weight", "teacher_sft",
                      "--from_weight", "teacher_pretrain", "--hidden_size", teacher_hidden, *sft_data,
                      *teacher_sft_flags, *q, *small_eval]],
                    f"{out}/teacher_sft_{teacher_hidden}.pth"),
        "distill": ([[*launch, "train_distillation.py", *saving, "--teacher_weight", "teacher_sft",
                      "--teacher_hidden_size", teacher_hidden, "--from_weight", "full_sft", *sft_data, *size,
                      *distill_flags, *q]], f"{out}/distill_{hidden}.pth"),
        "distill_ce": ([[*launch, "train_distillation.py", *saving, "--teacher_weight", "teacher_sft",
                         "--teacher_hidden_size", teacher_hidden, "--from_weight", "full_sft", *sft_data, *size,
                         *distill_flags, *q, "--alpha", "1", "--save_weight", "distill_ce"]],
                       f"{out}/distill_ce_{hidden}.pth"),  # the same student on CE alone: the baseline KD must beat
        "reason": ([[*launch, "train_reason.py", *saving, "--from_weight",
                     "full_sft", *reason_flags, *size, *q, *small_eval]], f"{out}/reason_{hidden}.pth"),
        "grpo": ([[*launch, "train_grpo.py", *saving, "--from_weight", "reason", *tokenizer, *size, *q,
                   *grpo_flags]],
                 f"{out}/grpo_{hidden}.pth"),
        "reward": ([[*launch, "train_reward.py", *saving, *data("dpo"), *tokenizer, *size, *q, *reward_flags]],
                   f"{out}/reward_{hidden}.pth"),
        "ppo": ([[*launch, "train_ppo.py", *saving, "--reward_model", f"{out}/reward_{hidden}.pth", *data("dpo"),
                  *tokenizer, *size, *q, *ppo_flags]], f"{out}/ppo_{hidden}.pth"),
        # the agent's chats carry the tools' schemas in the system prompt (~510 tokens): they need 768. It starts from
        # the reasoning model, which copies a prompt's numbers (from the SFT model no held-out call was right). Some
        # calculator chats answer at once, so the agent may answer from memory or call: agent RL has a choice to
        # make (on the shipped chats, which always call, it has none and gains nothing: docs/agent.md)
        "agent_sft": ([[py, "-m", "scripts.build_agent_data", "--out_dir", f"{out}/data",
                        "--guess_share", AGENT_GUESS_SHARE],
                       [*launch, "train_full_sft.py", *saving, "--from_weight", "reason",
                        "--save_weight", "agent_sft", "--data_path", f"{out}/data/demo_agent_sft.jsonl",
                        "--max_seq_len", "768", *tokenizer, *size, *q, *small_eval]], f"{out}/agent_sft_{hidden}.pth"),
        "agent": ([[*launch, "train_agent.py", *saving, "--from_weight", "agent_sft", *tokenizer, *size, *q,
                    *agent_flags],
                   [py, "-m", "scripts.eval_toolcall", "--save_dir", out, "--weight", "agent_sft", "agent", *size,
                    "--output", f"{out}/summaries/agent_toolcall.json", *agent_eval]],
                  f"{out}/agent_{hidden}.pth"),
        "eval": ([[py, "-m", "scripts.sample_stages", "--save_dir", out, "--hidden_size", hidden,
                   *(["--prompts", "builtin"] if gpu else []), *(["--quick"] if quick else []), *tokenizer]],
                 f"{out}/summaries/samples_grpo.json"),
        "report": ([[py, "-m", "scripts.report", "--save_dir", out]], f"{out}/report.md"),
    }
    for stage, seeds in EXTRA_SEEDS.items() if not gpu else ():  # its training command, another seed and name
        for seed in seeds:
            run = f"{stage}_seed{seed}"
            recipe[run] = ([recipe[stage][0][0] + ["--seed", str(seed), "--save_weight", run]],
                           f"{out}/{run}_{hidden}.pth")
    return recipe


def stage_finished(done_file: str, save_dir: str) -> bool:
    """A stage is done when its output exists and, for a training stage, its run wrote its final summary: the
    Trainer also writes the weights every --save_interval steps, so a killed stage leaves <stage>_<h>.pth behind."""
    if not os.path.exists(os.path.join(ROOT, done_file)):
        return False
    if not done_file.endswith(".pth"):
        return True
    name = re.sub(r"_\d+(_moe|_mla)*\.pth$", "", os.path.basename(done_file))
    return os.path.exists(os.path.join(ROOT, save_dir, "summaries", f"{name}.json"))


def with_threads(command: list, threads: int | None) -> list:
    """The command with --num_threads when the stage shares the CPU: the training scripts and the samples would
    otherwise each take every core, and two processes on too many threads run several times slower."""
    takes_flag = any(os.path.basename(part).startswith("train_") or part == "scripts.sample_stages" for part in command)
    return command + ["--num_threads", str(threads)] if threads and takes_flag else command


# The environment variable naming a stage's threads file (model/training/runtime.py reads it; this script does not
# import torch, so the name is repeated here and a test holds the two equal).
THREADS_FILE_ENV = "TINYMIND_THREADS_FILE"


class StageFailed(Exception):
    pass


def run_stage(name: str, commands: list, env: dict, threads: int | None = None, log_path: str | None = None,
              processes: dict | None = None, threads_file: str | None = None) -> float:
    """Run one stage's commands in turn. Alone, it prints to the console; beside other stages, into log_path (one
    file per stage: interleaved output would be unreadable), on `threads` CPU threads, or on the count written
    into threads_file later (offer_threads). processes[name] holds the command running now, so that a failure
    elsewhere can stop it."""
    start = time.time()
    log = open(log_path, "a") if log_path else None
    env = dict(env, OMP_NUM_THREADS=str(threads)) if threads else env
    if threads_file:
        env[THREADS_FILE_ENV] = threads_file
    try:
        for command in commands:
            command = with_threads(command, threads)
            line = f"\n=== [{name}] {' '.join(shlex.quote(c) for c in command)}"
            print(line, flush=True)
            if log:
                log.write(line + "\n")
                log.flush()
            process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log,
                                       stderr=subprocess.STDOUT if log else None)
            if processes is not None:
                processes[name] = process
            if process.wait() != 0:
                where = f" (its output: {log_path})" if log else ""
                raise StageFailed(f"stage '{name}' failed (exit {process.returncode}){where}; fix it and rerun: "
                                  f"finished stages are skipped")
    finally:
        if log:
            log.close()
    return time.time() - start


def offer_threads(threads_file: str, threads: int):
    """Tell a running stage it may use `threads` CPU threads: the Trainer reads the file at its next step, and a
    stage's later commands read it when they start (model/training/runtime.py, take_offered_threads)."""
    with open(threads_file + ".tmp", "w") as f:
        f.write(str(threads))
    os.replace(threads_file + ".tmp", threads_file)


def depends_on(stage: str, other: str) -> bool:
    """Whether `stage` needs `other`'s output, directly or through the stages in between."""
    return other in NEEDS.get(stage, []) or any(depends_on(need, other) for need in NEEDS.get(stage, []))


def run_stages(stages: list, recipe: dict, env: dict, jobs: int, log_dir: str, starting, finished) -> None:
    """Run `stages`, up to `jobs` at a time, each once the stages it needs (NEEDS) have finished; starting(name)
    before and finished(name, seconds) after each. One job: ORDER, on the console, as a user would type them.
    Several: each stage gets cores / jobs threads (a stage that nothing can run beside, such as clean or eval, gets
    every core) and its own log file; when lanes empty and nothing else can start, the stages still running are
    offered the idle cores (offer_threads). A failed stage stops the others (SIGTERM: they leave resume
    checkpoints) and ends the run."""
    cores = os.cpu_count() or 1
    pending = [s for s in (ORDER if jobs == 1 else PRIORITY) if s in stages]
    running, processes, results = set(), {}, queue.Queue()
    offered = {}  # stage -> (its threads file, the threads it may use now)

    def work(name, threads, log_path):
        threads_file = offered.get(name, (None,))[0]
        try:
            seconds, error = run_stage(name, recipe[name][0], env, threads, log_path, processes, threads_file), None
        except (StageFailed, OSError) as failure:
            seconds, error = 0.0, failure
        if threads_file and os.path.exists(threads_file):
            os.remove(threads_file)
        results.put((name, seconds, error))

    while pending or running:
        ready = [s for s in pending if not any(n in pending or n in running for n in NEEDS.get(s, []))]
        for name in ready[:jobs - len(running)]:
            pending.remove(name)
            starting(name)
            alone = not running and all(depends_on(other, name) for other in pending)
            threads = None if jobs == 1 or alone else max(1, cores // jobs)
            log_path = None if jobs == 1 else os.path.join(log_dir, f"pipeline_{name}.log")
            if log_path:
                os.makedirs(log_dir, exist_ok=True)
                print(f"=== [{name}] starting on {threads or cores} threads (output: {log_path})", flush=True)
            if threads:
                offered[name] = (os.path.join(log_dir, f"threads_{name}"), threads)
                if os.path.exists(offered[name][0]):
                    os.remove(offered[name][0])  # a count offered to this stage in an earlier run
            running.add(name)
            threading.Thread(target=work, args=(name, threads, log_path), daemon=True).start()
        # Nothing more can start until a running stage ends: the cores of the lanes that emptied go to the stages
        # still running, rather than idling (on the demo, the last stage of the longest chain runs alone).
        for name in running:
            if name in offered and offered[name][1] < cores // len(running):
                offered[name] = (offered[name][0], cores // len(running))
                offer_threads(*offered[name])
                print(f"=== [{name}] may now use {offered[name][1]} threads (nothing else can start yet)", flush=True)
        name, seconds, error = results.get()
        running.discard(name)
        if error is not None:
            for other in running:
                if other in processes and processes[other].poll() is None:
                    processes[other].terminate()
            while running:
                running.discard(results.get()[0])
            raise SystemExit(str(error))
        if jobs > 1:
            print(f"=== [{name}] done in {seconds:.0f} s", flush=True)
        finished(name, seconds)


def record_machine(path: str, run: dict, stage: str | None = None):
    """Add this run's machine and load to <save_dir>/summaries/machine.json (the report card shows them): the CPU,
    torch and dtype decide whether another run can reproduce the numbers bit for bit, and the load average before
    and after, with the share of the cores the stages got, says whether the wall times were measured on a busy
    machine. Rewritten after each stage, so a killed run still leaves its record."""
    if stage is not None:
        run["stages"].append(stage)
    elif not run["stages"]:
        return  # a run of the report alone trained nothing: the runs that made the numbers are already recorded
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    run.update(load_end=list(os.getloadavg()), wall_seconds=time.time() - run["start_time"],
               cpu_seconds=children.ru_utime + children.ru_stime - run["start_cpu"])
    runs = []
    if os.path.exists(path):
        with open(path) as f:
            runs = [r for r in json.load(f).get("runs", []) if r.get("started") != run["started"]]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"runs": runs + [{k: v for k, v in run.items() if k not in ("start_time", "start_cpu")}]}, f,
                  indent=2)


def new_machine_record(dtype: str | None, jobs: int = 1) -> dict:
    from scripts.report import machine
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"started": datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S"), **machine(dtype), "jobs": jobs,
            "stages": [], "load_start": list(os.getloadavg()), "start_time": time.time(),
            "start_cpu": children.ru_utime + children.ru_stime}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default="demo",
                        help=f"comma list of stages from {ORDER}, or a group: demo (every stage but the RL ones, "
                             f"the default), rl ({', '.join(RL_STAGES)}: reward model, PPO and agent RL on top of the "
                             f"demo's SFT and reasoning models), all")
    parser.add_argument("--force", action="store_true",
                        help="rerun stages whose output already exists (not the demo's shipped tokenizer)")
    parser.add_argument("--save_dir", default="out", help="where every stage writes (checkpoints, logs, report)")
    parser.add_argument("--quick", action="store_true", help="a few steps per stage with the nano model (smoke test)")
    parser.add_argument("--recipe", default="demo", choices=["demo", "minimind_gpu"],
                        help="demo: embedded data on any machine; minimind_gpu: MiniMind's datasets on GPUs")
    parser.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per stage under torchrun")
    parser.add_argument("--data_dir", default="dataset", help="where MiniMind's files are (minimind_gpu recipe)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="every training stage's --dtype (default: each script picks for the device)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="stages run at once on the CPU demo, each on cores / jobs threads, each stage as soon as "
                             "the stages it reads from are done (how much faster that is on 2 cores: "
                             "docs/README.md#stages-side-by-side). Every stage then writes its "
                             "output to <save_dir>/logs/pipeline_<stage>.log")
    parser.add_argument("--dry_run", action="store_true", help="print the commands without running them")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    if args.jobs > 1 and (args.recipe != "demo" or args.nproc > 1):
        parser.error("--jobs > 1 shares a CPU between stages: for the demo recipe without --nproc (GPU stages would "
                     "share one GPU's memory)")
    save_dir = os.path.abspath(args.save_dir) if os.path.isabs(args.save_dir) else args.save_dir
    if args.recipe == "minimind_gpu" and not args.dry_run:
        missing = [name for name in MINIMIND_FILES.values() if not os.path.exists(os.path.join(args.data_dir, name))]
        if missing:
            raise SystemExit(f"--recipe minimind_gpu: {', '.join(missing)} not in {args.data_dir}/; download "
                             f"MiniMind's datasets there (or point --data_dir at them)")
    recipe = build_recipe(save_dir, args.quick, args.recipe, args.data_dir, args.nproc, resume=not args.force,
                          dtype=args.dtype)
    wanted = [stage for s in args.stages.split(",") if s.strip() for stage in STAGE_GROUPS.get(s.strip(), [s.strip()])]
    unknown = [s for s in wanted if s not in ORDER]
    if unknown:
        raise SystemExit(f"unknown stages {unknown}; choose from {ORDER}")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    timings_file = os.path.join(ROOT, save_dir, "summaries", "pipeline.json")
    timings = {}
    if os.path.exists(timings_file):
        with open(timings_file) as f:
            timings = json.load(f)
    total_start = time.time()
    machine_file = os.path.join(ROOT, save_dir, "summaries", "machine.json")
    machine = None if args.dry_run else new_machine_record(args.dtype, args.jobs)
    todo = []
    for name in ORDER:
        if name not in wanted or name not in recipe:
            continue
        commands, done_file = recipe[name]
        if args.dry_run:
            for command in commands:
                print(" ".join(shlex.quote(c) for c in command))
            continue
        if name == "tokenizer" and done_file == SHIPPED_TOKENIZER and os.path.exists(os.path.join(ROOT, done_file)):
            # the repo's own tokenizer: every shipped test and number uses its ids, so --force does not retrain it
            print(f"=== [{name}] skipped: {done_file} is the shipped tokenizer (scripts.train_tokenizer retrains it)")
            continue
        if stage_finished(done_file, save_dir) and not args.force and name != "report":
            print(f"=== [{name}] skipped: {done_file} exists (--force to rerun)")
            continue
        todo.append(name)

    def finished(name: str, seconds: float):
        timings[name] = seconds
        if name != "report":
            record_machine(machine_file, machine, name)
        os.makedirs(os.path.dirname(timings_file), exist_ok=True)
        with open(timings_file, "w") as f:  # in ORDER: with --jobs stages finish out of order
            json.dump({stage: timings[stage] for stage in ORDER if stage in timings}, f, indent=2)

    def starting(name: str):
        if name == "report":  # the report shows the machine record, so it is complete before the report runs
            record_machine(machine_file, machine)

    run_stages(todo, recipe, env, args.jobs, os.path.join(ROOT, save_dir, "logs"), starting, finished)
    if not args.dry_run:
        print(f"\npipeline done in {time.time() - total_start:.0f} s; stage times: "
              + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))


if __name__ == "__main__":
    main()
