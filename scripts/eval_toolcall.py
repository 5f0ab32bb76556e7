"""Tool-calling evaluation: run a checkpoint's greedy multi-turn episodes against the local tools (model/tools.py)
on held-out prompts, and report how often it succeeds.

    python -m scripts.eval_toolcall --weight agent_sft                     # out/agent_sft_<hidden>.pth
    python -m scripts.eval_toolcall --weight agent_sft agent --output out/agent_eval.json   # before and after RL

Each prompt (dataset/demo_agent_val.jsonl by default: tasks held out of every training file) runs as in
train_agent.py (model/agent.py): the model writes a turn; <tool_call> blocks are parsed and run, their results fed
back as `tool` messages through the chat template; until a reply without a call or --max_turns. Greedy decoding,
so a number changes only when the model does. Reported per checkpoint, overall and per task:

    success       the final reply's answer ("The answer is X.") matches the reference
    well_formed   the episode called a tool and every <tool_call> block was valid JSON fitting the tool's schema
    args_correct  the first call is the reference call (right tool, equivalent arguments)
    called_tool   the episode called any tool at all
    turns         assistant turns per episode

With several checkpoints, each after the first is compared with it task by task: the tasks it newly solves, those
it newly fails, and the exact McNemar p of that split (the chance of one at least as uneven, were either checkpoint
as likely to win each such task): whether a gain is more than the luck of which tasks were held out.

--output writes {"<checkpoint>": {"overall": {...}, "per_task": {...}, "episodes": [...]}} as JSON, each episode
with its "success", and "against_first" for the checkpoints after the first.
"""
import argparse
import json
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from model.agent import evaluate_episodes, episode_metrics, finish_metrics  # noqa: E402
from model.data.jsonl import BadInput  # noqa: E402
from model.data.prompts import PromptDataset  # noqa: E402
from model.inference import load_model_for_inference  # noqa: E402


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and every flag's default."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--weight", nargs="+", default=["agent_sft"],
                        help="checkpoints to evaluate: stage names resolved in --save_dir, or .pth paths")
    parser.add_argument("--save_dir", default="out", help="directory the stage names are resolved in")
    parser.add_argument("--hidden_size", type=int, default=None, help="pick <stage>_<hidden>.pth when several exist")
    parser.add_argument("--data_path", default="dataset/demo_agent_val.jsonl",
                        help='prompts with "conversations" (system with "functions", user), "answer", "call"')
    parser.add_argument("--samples", type=int, default=0, help="evaluate only the first N prompts (0: all)")
    parser.add_argument("--max_turns", type=int, default=3, help="assistant turns per episode (as train_agent.py)")
    parser.add_argument("--max_gen_len", type=int, default=80, help="token limit of each assistant turn")
    parser.add_argument("--max_prompt_len", type=int, default=640, help="prompts longer than this are skipped")
    parser.add_argument("--batch_size", type=int, default=40, help="episodes per batched generate call")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: the best available)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the device's best)")
    parser.add_argument("--show", type=int, default=3, help="print this many episodes per checkpoint")
    parser.add_argument("--output", default=None, help="write the metrics and every episode to this JSON file")
    return parser.parse_args(argv)


def evaluate_checkpoint(loaded, items: list[dict], args) -> dict:
    sums, episodes = evaluate_episodes(loaded.model, loaded.tokenizer, items, args.max_turns, args.max_gen_len,
                                       args.batch_size, loaded.device)
    per_task = {}
    for task in sorted({e.columns.get("task", "all") for e in episodes}):
        chosen = [e for e in episodes if e.columns.get("task", "all") == task]
        per_task[task] = finish_metrics(episode_metrics(chosen))
    return {"overall": finish_metrics(sums), "per_task": per_task,
            "episodes": [{"question": e.prompt[-1]["content"], "turns": e.turns, "tool_results": e.tool_results,
                          "answer": e.columns.get("answer"), "call": e.columns.get("call"),
                          "success": bool(episode_metrics([e])["success"])} for e in episodes]}


def mcnemar_exact_p(gained: int, lost: int) -> float:
    """Two-sided exact McNemar test: were the tasks only one of two checkpoints solves split between them by a fair
    coin, how likely is a split at least this uneven? (Binomial(gained + lost, 1/2); the same held-out tasks for
    both, so the tasks both solve or both fail say nothing about which is better.)"""
    n = gained + lost
    tail = sum(math.comb(n, k) for k in range(min(gained, lost) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_comparison(before: dict, after: dict) -> dict:
    """Task by task, what `after` solves that `before` did not, and the reverse, with the exact McNemar p."""
    pairs = [(b["success"], a["success"]) for b, a in zip(before["episodes"], after["episodes"], strict=True)]
    gained = sum(1 for b, a in pairs if a and not b)
    lost = sum(1 for b, a in pairs if b and not a)
    return {"newly_solved": gained, "newly_failed": lost, "mcnemar_p": mcnemar_exact_p(gained, lost)}


def main(argv=None):
    args = parse_args(argv)
    results = {}
    for weight in args.weight:
        loaded = load_model_for_inference(weight=weight, save_dir=args.save_dir, hidden_size=args.hidden_size,
                                          device=args.device, dtype=args.dtype)
        try:
            dataset = PromptDataset(args.data_path, loaded.tokenizer, args.max_prompt_len)
        except (BadInput, FileNotFoundError) as error:
            raise SystemExit(f"error: {error}") from error
        items = dataset.items[:args.samples] if args.samples > 0 else dataset.items
        result = evaluate_checkpoint(loaded, items, args)
        results[loaded.name] = result
        overall = result["overall"]
        print(f"{loaded.name}: {overall['episodes']} held-out episodes | success {overall['success']:.3f} | "
              f"well_formed {overall['well_formed']:.3f} | args_correct {overall['args_correct']:.3f} | "
              f"called_tool {overall['called_tool']:.3f} | turns {overall['turns']:.2f}")
        for task, metrics in result["per_task"].items():
            print(f"  {task:<15} n={metrics['episodes']:<4} success {metrics['success']:.3f} | well_formed "
                  f"{metrics['well_formed']:.3f} | args_correct {metrics['args_correct']:.3f}")
        for episode in result["episodes"][:args.show]:
            print(f"  episode | {episode['question']!r} -> {episode['turns']!r} (tools {episode['tool_results']!r}; "
                  f"reference {episode['answer']!r})")
    names = list(results)
    for name in names[1:]:  # several checkpoints: each against the first, on the same tasks
        compared = paired_comparison(results[names[0]], results[name])
        results[name]["against_first"] = compared
        print(f"{name} against {names[0]}: {compared['newly_solved']} tasks newly solved, {compared['newly_failed']} "
              f"newly failed (exact McNemar, two-sided p = {compared['mcnemar_p']:.3g})")
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(results, f, ensure_ascii=False, indent=1)
        print(f"wrote {args.output}")
    return results


if __name__ == "__main__":
    main()
