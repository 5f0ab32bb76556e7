"""The run's report: documents in and out per pass, drops by stage and reason, malformed lines, CPU per stage;
saved as <output>.report.csv / .json and printed."""

import json
import resource
from collections import Counter

from .config import STAGES


class Report:
    def __init__(self):
        self.passes, self.drops, self.malformed, self.n_malformed, self.info = [], Counter(), [], 0, {}
        self.cpu, self.cpu_docs = Counter(), Counter()  # per stage: CPU seconds summed over workers, documents

    def add_pass(self, name, docs_in, docs_out, seconds, nbytes):
        self.passes.append(dict(stage=name, docs_in=docs_in, docs_out=docs_out, dropped=docs_in - docs_out,
                                seconds=round(seconds, 2), docs_per_s=round(docs_in / max(seconds, 1e-9), 1),
                                mb_per_s=round(nbytes / 1e6 / max(seconds, 1e-9), 2)))

    def tables(self, docs_read: int, docs_written: int):
        import pandas as pd
        rows = [dict(stage="input", reason="lines read", docs=docs_read)]
        order = {stage: i for i, stage in enumerate(("input",) + STAGES)}
        rows += [dict(stage=s, reason=r, docs=n)
                 for (s, r), n in sorted(self.drops.items(), key=lambda item: (order[item[0][0]], -item[1]))]
        rows.append(dict(stage="output", reason="written", docs=docs_written))
        drops = pd.DataFrame(rows)
        drops["share_of_input"] = (drops["docs"] / max(docs_read, 1)).round(4)
        return drops, pd.DataFrame(self.passes)


def finish_report(cfg, report, docs_read, docs_written, seconds) -> dict:
    drops, passes = report.tables(docs_read, docs_written)
    # per stage, CPU time summed over the workers: docs_per_cpu_s is what one core does, whatever the worker count
    cpu = [dict(stage=stage, docs=report.cpu_docs[stage], cpu_seconds=round(report.cpu[stage], 2),
                docs_per_cpu_s=round(report.cpu_docs[stage] / max(report.cpu[stage], 1e-9), 1))
           for stage in report.cpu]
    peak = dict(parent_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                largest_worker_mb=round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1))
    result = dict(input=cfg.input, output=cfg.output, stages=list(cfg.stages), num_workers=cfg.num_workers,
                  docs_read=docs_read, docs_written=docs_written, seconds=round(seconds, 2), peak_rss=peak,
                  drops=drops.to_dict(orient="records"), passes=passes.to_dict(orient="records"), cpu_per_stage=cpu,
                  malformed_lines=dict(count=report.n_malformed, first=report.malformed), **report.info)
    prefix = cfg.report or cfg.output
    drops.to_csv(prefix + ".report.csv", index=False)
    with open(prefix + ".report.json", "w", encoding="utf-8") as f:
        json.dump(result, f, ensure_ascii=False, indent=1)
    if not cfg.quiet:
        import pandas as pd
        with pd.option_context("display.width", 120, "display.max_columns", 20, "display.max_rows", 200):
            print(passes.to_string(index=False))
            print()
            if cpu:
                print(pd.DataFrame(cpu).to_string(index=False))
                print()
            print(drops.to_string(index=False))
        for bad in report.malformed[:10]:
            print(f"malformed: {bad['file']}:{bad['line']} {bad['reason']}: {bad['error']}")
        if report.n_malformed > 10:
            print(f"... {report.n_malformed} malformed lines in all (first {len(report.malformed)} in the json)")
        for name in ("dedup", "quality"):
            if name in report.info:
                print(f"{name}: {json.dumps(report.info[name], ensure_ascii=False)}")
        print(f"peak RSS: {peak}; report: {prefix}.report.csv / .json")
    return result
