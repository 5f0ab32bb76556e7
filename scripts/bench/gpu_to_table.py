"""The JSON of `python -m scripts.bench.gpu` as the markdown for docs/benchmarks.md: one short table per section, a
section that failed or ran out of time as one line saying so (with what it did measure, if anything).

    python -m scripts.bench.gpu_to_table                          # docs/bench_gpu.json
    python -m scripts.bench.gpu_to_table out/bench_gpu_tiny.json  # the dry run's
    python -m scripts.bench.gpu_to_table run.json rerun.json      # a run and a rerun of some sections, merged
"""
import argparse
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def number(value, spec: str = ",.0f", suffix: str = "") -> str:
    """A figure, or '-' where the run has none (a section stopped early, a value it does not measure)."""
    if value is None:
        return "-"
    return f"{value:{spec}}{suffix}"


def flops_text(tflops) -> str:
    if tflops is None:
        return "-"
    return f"{tflops:.0f} TFLOP/s" if tflops >= 1 else f"{tflops * 1e3:.0f} GFLOP/s"


def percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def machine_line(report: dict) -> list[str]:
    m = report["sections"].get("machine", {}).get("results", {})
    if not m:
        return [f"Device: {report.get('device', '?')} (the machine section did not run)."]
    what = m.get("gpu") or m.get("cpu", "?")
    spec = m.get("peak_flops_spec")
    spec_text = f", spec sheet {spec / 1e12:.0f} TFLOP/s" if spec else ""
    line = (f"Measured by `{report.get('command', 'python -m scripts.bench.gpu')}` on {what} "
            f"(torch {m.get('torch')}, CUDA {m.get('cuda')}, driver {m.get('driver', '-')}), commit "
            f"{(m.get('git_commit') or '?')[:7]}, {report.get('started', '?')[:10]}. bf16 matmul measured at "
            f"{flops_text(m.get('matmul_tflops_measured'))}{spec_text}; flash SDPA "
            f"{m.get('flash_sdpa', '-')}.")
    if report.get("tiny"):
        line += " **Tiny shapes (`--tiny`): a dry run of the script, not a measurement.**"
    return [line]


def pretrain_rows(report: dict) -> list[list[str]]:
    rows = []
    for section in ("pretrain_small", "pretrain_base"):
        r = report["sections"].get(section, {}).get("results", {})
        for mode, label in (("packed_bf16", "eager"), ("packed_bf16_compile", "torch.compile")):
            if mode in r:
                m = r[mode]
                name = section.split("_")[1]
                preset = r["preset"] if r["preset"] == name else f"{name} (as {r['preset']})"
                rows.append([f"{preset}, {r['params_m']:.1f}M", label, number(m.get("all_tok_s")),
                             percent(m.get("mfu")), percent(m.get("of_measured_matmul")),
                             number(m.get("peak_mem_gb"), ".2f", " GB"), number(m.get("warmup_s"), ".0f", " s")])
    return rows


def minimind_rows(r: dict) -> list[list[str]]:
    rows = []
    base = (r.get(r.get("compared_with", "minimind_style")) or {}).get("useful_tok_s")
    for key, label in (("minimind_own", "MiniMind's own trainer"),
                       ("minimind_style", "MiniMind-style padded loop (our re-implementation)"),
                       ("ours", "TinyMind, packed, eager"), ("ours_compiled", "TinyMind, packed, torch.compile")):
        m = r.get(key)
        if m:
            ratio = f"{m['useful_tok_s'] / base:.2f}x" if base else "-"
            rows.append([label, str(m.get("dtype", "-")), number(m.get("useful_tok_s")), percent(m.get("pad_fraction")),
                         percent(m.get("mfu")), ratio])
    return rows


def recipe_lines(r: dict) -> list[str]:
    rows = []
    for name, s in r.get("stages", {}).items():
        rows.append([name, number(s.get("logged_steps"), ","), number(s.get("s_per_step"), ".3f"),
                     percent(s.get("mfu")), number(s.get("setup_s"), ".0f", " s"), number(s.get("full_steps"), ",.0f"),
                     number(s["projected_s"] / 3600 if s.get("projected_s") is not None else None, ".2f"),
                     s.get("status", "error" if s.get("returncode") else "ok")])
    for name, p in r.get("tokenize", {}).items():
        rows.append([f"tokenize {name}", "-", "-", "-", number(p.get("seconds"), ".1f", " s"), "-",
                     number(p["projected_s"] / 3600, ".2f"), f"{p.get('mb', 0):.1f} MB timed"])
    lines = table(["stage", "steps run", "s / step", "MFU", "set-up (timed)", "full-recipe steps", "projected h",
                   ""], rows)
    total = [f"Projected: whole recipe {number(r.get('projected_hours'), '.2f')} h"]
    if r.get("zero_recipe_minutes") is not None:
        total.append(f"the zero recipe (pretrain_hq + sft_mini_512, one epoch each) {r['zero_recipe_minutes']:.0f} min")
    if r.get("projected_missing_stages"):
        total.append("not measured: " + ", ".join(r["projected_missing_stages"]))
    return lines + ["", "; ".join(total) + ".", "", r.get("note", "")]


def status_line(name: str, entry: dict) -> list[str]:
    """Nothing for a section that ran to the end; else its status and the last line of its error."""
    if entry.get("status", "ok") == "ok":
        return []
    error = (entry.get("error") or "").strip().splitlines()
    return [f"*{name}: {entry['status']}{': ' + error[-1] if error else ''}*", ""]


def to_markdown(report: dict) -> str:
    sections = report.get("sections", {})
    lines = machine_line(report) + [""]

    def results(name):
        return sections.get(name, {}).get("results", {})

    def heading(name, title):
        """The section's title and, unless it ran to the end, what stopped it; True when it has figures."""
        entry = sections.get(name)
        lines.extend([f"**{title}**" + ("" if entry is None else f" ({entry.get('seconds', '-')} s)"), ""])
        if entry is None:
            lines.append("*not run*")
            return False
        lines.extend(status_line(name, entry))
        return bool(entry.get("results"))

    S = results("pretrain_small") or results("pretrain_base")
    if heading("pretrain_small", f"Pretraining, batch {S.get('batch', '-')} x {S.get('seq_len', '-')}, bf16") or S:
        lines += status_line("pretrain_base", sections.get("pretrain_base", {}))
        lines += table(["preset", "mode", "tokens/s", "MFU (spec)", "of measured matmul", "peak memory",
                        "warm-up (compile)"], pretrain_rows(report))
    lines.append("")

    if heading("minimind", "MiniMind side by side (same shape, batch and sequence length)"):
        r = results("minimind")
        lines += table(["loop", "dtype", "useful tokens/s", "padding", "MFU (all positions)", "vs MiniMind"],
                       minimind_rows(r))
        notes = [r.get("minimind_own_source"), r.get("minimind_style_source")]
        if r.get("minimind_own_error"):
            notes.append(f"MiniMind's own trainer failed: {r['minimind_own_error'].strip().splitlines()[-1]}")
        lines += ["", " ".join(n + "." for n in notes if n)]
    lines.append("")

    r = results("sft")
    if heading("sft", f"SFT, {r.get('preset', '')} preset, rows of {r.get('max_seq_len', '-')}"):
        rows = []
        for mode, label in (("packed", "packed"), ("pad_to_batch_max", "padded to the batch max"),
                            ("pad_to_max_seq_len", "padded to max_seq_len (MiniMind)")):
            if mode in r:
                ratio = r.get(f"packed_vs_{mode}")
                rows.append([label, number(r[mode].get("tokens_per_sec")), percent(r[mode].get("pad_share")),
                             "1.00x" if mode == "packed" else number(ratio, ".2f", "x")])
        lines += table(["batching", "real tokens/s", "padding", "packing's speed-up"], rows)
    lines.append("")

    r = results("dpo")
    if heading("dpo", f"DPO, {r.get('pairs_per_step', '-')} pairs x {r.get('seq_len', '-')} tokens"):
        lines += table(["reference", "s / step", "peak memory (MB)"],
                       [[mode, number(r[mode].get("step_s"), ".3f"), number(r[mode].get("peak_mb"))]
                        for mode in ("live", "precomputed") if mode in r])
    lines.append("")

    r = results("grpo")
    if heading("grpo", f"GRPO rollouts, {r.get('prompts', '-')} prompts x G = {r.get('generations', '-')}, "
                       f"{r.get('new_tokens', '-')} tokens each"):
        lines += table(["generation", "tokens/s"],
                       [["one batched KV-cached generate", number(r.get("batched_tokens_per_sec"))],
                        ["one completion at a time, KV cache", number(r.get("sequential_tokens_per_sec"))]])
    lines.append("")

    r = results("distill")
    if heading("distill", f"Distillation, student {r.get('student', '-')}, teacher {r.get('teacher', '-')}, "
                          f"{r.get('batch', '-')} x {r.get('seq_len', '-')}"):
        lines += table(["step", "tokens/s", "s / step"],
                       [[name, number(r[key].get("tokens_per_sec")), number(r[key].get("step_s"), ".3f")]
                        for key, name in (("sft_step", "SFT (no teacher)"), ("distill_step", "distillation"))
                        if key in r])
    lines.append("")

    r = results("decode")
    batches = sorted({int(k.split("_")[1]) for v in r.values() if isinstance(v, dict) for k in v
                      if k.startswith("batch_")})
    if heading("decode", f"KV-cached decode, {r.get('preset', '')} preset, {r.get('new_tokens', '-')} new tokens"):
        lines += table(["attention", "KV bytes / token / layer", *[f"tokens/s, batch {b}" for b in batches]],
                       [[name, number(r[name].get("kv_bytes_per_token_per_layer")),
                         *[number(r[name].get(f"batch_{b}_tokens_per_sec")) for b in batches]]
                        for name in ("MHA", "GQA", "MLA") if name in r])
    lines.append("")

    r = results("moe")
    if heading("moe", f"MoE vs dense at equal active parameters, batch {r.get('batch', '-')} x "
                      f"{r.get('seq_len', '-')}"):
        lines += table(["model", "active / total params", "tokens/s"],
                       [[name, f"{r[name]['active_params_m']:.1f}M / {r[name]['params_m']:.1f}M",
                         number(r[name].get("tokens_per_sec"))] for name in ("dense", "moe") if name in r])
        if r.get("moe_vs_dense_step_time"):
            lines += ["", f"MoE step time {r['moe_vs_dense_step_time']:.2f}x dense."]
    lines.append("")

    if heading("recipe", "`--recipe minimind_gpu` on synthetic MiniMind-shaped files, projected"):
        lines += recipe_lines(results("recipe"))
    return "\n".join(lines).rstrip() + "\n"


def merge(reports: list[dict]) -> dict:
    """One report from a run and its reruns (`--sections`): a later file's section replaces an earlier one's unless
    the later one did not finish and the earlier did."""
    merged = dict(reports[0], sections=dict(reports[0].get("sections", {})))
    for report in reports[1:]:
        for name, entry in report.get("sections", {}).items():
            if entry.get("status") == "ok" or merged["sections"].get(name, {}).get("status") != "ok":
                merged["sections"][name] = entry
    return merged


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", default=[os.path.join(ROOT, "docs", "bench_gpu.json")],
                        help="the JSON written by scripts.bench.gpu; several: a run and its reruns, merged")
    args = parser.parse_args(argv)
    reports = []
    for path in args.paths:
        with open(path, encoding="utf-8") as f:
            reports.append(json.load(f))
    print(to_markdown(merge(reports)), end="")


if __name__ == "__main__":
    main()
