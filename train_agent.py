"""Stage 7, agent RL: GRPO over multi-turn tool-calling episodes (MiniMind-3's train_agent.py, with local tools).

    python train_agent.py --from_weight agent_sft                  # demo tools, from out/agent_sft_<hidden>.pth
    python train_agent.py --from_weight agent_sft --num_generations 8 --max_turns 3 --reward_weights 0.5,0.5,1

The model answers each prompt G times; an answer may call tools. One step:

1. Rollout (model/agent.py). B prompts x G episodes. Each turn, every episode still running is continued in ONE
   batched, KV-cached `generate` call (rollouts.generate_rollout). A turn holding <tool_call>{"name": ...,
   "arguments": {...}}</tool_call> blocks is parsed, each call is run against the deterministic local tools
   (model/tools.py: calculator, convert_units, lookup_capital), and the results are appended as `tool` messages
   exactly as the chat template renders them, with the header of the next assistant turn; a turn without a call
   is the final answer. An episode ends there, at a turn cut off by --max_gen_len, or after --max_turns turns.
   Episodes are kept as token ids, so what is trained on is exactly what was sampled, and the LOSS MASK is 1 only
   on the tokens the policy generated: prompts, tool results and the template's glue are attended to, never
   trained on.
2. Reward (model/agent.py). Three components, each logged on its own (rewards/<name>/mean):
   tool_format  1 if the episode called a tool and every <tool_call> block was well-formed and fit its schema
   tool_args    1 if the first call is the reference call (right tool, equivalent arguments), 0.5 right tool only
   final_answer 1 if the final reply ("The answer is X.") matches the data's answer
   r = sum_j w_j r_j (--reward_weights, default 0.5, 0.5, 1). Group-relative advantages: group_advantages from
   model/training/losses.py, exactly as train_grpo.py: A_i = (r_i - group mean) / (group std + 1e-4).
3. Update. grpo_loss (model/training/losses.py), the clipped surrogate, per --loss_type, over the masked tokens;
   log-probs from one forward over prompt + whole episode (model/agent.rollout_logprobs).

What is shared with train_grpo.py, and what is not: the loss and its flags, the advantages, reward weighting and
statistics, the prompt reader (PromptDataset), the sampler, DAPO's dynamic sampling, the optimizer steps
(rollouts.GroupRelativeSteps, which GRPOSteps also extends) and the Trainer loop (resume, SIGTERM, DDP, logging) are
the same code from model/training/; what differs is the rollout (multi-turn episodes instead of one completion) and
the log-prob pass (tool tokens attended, not trained).

Data: {"conversations": [system with "functions" (the tool schemas), user], "answer": "...", "call": {"name",
"arguments"}} per line (scripts/build_agent_data.py writes dataset/demo_agent.jsonl); a line missing a field a
chosen reward needs is an error naming file:line. Starts from out/agent_sft_<hidden>.pth (tool-calling SFT:
train_full_sft.py --data_path dataset/demo_agent_sft.jsonl --save_weight agent_sft) and writes
out/agent_<hidden>.pth. Held-out task success, call well-formedness and argument accuracy (greedy episodes on the
*_val.jsonl prompts, held-out tasks) are printed before and after as "X -> Y"; scripts/eval_toolcall.py computes
the same numbers for any checkpoint.
"""
import argparse

import torch
import torch.distributed as dist

from model.agent import (build_agent_rewards, episodes_to_rollout, evaluate_episodes,
                         finish_metrics, model_policy, rollout_logprobs, run_episodes, score_episodes)
from model.data.formats import open_source
from model.data.jsonl import BadInput, default_val_path, note_bad_line
from model.data.prompts import PromptDataset
from model.device import default_device
from model.training.cli import (HelpFormatter, add_common_args, add_data_args, add_grpo_loss_args, build_model,
                                check_group_sampling, exit_on_user_error, start_stage)
from model.training.frozen import frozen_copy
from model.training.losses import grpo_loss, with_aux_loss
from model.training.rollouts import GroupRelativeSteps, gather_rows, report_run_end, rollout_statistics
from model.training.runtime import barrier, cleanup, print0
from model.training.trainer import Trainer

REWARD_FIELDS = {"final_answer": "answer", "tool_args": "call"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    on_gpu = default_device() == "cuda"
    add_common_args(parser, "agent", from_weight="agent_sft", batch_size=8 if on_gpu else 4,
                    learning_rate=1e-6 if on_gpu else 5e-5, max_seq_len=640, weight_decay=0.0, max_steps=-1,
                    log_interval=1, eval_interval=20, save_interval=20)
    add_data_args(parser, "dataset/demo_agent.jsonl",
                  'jsonl with "conversations" (system with "functions", user question), "answer" and "call"', None,
                  title="data (--batch_size counts PROMPTS per micro-batch; each gives --num_generations episodes; "
                        "--max_seq_len is the longest prompt kept)")
    g = parser.add_argument_group("episodes")
    g.add_argument("--num_generations", type=int, default=8, help="episodes per prompt (the group size G)")
    g.add_argument("--max_turns", type=int, default=3,
                   help="assistant turns per episode; a call in the last one is not run (the episode has no answer)")
    g.add_argument("--max_gen_len", type=int, default=80,
                   help="token limit of each assistant turn (the demo's longest call is 65 tokens)")
    g.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature; the loss's log-probs use the same one (logits / temperature)")
    g.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling threshold (1.0: off)")
    g.add_argument("--top_k", type=int, default=0, help="sample among the k most likely tokens only (0: off)")
    g = parser.add_argument_group("rewards")
    g.add_argument("--reward_funcs", default="tool_format,tool_args,final_answer",
                   help="comma-separated reward functions: tool_format, tool_args, final_answer (model/agent.py), "
                        "or module:function / path/to/file.py:function with TRL's signature (completions are the "
                        "episode's messages after the prompt)")
    g.add_argument("--reward_weights", default=None,
                   help="comma-separated weights, one per reward function (default: tool_format 0.5, tool_args 0.5, "
                        "final_answer 1.0, others 1.0)")
    add_grpo_loss_args(parser)
    g = parser.add_argument_group("held-out evaluation")
    g.add_argument("--eval_samples", type=int, default=120,
                   help="held-out prompts run greedily per evaluation (0: no held-out evaluation)")
    g.add_argument("--eval_batch_size", type=int, default=40, help="episodes per generate call when evaluating")
    g.add_argument("--show_episodes", type=int, default=2, help="print this many held-out episodes at the end")
    args = parser.parse_args(argv)
    check_group_sampling(parser, args)
    if args.max_turns < 1:
        parser.error("--max_turns must be at least 1")
    return args


# ========================================================================================================= data


def check_call_field(value) -> str | None:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or \
            not isinstance(value.get("arguments"), dict):
        return '"call" must be {"name": "<tool>", "arguments": {...}}'
    return None


def load_prompts(path: str, tokenizer, args, reward_names: list[str], what: str) -> PromptDataset:
    """The prompts (PromptDataset: bad lines named by file:line), after checking that every line holds the fields
    the chosen rewards need ("answer" for final_answer, "call" for tool_args), also by file:line. With
    --skip_bad_lines 1 such lines are counted and left out."""
    needed = [REWARD_FIELDS[n] for n in reward_names if n in REWARD_FIELDS]
    stats, bad = {}, set()
    source = open_source(path, "grpo", bool(args.skip_bad_lines))
    for number, record in source.records(skip_bad_lines=True):  # lines bad for PromptDataset: it names them
        for name in needed:
            if name not in record:
                reason = f'missing the "{name}" field a chosen reward needs'
            else:
                reason = check_call_field(record[name]) if name == "call" else None
            if reason is not None:
                note_bad_line(path, number, reason, bool(args.skip_bad_lines), stats, source.unit)
                bad.add(number)
                break
    dataset = PromptDataset(path, tokenizer, args.max_seq_len, bool(args.skip_bad_lines))
    if bad:
        keep = [item for item in dataset.items if all(n in item["columns"] for n in needed) and
                ("call" not in needed or check_call_field(item["columns"]["call"]) is None)]
        dataset.stats["bad_lines"] += len(dataset.items) - len(keep)
        dataset.items = keep
        if not keep:
            raise BadInput(f"{path}: no usable prompts; the first bad line: {stats['first_bad_line']}")
    print0(f"{what}: {path}: {len(dataset):,} prompts; longer than --max_seq_len {args.max_seq_len}: "
           f"{dataset.stats['dropped_too_long']} dropped; {dataset.stats['bad_lines']} bad lines skipped")
    return dataset


# ========================================================================================================= loss


def policy_loss(model, rollout, args, num_items_in_batch=None) -> tuple[torch.Tensor, dict]:
    """The GRPO loss of one micro-batch of episodes, over the policy's own tokens only (+ the MoE balancing loss)."""
    logps, aux_loss = rollout_logprobs(model, rollout, args.temperature)
    loss, metrics = grpo_loss(logps, rollout.old_logps, rollout.ref_logps, rollout.advantages.to(logps.device),
                              rollout.completion_mask, beta=args.beta, epsilon_low=args.epsilon,
                              epsilon_high=args.epsilon_high, loss_type=args.loss_type,
                              max_completion_length=args.max_gen_len * args.max_turns,
                              num_items_in_batch=num_items_in_batch, delta=args.delta)
    return with_aux_loss(loss, aux_loss, metrics)


# ========================================================================================================= the loop


class AgentSteps(GroupRelativeSteps):
    """Agent RL's optimizer steps for the shared Trainer loop (GroupRelativeSteps, as train_grpo.GRPOSteps): a
    rollout is G multi-turn episodes per prompt, and the log-probs cover only the tokens the policy wrote."""

    def describe(self) -> str:
        args = self.args
        return (f"{len(self.train_set):,} prompts, {self.total_steps:,} optimizer steps: {self.prompts_per_step} "
                f"prompts x {args.num_generations} episodes x {self.runtime.world_size} ranks per rollout, up to "
                f"{args.max_turns} turns of {args.max_gen_len} tokens; rewards {self.describe_rewards()}; "
                f"loss {args.loss_type}, beta {args.beta}")

    def log_line(self, record: dict, total_steps: int) -> str:
        parts = [f"step {record['step']}/{total_steps}", f"reward {record['reward']:.3f}"]
        parts += [f"{name} {record[f'rewards/{name}/mean']:.3f}" for name in self.reward_names]
        parts += [f"turns {record['turns']:.2f}", f"len {record['completion_length']:.0f}"]
        if "dropped_groups" in record:
            parts.append(f"dropped {record['dropped_groups']:.4g}")
        parts += [f"loss {record['loss']:.4f}", f"lr {record['lr']:.2e}", f"gnorm {record['grad_norm']:.2f}",
                  f"rollout {record['rollout_time']:.1f}s update {record['update_time']:.1f}s"]
        return " | ".join(parts)

    def sample(self, policy, items: list[dict]):
        """Run and score G episodes per prompt; the reward table also counts each episode's turns."""
        args, runtime, G = self.args, self.runtime, self.args.num_generations
        act = model_policy(policy, self.tokenizer, self.generation_config, runtime.device)
        parts, local = [], []
        with runtime.autocast():
            for chunk in self.prompt_chunks(items):
                episodes = run_episodes(act, self.tokenizer, chunk, G, args.max_turns)
                part = episodes_to_rollout(episodes, self.tokenizer.pad_token_id, runtime.device)
                generated = part.completion_mask.sum(dim=1).float().cpu()
                turns = torch.tensor([float(len(e.turns)) for e in episodes])
                truncated = torch.tensor([float(e.truncated) for e in episodes])
                correct = torch.full((len(episodes),), float("nan"))
                local.append(torch.cat([score_episodes(episodes, self.reward_funcs), correct[:, None],
                                        generated[:, None], truncated[:, None], turns[:, None]], dim=1))
                parts.append(part)
        table = gather_rows(torch.cat(local), runtime)
        rewards, stats = rollout_statistics(table[:, :-1], self.reward_names, self.reward_weights, G)
        stats["turns"] = table[:, -1].mean().item()
        return parts, rewards, stats

    def logprobs(self, model, part) -> torch.Tensor:
        return rollout_logprobs(model, part, self.args.temperature)[0]

    def loss(self, model, part, num_items_in_batch) -> tuple[torch.Tensor, dict]:
        return policy_loss(model, part, self.args, num_items_in_batch)


# ============================================================================================================ main


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    runtime, tokenizer = start_stage(args)
    try:
        weights = [float(w) for w in args.reward_weights.split(",")] if args.reward_weights else None
        reward_funcs, reward_names, reward_weights = build_agent_rewards(args.reward_funcs.split(","), weights)
    except ValueError as error:
        raise SystemExit(f"error: {error}")
    train_set = load_prompts(args.data_path, tokenizer, args, reward_names, "train")
    val_path = args.val_data_path or default_val_path(args.data_path)
    val_set = load_prompts(val_path, tokenizer, args, ["final_answer", "tool_args"], "held-out") \
        if val_path and args.eval_samples > 0 else None

    model, _ = build_model(args, vocab_size=len(tokenizer), dropout=False)
    ref_model = frozen_copy(model).to(runtime.device) if args.beta != 0.0 else None
    last_episodes = []

    def evaluate(model):
        count = min(len(val_set), args.eval_samples)
        indices = list(range(runtime.rank, count, runtime.world_size))
        sums, episodes = evaluate_episodes(model, tokenizer, [val_set[i] for i in indices], args.max_turns,
                                           args.max_gen_len, args.eval_batch_size, runtime.device)
        if runtime.distributed:
            names = sorted(sums)
            totals = torch.tensor([sums[k] for k in names], dtype=torch.float64, device=runtime.device)
            dist.all_reduce(totals)
            sums = dict(zip(names, totals.tolist()))
        last_episodes[:] = episodes
        return finish_metrics(sums)

    trainer = Trainer(args, model, runtime, args.save_weight)
    steps = AgentSteps(args, trainer, runtime, tokenizer, train_set, reward_funcs, reward_names, reward_weights,
                       ref_model)
    before = trainer.evaluate(evaluate, 0) if val_set is not None and not trainer.resumed else None
    after = trainer.run(steps, evaluate if val_set is not None else None)
    report_run_end(args, runtime, before, after, ("success", "well_formed", "args_correct", "called_tool", "turns"),
                   ((e.prompt[-1]["content"], e.completion_messages()) for e in last_episodes),
                   [f"episode | {e.prompt[-1]['content']!r} -> {e.turns!r} (reference {e.columns.get('answer')!r})"
                    for e in last_episodes[:args.show_episodes]])
    barrier(runtime)
    cleanup(runtime)
    return {"before": before, "after": after, "weights": trainer.weights_file}


if __name__ == "__main__":
    main()
