"""The whole pipeline on the quick setting: every stage leaves its checkpoint, its metrics log and the report; and
the GPU recipe's own commands on stand-ins for MiniMind's files (same names, same shapes, no _val.jsonl twins)."""
import json
import os
import subprocess
import sys

import pytest

from scripts import run_pipeline
from tests import ROOT


def run_quick_pipeline(out, *flags) -> str:
    """The pipeline at the quick setting; checks every stage left its checkpoint and returns what it printed."""
    result = subprocess.run([sys.executable, "-m", "scripts.run_pipeline", "--quick", "--save_dir", str(out), *flags],
                            cwd=ROOT, capture_output=True, text=True, timeout=1500,
                            env=dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="2"))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    for weights in ["pretrain_64.pth", "full_sft_64.pth", "lora/lora_identity_64.pth", "dpo_64.pth",
                    "teacher_sft_96.pth", "distill_64.pth", "reason_64.pth", "grpo_64.pth"]:
        assert (out / weights).exists(), weights
    return result.stdout


def test_quick_pipeline_runs_every_stage_and_writes_the_report(tmp_path):
    out = tmp_path / "out"
    run_quick_pipeline(out)
    for log in ["pretrain", "full_sft", "dpo", "distill", "reason", "grpo"]:
        records = [json.loads(line) for line in open(out / "logs" / f"{log}.jsonl")]
        assert any("loss" in r for r in records), log
    report = (out / "report.md").read_text()
    assert "## Held-out results" in report and "| pretrain | val_loss |" in report
    images = list((out / "report_images").glob("*.png"))
    assert len(images) >= 6 and all(image.stat().st_size > 1000 for image in images)
    assert (out / "report_images" / "report_card.png").exists() and "![report card]" in report
    # stages that measure their own before/after (SFT, LoRA, reasoning format) pair them in the report
    assert "| full_sft | end_of_turn_rate |" in report and "| reason | well_formed |" in report
    assert (out / "data" / "demo_pretrain_clean.jsonl").exists()
    # every trained checkpoint answered held-out prompts from its own data, beside their references, in the one
    # process of the eval stage (scripts/sample_stages.py)
    from scripts.sample_stages import HELD_OUT_SAMPLES
    for name, *_ in HELD_OUT_SAMPLES:
        samples = json.loads((out / "summaries" / f"samples_{name}.json").read_text())
        assert any(r.get("reference") for r in samples["results"]), name

    # the opt-in RL pipeline on top of the same SFT model: reward model, PPO, agent SFT and agent RL; two stages at
    # a time (reward -> ppo beside agent_sft -> agent), each into its own log
    printed = run_quick_pipeline(out, "--stages", "rl", "--jobs", "2")
    assert "=== [ppo] done in" in printed and (out / "logs" / "pipeline_agent.log").exists()
    for weights in ["reward_64.pth", "ppo_64.pth", "agent_sft_64.pth", "agent_64.pth", "agent_seed1_64.pth",
                    "agent_seed2_64.pth", "grpo_seed1_64.pth", "grpo_seed2_64.pth", "reward_seed2_64.pth",
                    "ppo_seed2_64.pth"]:
        assert (out / weights).exists(), weights
    toolcall = json.loads((out / "summaries" / "agent_toolcall.json").read_text())
    assert toolcall, "eval_toolcall wrote nothing"
    report = (out / "report.md").read_text()
    assert "| reward |" in report and "| ppo |" in report and "| agent |" in report
    # GRPO, the reward model, PPO and agent RL, each from one checkpoint with three seeds, side by side
    assert "## Seeds" in report
    assert all(f"({stage}_seed2)" in report for stage in ("grpo", "reward", "ppo", "agent"))


def write_minimind_stand_ins(data_dir, lines_per_file=400):
    """MiniMind's file names and formats, filled from the demo data: pretraining text is several
    `<|im_start|>...<|im_end|>` passages per line as in pretrain_hq.jsonl, the SFT file has a tool-calling chat whose
    schemas sit in the system message's "functions" field, and no file has a _val.jsonl beside it."""
    os.makedirs(data_dir, exist_ok=True)

    def demo_lines(name):
        with open(os.path.join(ROOT, "dataset", name), encoding="utf-8") as f:
            return [json.loads(line) for line in f][:lines_per_file]

    def write(name, rows):
        with open(os.path.join(data_dir, name), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)

    texts = [row["text"] for row in demo_lines("demo_pretrain.jsonl")]
    write("pretrain_hq.jsonl", [{"text": " ".join(f"<|im_start|>{t}<|im_end|>" for t in texts[i:i + 2])}
                                for i in range(0, len(texts), 2)])
    schema = {"type": "function", "function": {"name": "add", "description": "Add two numbers",
                                               "parameters": {"type": "object", "properties": {
                                                   "a": {"type": "number"}, "b": {"type": "number"}}}}}
    tool_chat = {"conversations": [
        {"role": "system", "content": "You can call tools.", "functions": [schema]},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
        {"role": "tool", "content": "5"}, {"role": "assistant", "content": "2 + 3 = 5."}]}
    write("sft_mini_512.jsonl", demo_lines("demo_sft.jsonl") + [tool_chat] * 3)
    write("lora_identity.jsonl", demo_lines("demo_lora_identity.jsonl"))
    write("dpo.jsonl", demo_lines("demo_dpo.jsonl"))
    write("r1_mix_1024.jsonl", demo_lines("demo_reason.jsonl"))


@pytest.mark.slow
def test_the_gpu_recipe_commands_run_on_minimind_shaped_files(tmp_path):
    """What `--recipe minimind_gpu` runs, flag for flag, at the quick setting on the CPU: catches a flag or a data
    assumption (a _val.jsonl twin, a field) that MiniMind's files would break before anyone rents a GPU."""
    data_dir, out = tmp_path / "minimind", tmp_path / "out"
    write_minimind_stand_ins(str(data_dir))
    printed = run_quick_pipeline(out, "--recipe", "minimind_gpu", "--data_dir", str(data_dir))
    assert "sft_mini_512.jsonl, so 4 of its conversations chosen at random" in printed
    assert (out / "data" / "pretrain_hq_clean.jsonl").exists()
    # its own tokenizer, learned from the stand-ins, recorded in every checkpoint's config
    assert (out / "tokenizer" / "tokenizer.json").exists()
    for weights in ["pretrain_64", "grpo_64"]:
        config = json.loads((out / f"{weights}.json").read_text())
        assert config["tokenizer_path"] == str(out / "tokenizer"), weights
    assert "![report card]" in (out / "report.md").read_text()


@pytest.mark.parametrize("recipe", ["demo", "minimind_gpu"])
def test_killed_training_stages_resume_unless_forced(recipe):
    """Without --force every training command carries --from_resume 1 (a killed multi-hour stage goes on from its
    last checkpoint); with --force none does (a rerun starts from scratch)."""
    for resume in (True, False):
        stages = run_pipeline.build_recipe("out", quick=False, recipe=recipe, resume=resume)
        commands = [c for commands, _ in stages.values() for c in commands]
        training = [c for c in commands if any(part.startswith("train_") for part in c)]
        # 14 stages' commands, and in the demo two more seeds of GRPO, the reward model, PPO and agent RL
        assert len(training) == (22 if recipe == "demo" else 14)
        assert all(("--from_resume" in c) == resume for c in training)
        assert not any("--from_resume" in c for c in commands if c not in training)


def test_gpu_recipe_names_the_missing_minimind_files(tmp_path):
    (tmp_path / "dpo.jsonl").write_text("")
    with pytest.raises(SystemExit, match=f"pretrain_hq.jsonl, sft_mini_512.jsonl, lora_identity.jsonl, "
                                         f"r1_mix_1024.jsonl not in {tmp_path}/"):
        run_pipeline.main(["--recipe", "minimind_gpu", "--data_dir", str(tmp_path), "--save_dir", str(tmp_path)])


def test_a_killed_stage_is_not_taken_for_done(tmp_path):
    """The Trainer writes <stage>_<h>.pth every --save_interval steps: only the run's final summary says it ended."""
    out = tmp_path / "out"
    (out / "summaries").mkdir(parents=True)
    (out / "pretrain_256.pth").write_bytes(b"weights of step 100")
    assert not run_pipeline.stage_finished(str(out / "pretrain_256.pth"), str(out))
    (out / "summaries" / "pretrain.json").write_text("{}")
    assert run_pipeline.stage_finished(str(out / "pretrain_256.pth"), str(out))
    (out / "lora").mkdir()
    (out / "lora" / "lora_identity_256.pth").write_bytes(b"adapter")
    assert not run_pipeline.stage_finished(str(out / "lora" / "lora_identity_256.pth"), str(out))
    assert run_pipeline.stage_finished(str(out / "report.md"), str(out)) is False


def test_every_stage_needs_only_stages_before_it_and_priority_names_them_all():
    for stage, needs in run_pipeline.NEEDS.items():
        assert all(run_pipeline.ORDER.index(n) < run_pipeline.ORDER.index(stage) for n in needs), stage
    assert sorted(run_pipeline.PRIORITY) == sorted(run_pipeline.ORDER)
    # the eval stage reads every checkpoint the samples are made from
    from scripts.sample_stages import BUILTIN_SAMPLES, HELD_OUT_SAMPLES
    samples = HELD_OUT_SAMPLES + BUILTIN_SAMPLES
    assert {weight for _, weight, _, _ in samples} <= {"full_sft"} | set(run_pipeline.NEEDS["eval"])


def fake_recipe(tmp_path, durations: dict, fail: str | None = None) -> dict:
    """Stages that only write 'start <name> <time>' and 'end <name> <time>' to one file and sleep in between."""
    trace = tmp_path / "trace.txt"
    recipe = {}
    for name, seconds in durations.items():
        code = (f"import sys, time; f = open({str(trace)!r}, 'a'); f.write(f'start {name} {{time.time()}}\\n'); "
                f"f.flush(); time.sleep({seconds}); f.write(f'end {name} {{time.time()}}\\n'); "
                f"sys.exit({int(name == fail)})")
        recipe[name] = ([[sys.executable, "-c", code]], None)
    return recipe


def read_trace(tmp_path) -> dict:
    times = {}
    for line in (tmp_path / "trace.txt").read_text().splitlines():
        event, name, when = line.split()
        times[(event, name)] = float(when)
    return times


def test_jobs_run_independent_stages_side_by_side_and_wait_for_what_they_need(tmp_path):
    durations = {"clean": 0.1, "pretrain": 1.0, "teacher": 1.0, "sft": 0.1, "reason": 0.3, "distill": 0.1,
                 "eval": 0.1}
    finished = []
    run_pipeline.run_stages(list(durations), fake_recipe(tmp_path, durations), dict(os.environ), 2,
                            str(tmp_path / "logs"), lambda name: None, lambda name, s: finished.append(name))
    t = read_trace(tmp_path)
    for stage in durations:  # nothing starts before the stages it reads from have ended
        for need in run_pipeline.NEEDS.get(stage, []):
            if need in durations:
                assert t[("start", stage)] >= t[("end", need)], (stage, need)
    assert t[("start", "teacher")] < t[("end", "pretrain")]  # the teacher ran beside pretraining
    for moment in [t[("start", s)] for s in durations]:  # never more than two at once
        assert sum(t[("start", s)] <= moment < t[("end", s)] for s in durations) <= 2
    assert sorted(finished) == sorted(durations) and (tmp_path / "logs" / "pipeline_teacher.log").exists()


def test_one_job_runs_in_order_and_a_failed_stage_stops_the_run(tmp_path):
    durations = {"clean": 0.1, "pretrain": 0.1, "teacher": 0.1, "sft": 0.1}
    run_pipeline.run_stages(list(durations), fake_recipe(tmp_path, durations), dict(os.environ), 1,
                            str(tmp_path / "logs"), lambda name: None, lambda name, s: None)
    t = read_trace(tmp_path)
    assert sorted(durations, key=lambda s: t[("start", s)]) == ["clean", "pretrain", "sft", "teacher"]  # ORDER
    (tmp_path / "trace.txt").unlink()
    durations = {"clean": 0.1, "pretrain": 0.1, "teacher": 5.0, "sft": 0.1}
    with pytest.raises(SystemExit, match=r"stage 'pretrain' failed \(exit 1\) \(its output: .*pipeline_pretrain.log\)"):
        run_pipeline.run_stages(list(durations), fake_recipe(tmp_path, durations, fail="pretrain"),
                                dict(os.environ), 2, str(tmp_path / "logs"), lambda name: None, lambda name, s: None)
    t = read_trace(tmp_path)
    assert ("start", "sft") not in t and ("end", "teacher") not in t  # sft never began; the teacher was stopped


def test_shared_stages_get_their_share_of_the_threads():
    assert run_pipeline.with_threads(["python", "train_sft.py", "--x", "1"], 1)[-2:] == ["--num_threads", "1"]
    assert run_pipeline.with_threads(["python", "-m", "scripts.sample_stages"], 2)[-2:] == ["--num_threads", "2"]
    assert run_pipeline.with_threads(["python", "-m", "scripts.report"], 1) == ["python", "-m", "scripts.report"]
    assert run_pipeline.with_threads(["python", "train_sft.py"], None) == ["python", "train_sft.py"]
    with pytest.raises(SystemExit):
        run_pipeline.main(["--jobs", "2", "--recipe", "minimind_gpu", "--dry_run"])


def test_a_stage_left_alone_is_offered_the_idle_cores(tmp_path, monkeypatch):
    """Once nothing else can start, the stage still running is offered every core through its threads file (the
    Trainer takes them at its next step); a stage beside another is never offered more than its share."""
    trace = tmp_path / "trace.txt"
    recipe = {}
    for name, seconds in {"clean": 0.1, "pretrain": 0.5, "teacher": 2.5}.items():
        code = (f"import os, time; f = open({str(trace)!r}, 'a'); end = time.time() + {seconds}\n"
                f"while time.time() < end:\n"
                f"    path = os.environ.get({run_pipeline.THREADS_FILE_ENV!r})\n"
                f"    if path and os.path.exists(path):\n"
                f"        f.write(f'{name} ' + open(path).read() + ' ' + str(time.time()) + '\\n'); f.flush()\n"
                f"    time.sleep(0.05)\n"
                f"f.write(f'end {name} ' + str(time.time()) + '\\n')")
        recipe[name] = ([[sys.executable, "-c", code]], None)
    monkeypatch.setattr(run_pipeline.os, "cpu_count", lambda: 4)
    run_pipeline.run_stages(list(recipe), recipe, dict(os.environ), 2, str(tmp_path / "logs"), lambda name: None,
                            lambda name, s: None)
    lines = [line.split() for line in trace.read_text().splitlines()]
    pretrain_end = next(float(when) for event, name, when in lines if event == "end" and name == "pretrain")
    offers = [(name, int(count), float(when)) for name, count, when in lines if name != "end"]
    assert offers and {name for name, _, _ in offers} == {"teacher"}  # pretrain was never alone
    assert all(count == 4 and when >= pretrain_end for _, count, when in offers)
    assert not list((tmp_path / "logs").glob("threads_*"))  # each stage's file is gone once it ends


def test_runtime_takes_the_offered_threads(tmp_path, monkeypatch):
    import torch

    from model.training import runtime
    assert runtime.THREADS_FILE_ENV == run_pipeline.THREADS_FILE_ENV
    before = torch.get_num_threads()
    monkeypatch.setenv(runtime.THREADS_FILE_ENV, str(tmp_path / "threads"))
    try:
        assert runtime.take_offered_threads() is None  # no offer yet
        (tmp_path / "threads").write_text("3")
        assert runtime.take_offered_threads() == 3 and torch.get_num_threads() == 3
        assert runtime.take_offered_threads() is None  # taken already
        (tmp_path / "threads").write_text("not a number")
        assert runtime.take_offered_threads() is None
    finally:
        torch.set_num_threads(before)


def test_samples_skip_the_stages_that_were_not_run(tmp_path, capsys):
    from scripts import sample_stages
    sample_stages.main(["--save_dir", str(tmp_path), "--hidden_size", "64"])
    printed = capsys.readouterr().out
    assert printed.count("skipped") == len(sample_stages.HELD_OUT_SAMPLES)
    assert "lora/lora_identity_64.pth does not exist" in printed and not list(tmp_path.iterdir())


def test_force_does_not_retrain_the_shipped_tokenizer(tmp_path, capsys):
    """The demo recipe's tokenizer stage writes model/tokenizer.json, the one every shipped number and test uses:
    --force reruns the stages named, but leaves that file as it is (a retrained one orders its merges differently)."""
    shipped = os.path.join(ROOT, run_pipeline.SHIPPED_TOKENIZER)
    before = open(shipped, "rb").read()
    run_pipeline.main(["--stages", "tokenizer", "--force", "--save_dir", str(tmp_path / "out")])
    assert "is the shipped tokenizer" in capsys.readouterr().out
    assert open(shipped, "rb").read() == before
