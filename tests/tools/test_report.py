"""scripts/report.py's figures, checked on the matplotlib objects rather than pixels: quantities of different scale
(losses, 0-1 rewards, token counts, summed log-prob margins) never share a y axis, every axis is labelled, held-out
curves start at step 0 even for stages that measure their starting point outside the training loop (SFT, LoRA), and
the report records the machine and its load that scripts/run_pipeline.py wrote."""
import json

import pytest

from scripts import report, run_pipeline

GRPO_LOG = [{"step": 0, "eval/reward": 0.31, "eval/accuracy": 0.01, "eval/completion_length": 61.5}] + \
    [{"step": s, "loss": 0.1 - 0.01 * s, "reward": 0.2 + 0.03 * s, "completion_length": 40.0 - s}
     for s in range(1, 11)] + \
    [{"step": 10, "eval/reward": 0.52, "eval/accuracy": 0.04, "eval/completion_length": 26.5}]
DPO_LOG = [{"step": 0, "eval/dpo_loss": 0.693, "eval/reward_accuracy": 0.0, "eval/logp_margin": -5.9,
            "eval/reward_margin": 0.0}] + \
    [{"step": s, "loss": 0.69 - 0.001 * s} for s in range(10, 110, 10)] + \
    [{"step": 100, "eval/dpo_loss": 0.61, "eval/reward_accuracy": 0.61, "eval/logp_margin": -2.8,
      "eval/reward_margin": 0.32}]
# SFT evaluates at the end of training only; its summary holds the numbers measured before and after
SFT_LOG = [{"step": s, "loss": 6.0 - 0.01 * s, "peak_mem_gb": 1.2} for s in range(10, 120, 10)] + \
    [{"step": 100, "eval/val_loss": 4.25}, {"step": 110, "eval/val_loss": 4.22}]
SFT_SUMMARY = {"steps": 110, "val_loss_before": 8.11, "val_loss_after": 4.22, "end_of_turn_rate_before": 0.0,
               "end_of_turn_rate_after": 0.73}


@pytest.fixture(autouse=True)
def close_figures():
    yield
    report.pyplot().close("all")


def lines_by_label(fig) -> dict:
    return {line.get_label(): (ax, line) for ax in fig.axes for line in ax.get_lines()}


def test_each_kind_of_quantity_has_its_own_labelled_axis():
    grpo = lines_by_label(report.curves_figure("grpo", GRPO_LOG))
    fraction_axes = {grpo[label][0] for label in ("rollout reward", "held-out reward", "held-out accuracy")}
    assert len(fraction_axes) == 1  # comparable 0-1 quantities share one axis
    assert grpo["held-out completion_length"][0] not in fraction_axes  # 0-60 tokens would flatten them
    assert grpo["train loss"][0] not in fraction_axes
    dpo = lines_by_label(report.curves_figure("dpo", DPO_LOG))
    assert dpo["held-out logp_margin"][0] is not dpo["held-out reward_margin"][0]  # -6 nats vs 0-0.3
    assert dpo["held-out logp_margin"][0] is not dpo["held-out reward_accuracy"][0]
    assert dpo["held-out dpo_loss"][0] is dpo["train loss"][0]
    for fig in (report.curves_figure("grpo", GRPO_LOG), report.curves_figure("dpo", DPO_LOG)):
        assert all(ax.get_ylabel() for ax in fig.axes)
        assert fig.axes[-1].get_xlabel() == "optimizer step"  # the panels share it


def test_held_out_curves_start_at_step_0_from_the_summary_when_the_log_has_no_step_0():
    series = report.curve_series(SFT_LOG, lambda key: True, SFT_SUMMARY)
    assert series["held-out val_loss"] == [(0, 8.11), (100, 4.25), (110, 4.22)]
    assert series[f"held-out end_of_turn_rate {report.ENDS_ONLY}"] == [(0, 0.0), (110, 0.73)]
    # a log that evaluated at step 0 itself keeps its own point
    assert report.curve_series(DPO_LOG, lambda key: True, {"dpo_loss_before": 0.5})["held-out dpo_loss"][0] == \
        (0, 0.693)
    sft = lines_by_label(report.curves_figure("full_sft", SFT_LOG, SFT_SUMMARY))
    assert list(sft["held-out val_loss"][1].get_xdata())[0] == 0
    assert sft[f"held-out end_of_turn_rate {report.ENDS_ONLY}"][0] is not sft["held-out val_loss"][0]


def test_report_card_reads_losses_and_fractions_on_two_labelled_axes():
    logs = {"grpo": GRPO_LOG, "full_sft": SFT_LOG}
    summaries = {"full_sft": SFT_SUMMARY, "grpo": {}}
    fig = report.report_card_figure(["full_sft", "grpo"], logs, summaries, {"sft": 60.0})
    lines = lines_by_label(fig)
    assert lines["train loss"][0] is not lines["rollout reward"][0]
    assert lines["rollout reward"][0] is lines["held-out reward"][0]
    assert all(ax.get_ylabel() for ax in fig.axes if ax.get_lines())
    assert all(ax.get_xlabel() == "optimizer step" for ax in fig.axes if ax.get_title())
    sft_val = [line for ax in fig.axes if ax.get_title().startswith("full_sft") for line in ax.get_lines()
               if line.get_label() == "held-out val_loss"]
    assert list(sft_val[0].get_xdata())[0] == 0


def test_report_records_the_machine_and_its_load(tmp_path):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "full_sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in SFT_LOG))
    machine_file = tmp_path / "summaries" / "machine.json"
    run = run_pipeline.new_machine_record("float32")
    run_pipeline.record_machine(str(machine_file), run, "sft")
    recorded = json.loads(machine_file.read_text())["runs"]
    assert len(recorded) == 1 and recorded[0]["stages"] == ["sft"] and recorded[0]["dtype"] == "float32"
    assert len(recorded[0]["load_start"]) == 3 and recorded[0]["cores"] >= 1 and recorded[0]["torch"]
    run_pipeline.record_machine(str(machine_file), run)  # before the report: the same run, updated, not a second
    assert len(json.loads(machine_file.read_text())["runs"]) == 1
    text = report.build_report(str(tmp_path))
    row = next(line for line in text.splitlines() if line.startswith(f"| {run['started']} |"))
    for expected in (report.cpu_model(), "float32", recorded[0]["torch"], "at start", "at end", "cores ("):
        assert expected in row
    assert "bit for bit" in text and "sft" in row


def test_pipeline_wall_time_adds_stages_up_only_when_they_ran_one_after_another():
    stages = {"pretrain": 300.0, "teacher": 600.0}
    assert report.pipeline_minutes(stages, [{"jobs": 1, "wall_seconds": 910.0}]) == 15.0
    assert report.pipeline_minutes(stages, []) == 15.0  # runs that predate the machine record
    # side by side (--jobs 2) the two stages overlapped: two runs of 620 s and 100 s took 12 min, not 15
    assert report.pipeline_minutes(stages, [{"jobs": 2, "wall_seconds": 620.0}, {"jobs": 1, "wall_seconds": 100.0}]) \
        == 12.0
    # a run whose every stage a later run redid (--force) no longer counts; one that a later run redid in part does
    runs = [{"jobs": 2, "wall_seconds": 600.0, "stages": ["pretrain", "sft"]},
            {"jobs": 2, "wall_seconds": 300.0, "stages": ["reward", "agent"]},
            {"jobs": 2, "wall_seconds": 120.0, "stages": ["reward", "agent"]},
            {"jobs": 2, "wall_seconds": 60.0, "stages": ["sft"]}]
    assert report.pipeline_minutes(stages, runs) == 13.0


DPO_SUMMARY = {"steps": 298, "reward_accuracy_before": 0.0, "reward_accuracy_after": 0.6,
               "by_type/looping_reply/pairs_before": 15, "by_type/looping_reply/pairs_after": 15,
               "by_type/looping_reply/pref_accuracy_before": 0.4, "by_type/looping_reply/pref_accuracy_after": 1.0,
               "by_type/looping_reply/reward_accuracy_before": 0.0, "by_type/looping_reply/reward_accuracy_after": 0.93,
               "by_type/wrong_poet/pairs_before": 20, "by_type/wrong_poet/pairs_after": 20,
               "by_type/wrong_poet/pref_accuracy_before": 0.5, "by_type/wrong_poet/pref_accuracy_after": 0.55,
               "by_type/wrong_poet/reward_accuracy_before": 0.0, "by_type/wrong_poet/reward_accuracy_after": 0.45}
DISTILL = {"steps": 227, "alpha": 0.5, "temperature": 2.0, "teacher": "teacher_sft", "teacher_val_loss": 3.70,
           "val_loss_before": 4.157, "val_loss_after": 3.85, "kl_to_teacher_before": 0.398, "kl_to_teacher_after": 0.2}
DISTILL_CE = {"steps": 227, "alpha": 1.0, "temperature": 1.0, "teacher": "teacher_sft", "teacher_val_loss": 3.70,
              "val_loss_before": 4.157, "val_loss_after": 3.869, "kl_to_teacher_before": 0.398,
              "kl_to_teacher_after": 0.611}
SAMPLES = {"model": "full_sft_256", "samples": {}, "results": [
    {"prompt": "谁写了《江上遇疾风》？", "answer": "张九龄。", "reference": "《江上遇疾风》的作者是唐代诗人张九龄。",
     "domain": "in domain"},
    {"prompt": "6 + 10 = ?\nThink inside <think></think>", "answer": "<think>\n6 + 10 = 16\n</think> a|b",
     "reference": "16", "domain": "in domain"},
    {"prompt": "What is machine learning?", "answer": "The king.", "domain": "out of domain"}]}


def write_run(tmp_path, summaries: dict, logs: dict):
    (tmp_path / "logs").mkdir()
    (tmp_path / "summaries").mkdir()
    for name, records in logs.items():
        (tmp_path / "logs" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for name, content in summaries.items():
        (tmp_path / "summaries" / f"{name}.json").write_text(json.dumps(content, ensure_ascii=False))


def table_after(text: str, heading: str) -> list[str]:
    lines = text.splitlines()
    start = lines.index(heading)
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("## "):
            break
        if line.startswith("|"):
            rows.append(line)
    return rows


def test_report_renders_dpo_by_type_distillation_vs_ce_and_samples_with_references(tmp_path):
    write_run(tmp_path, {"dpo": DPO_SUMMARY, "distill": DISTILL, "distill_ce": DISTILL_CE,
                         "samples_full_sft": SAMPLES}, {"dpo": DPO_LOG})
    text = report.build_report(str(tmp_path))
    by_type = table_after(text, "## DPO by type")
    assert by_type[2:] == ["| looping_reply | 15 | 0.40 -> 1.00 | 0.00 -> 0.93 |",
                           "| wrong_poet | 20 | 0.50 -> 0.55 | 0.00 -> 0.45 |"]
    held_out = table_after(text, "## Held-out results (before -> after)")
    assert not any("by_type" in row for row in held_out) and any("| dpo | reward_accuracy |" in r for r in held_out)
    kd = table_after(text, "## Distillation vs CE only")
    assert kd[0] == "| held-out, per token | start | KD (alpha 0.5, T 2.0) | CE only (alpha 1) |"
    assert kd[2] == "| loss (CE on the reference) | 4.1570 | 3.8500 | 3.8690 |"
    assert kd[3] == "| KL(teacher ‖ student) | 0.3980 | 0.2000 | 0.6110 |"
    assert "KD wins on held-out loss: 3.8500 vs 3.8690 (-0.0190)." in text and "held-out loss: 3.7000" in text
    samples = table_after(text, "## Samples")
    assert samples[0] == "| stage | prompt | reference | answer | domain |"
    assert samples[2] == ("| full_sft | 谁写了《江上遇疾风》？ | 《江上遇疾风》的作者是唐代诗人张九龄。 | 张九龄。 | "
                          "in domain |")
    assert samples[3] == ("| full_sft | 6 + 10 = ? Think inside &lt;think&gt;&lt;/think&gt; | 16 | "
                          "&lt;think&gt; 6 + 10 = 16 &lt;/think&gt; a\\|b | in domain |")
    assert samples[4] == "| full_sft | What is machine learning? | - | The king. | out of domain |"
    # the per-type curves stay out of the stage's figure (a table holds them)
    fig = report.curves_figure("dpo", DPO_LOG + [{"step": 100, "eval/by_type/wrong_poet/pref_accuracy": 0.5}])
    assert not any("by_type" in label for label in lines_by_label(fig))


def test_distillation_table_needs_both_runs_and_says_when_kd_loses(tmp_path):
    assert report.distillation_lines(DISTILL, None) == []
    lines = report.distillation_lines({**DISTILL, "val_loss_after": 3.929}, DISTILL_CE)
    assert "KD does not win on held-out loss: 3.9290 vs 3.8690 (+0.0600)." in lines


def test_the_rl_stages_headline_their_own_goal_not_the_first_metric_in_the_alphabet():
    ppo = {"completion_length_before": 36.2, "completion_length_after": 25.8, "score_before": -0.84,
           "score_after": -0.03}
    assert report.headline("ppo", ppo) == ("score", -0.84, -0.03)
    agent = {"args_correct_before": 0.0, "args_correct_after": 0.0, "success_before": 0.0, "success_after": 0.01}
    assert report.headline("agent", agent)[0] == "success"
    reward = {"accuracy/looping_reply_before": 0.4, "accuracy/looping_reply_after": 1.0, "accuracy_before": 0.48,
              "accuracy_after": 0.6}
    assert report.headline("reward", reward)[0] == "accuracy"


def test_the_recorded_commit_says_when_the_code_differed_from_it(monkeypatch):
    """A run from a working tree with changes to tracked files records <hash>+changes, never the bare hash."""
    import subprocess
    answers = {"rev-parse": "abc1234\n", "status": ""}

    def fake_git(command, **kwargs):
        return subprocess.CompletedProcess(command, 0, stdout=answers[command[1]], stderr="")

    monkeypatch.setattr(report.subprocess, "run", fake_git)
    assert report.git_commit() == "abc1234"
    answers["status"] = " M train_lora.py\n"
    assert report.git_commit() == "abc1234+changes"
    answers["rev-parse"] = ""
    assert report.git_commit() == "unknown"


def test_seed_reruns_get_a_table_of_their_own_and_no_panel_of_their_own(tmp_path):
    """<stage>_seed<N> runs sit beside the stage's own run in one row: each run's after, their mean and spread,
    the smallest gain and the mean over the start; the card keeps one panel for the stage."""
    runs = {"grpo": 0.87, "grpo_seed1": 0.91, "grpo_seed2": 0.92}
    summaries = {name: {"accuracy_before": 0.25, "accuracy_after": after, "reward_before": 0.7,
                        "reward_after": after + 0.5, "samples": {"What is 12 + 30?": f"42 ({name})"}}
                 for name, after in runs.items()}
    write_run(tmp_path, summaries, {name: GRPO_LOG for name in runs})
    text = report.build_report(str(tmp_path))
    assert [row.split(" | ")[0] for row in table_after(text, "## Samples")[2:]] == ["| grpo"]  # not once a seed
    seeds = table_after(text, "## Seeds")
    assert seeds[2] == ("| grpo | accuracy | 0.25 | 0.87 (grpo), 0.91 (grpo_seed1), 0.92 (grpo_seed2) | "
                        "0.9 ± 0.026 | +0.62 | 3.6x |")
    fig = report.report_card_figure(["grpo", "grpo_seed1", "grpo_seed2"], {n: GRPO_LOG for n in runs}, summaries,
                                    {})
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["grpo\naccuracy 0.25 -> 0.87 (3 seeds: 0.9 ± 0.026)"]
    assert report.seed_lines({"grpo_seed1": summaries["grpo_seed1"]}) == []  # no run of the stage itself
