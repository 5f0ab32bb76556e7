"""Stage 7, PPO-RLHF: a policy, a value model, a frozen reference and a reward model (InstructGPT; TRL's PPOTrainer).

    python train_ppo.py                          # demo DPO prompts; out/full_sft_<h>.pth + out/reward_<h>.pth
    python train_ppo.py --reward_model out/reward_256.pth --kl_coef 0.05 --num_ppo_epochs 4
    python train_ppo.py --data_path my_prompts.jsonl --reward_model path/to/transformers_rm_dir --value_init policy
    torchrun --nproc_per_node 8 train_ppo.py --max_gen_len 512

The reward model scores a whole reply once; PPO turns that into a per-token learning signal with a learned
baseline (the value model), and keeps the policy near where it started with a per-token KL penalty. One rollout:

1. Generate. N prompts (--batch_size x --accumulation_steps x --num_mini_batches per rank), one completion each, in
   ONE left-padded, KV-cached `generate` call (model/training/rollouts.py, shared with GRPO), at --temperature
   (0.7, TRL's default). A completion ends at its first <|im_end|>.
2. Score. The reward model scores each (prompt, reply); a reply that never reached <|im_end|> loses
   --missing_eos_penalty. Then, with no gradients: log pi_old (the policy that sampled), log pi_ref (the frozen
   start) and the values V_old of every completion token, all from logits / temperature.
3. Rewards and advantages (model/training/ppo.py):
       r_t = -kl_coef * KL_t  (+ score on the last real token)    KL_t = log pi_old - log pi_ref (k1) or k3
       A = GAE(gamma, lambda) over r and V_old;  R = A + V_old (the value target);  A whitened over the batch.
   --kl_penalty loss moves the KL out of the reward into the loss (k3, weighted by --kl_coef, as GRPO's beta).
4. Update. --num_ppo_epochs passes over the rollout, each in a fresh random order, cut in --num_mini_batches
   mini-batches; one optimizer step per mini-batch (so a rollout makes num_ppo_epochs x num_mini_batches steps):
       loss = max(-A rho, -A clip(rho, 1 +- cliprange)) + vf_coef * 0.5 max((V - R)^2, (clip(V, V_old +- c) - R)^2)
   averaged over the mini-batch's completion tokens, rho = pi_theta / pi_old per token.

The value model. A separate network: a copy of the reward model's trunk with the reward model's scalar head
(--value_init reward, the default, as TRL and InstructGPT do), trained together with the policy by one optimizer.
Why not a value head on the policy's own trunk (half the compute)? Then the value loss's gradients move the policy's
features too, and the two losses need balancing (vf_coef then weighs a trade-off inside one network, not two
separate regressions); TRL and InstructGPT keep them apart, and starting the critic from the reward model means
its first values already predict the score instead of 0. The cost on the demo is one more forward/backward of a
4.6M trunk per update, a minority of the step next to generation. --value_init policy copies the policy's trunk with
a zero head instead (for a reward model that is not one of our checkpoints, or trained with another tokenizer).

Held-out metric (before and after, and every --eval_interval steps): replies to the *_val prompts, greedy or
(--eval_temperature) sampled from a fixed seed; their mean reward-model score, the exact KL(pi || pi_ref) summed
over each reply's positions (full distributions, temperature 1), their length and the share ending with
<|im_end|>. Prompts: DPO pairs (the prompt turns of "chosen", the demo's default) or any GRPO prompt file
({"conversations": [...]}, TRL's {"prompt": ...}, ...).
Writes <save_dir>/ppo_<hidden>.pth (the policy only); the resume checkpoint holds policy, value model and optimizer.
"""
import argparse
import copy
import os
import time

import torch
import torch.distributed as dist
from jinja2.exceptions import TemplateError
from torch.utils.data import Dataset
from transformers import GenerationConfig

from model.checkpoint import (check_same_tokenizer, load_state_into, load_weights, resolve_weight, save_weights,
                              unwrap, weight_path)
from model.data.chat import encode_prompt
from model.data.formats import open_source
from model.data.jsonl import BadInput, default_val_path, no_usable, note_bad_line
from model.data.prompts import PromptDataset
from model.data.schema import prompt_of
from model.device import default_device
from model.model import TinyMindForCausalLM
from model.training import rewards as reward_lib
from model.training.cli import (FRACTION, NON_NEGATIVE, POSITIVE_INT, HelpFormatter, add_common_args, add_data_args,
                                build_model, exit_on_user_error, start_stage)
from model.training.frozen import frozen_copy
from model.training.losses import k3_kl, token_logprobs, with_aux_loss
from model.training.ppo import gae, kl_penalty_rewards, masked_mean, masked_whiten, ppo_policy_loss, \
    ppo_value_loss
from model.training.rollouts import (completion_logprobs, gather_rows, generate_rollout, prompt_batches,
                                     report_run_end, rollout_step_count, score_rollout, token_weighted_metrics)
from model.training.runtime import barrier, cleanup, print0
from model.training.trainer import StepResult, Trainer


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    on_gpu = default_device() == "cuda"
    add_common_args(parser, "ppo", from_weight="full_sft", batch_size=16 if on_gpu else 8, accumulation_steps=1,
                    learning_rate=3e-6 if on_gpu else 2e-5, max_seq_len=256, weight_decay=0.0,
                    # CPU: 8 rollouts of 16 prompts. One rollout of the 4.6M model took 55-65 s on 2 loaded cores
                    # (load average 6-7), so about 4 minutes on quiet ones (docs/ppo.md); not yet timed there.
                    max_steps=-1 if on_gpu else 64,
                    log_interval=4, eval_interval=0, save_interval=100)
    add_data_args(parser, "dataset/demo_dpo.jsonl",
                  'prompts: DPO pairs ({"chosen": [...], "rejected": [...]}: the prompt turns they share) or a prompt '
                  'file ({"conversations": [...]} ending with a user turn, TRL\'s {"prompt": ...}, ...)', None,
                  title="data (--batch_size counts prompts per micro-batch, one completion each; --max_seq_len is the "
                        "longest prompt kept)")
    g = parser.add_argument_group("rollout")
    g.add_argument("--num_mini_batches", type=POSITIVE_INT, default=2,
                   help="mini-batches per rollout: a rollout holds batch_size x accumulation_steps x num_mini_batches "
                        "prompts per rank, and each mini-batch is one optimizer step")
    g.add_argument("--num_ppo_epochs", type=POSITIVE_INT, default=4,
                   help="passes over each rollout (TRL's num_ppo_epochs); optimizer steps per rollout = "
                        "num_ppo_epochs x num_mini_batches")
    g.add_argument("--max_gen_len", type=POSITIVE_INT, default=256 if on_gpu else 48,
                   help="completion length limit (tokens; TRL's response_length)")
    g.add_argument("--temperature", type=bounded_temperature, default=0.7,
                   help="sampling temperature; every log-prob (pi, pi_old, pi_ref) uses the same logits / temperature")
    g.add_argument("--top_p", type=FRACTION, default=1.0, help="nucleus sampling threshold (1.0: off, as TRL)")
    g.add_argument("--top_k", type=int, default=0, help="sample among the k most likely tokens only (0: off, as TRL)")
    g = parser.add_argument_group("reward")
    g.add_argument("--reward_model", default="reward",
                   help="the reward model: a stage name in --save_dir (reward -> <save_dir>/reward_<hidden>.pth, what "
                        "train_reward.py writes), one of our .pth checkpoints holding 'score.weight' [1, hidden], or a "
                        "transformers AutoModelForSequenceClassification directory")
    g.add_argument("--missing_eos_penalty", type=NON_NEGATIVE, default=None,
                   help="subtract this from the score of a reply that hits --max_gen_len without <|im_end|> (TRL's "
                        "missing_eos_penalty; default: none)")
    g = parser.add_argument_group("PPO (TRL's defaults)")
    g.add_argument("--kl_coef", type=NON_NEGATIVE, default=0.05, help="weight of the KL to the reference")
    g.add_argument("--kl_estimator", default="k1", choices=["k1", "k3"],
                   help="per-token KL estimate in the reward: k1 = log pi - log pi_ref, k3 = (r - 1) - log r")
    g.add_argument("--kl_penalty", default="reward", choices=["reward", "loss"],
                   help="reward: -kl_coef * KL_t in every token's reward (InstructGPT, TRL); loss: no penalty in the "
                        "reward, kl_coef * k3 KL added to the loss instead (as GRPO's beta)")
    g.add_argument("--cliprange", type=NON_NEGATIVE, default=0.2, help="policy ratio clip: 1 - eps .. 1 + eps")
    g.add_argument("--cliprange_value", type=NON_NEGATIVE, default=0.2, help="value clip: V_old - c .. V_old + c")
    g.add_argument("--vf_coef", type=NON_NEGATIVE, default=0.1, help="weight of the value loss")
    g.add_argument("--gamma", type=FRACTION, default=1.0, help="discount factor")
    g.add_argument("--lam", type=FRACTION, default=0.95, help="GAE lambda")
    g.add_argument("--value_init", default="reward", choices=["reward", "policy"],
                   help="value model = reward model's trunk and head (TRL, InstructGPT), or the policy's trunk with a "
                        "zero head")
    g = parser.add_argument_group("held-out evaluation")
    g.add_argument("--eval_samples", type=int, default=128,
                   help="held-out prompts answered greedily per evaluation (0: no held-out evaluation)")
    g.add_argument("--eval_batch_size", type=POSITIVE_INT, default=64, help="prompts per generate call when evaluating")
    g.add_argument("--eval_temperature", type=NON_NEGATIVE, default=0.0,
                   help="0: greedy held-out replies; > 0: sampled at this temperature with the same seed (--seed) at "
                        "every evaluation, from a forked RNG (training's sampling is not disturbed)")
    g.add_argument("--show_completions", type=int, default=2, help="print this many held-out replies at the end")
    return parser.parse_args(argv)


def bounded_temperature(text: str) -> float:
    value = float(text)
    if not value > 0.0:
        raise argparse.ArgumentTypeError(f"{text} must be > 0 (the log-probs divide the logits by it)")
    return value


# ========================================================================================================= prompts


class PairPromptDataset(Dataset):
    """Prompts from DPO pairs: the turns "chosen" and "rejected" share (their last assistant turns dropped), with
    the same items as PromptDataset ({"prompt", "prompt_ids", "columns"}); "columns" keeps the line's other fields
    (the demo's "type"). Lines are checked as DPO data is; a bad one is named by file:line."""

    def __init__(self, data_path: str, tokenizer, max_prompt_len: int, skip_bad_lines: bool = False):
        self.items, self.stats = [], {"bad_lines": 0, "dropped_too_long": 0}
        source = open_source(data_path, "dpo", skip_bad_lines)
        for line_number, obj in source.records(skip_bad_lines, self.stats):
            messages = prompt_of([dict(m) for m in obj["chosen"]])
            try:
                prompt_ids = encode_prompt(tokenizer, messages)
            except (TemplateError, TypeError, ValueError) as error:
                note_bad_line(data_path, line_number, f"the chat template cannot render it "
                                                      f"({type(error).__name__}: {error})", skip_bad_lines, self.stats,
                              source.unit)
                continue
            if len(prompt_ids) > max_prompt_len:
                self.stats["dropped_too_long"] += 1
                continue
            columns = {k: v for k, v in obj.items() if k not in ("chosen", "rejected", "prompt", "conversations")}
            self.items.append({"prompt": messages, "prompt_ids": prompt_ids, "columns": columns})
        if not self.items:
            raise no_usable(data_path, "prompts", self.stats,
                            f", {self.stats['dropped_too_long']} longer than {max_prompt_len} tokens", source.unit)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def load_prompts(path: str, tokenizer, args, what: str):
    """DPO pairs if the file reads as pairs, else prompts as GRPO reads them (each names its bad lines)."""
    try:
        open_source(path, "dpo", bool(args.skip_bad_lines))
        dataset = PairPromptDataset(path, tokenizer, args.max_seq_len, bool(args.skip_bad_lines))
    except BadInput as error:
        if "not preference (DPO) data" not in str(error):
            raise
        dataset = PromptDataset(path, tokenizer, args.max_seq_len, bool(args.skip_bad_lines))
    print0(f"{what}: {path}: {len(dataset):,} prompts; longer than --max_seq_len {args.max_seq_len}: "
           f"{dataset.stats['dropped_too_long']} dropped; {dataset.stats['bad_lines']} bad lines skipped")
    return dataset


# ========================================================================================================= models


def without_dropout(module: torch.nn.Module) -> torch.nn.Module:
    """Dropout off (as TRL's disable_dropout_in_model): pi_old, V_old and the updates must be the same function."""
    for sub in module.modules():
        if isinstance(sub, torch.nn.Dropout):
            sub.p = 0.0
        if hasattr(sub, "attention_dropout"):
            sub.attention_dropout = 0.0
    return module


class PolicyAndValue(torch.nn.Module):
    """The two trained networks as one module, so one optimizer, one DDP wrapper and one resume checkpoint hold
    both (TRL's PolicyAndValueWrapper): `policy` is the causal LM, `value_trunk` a separate TinyMind trunk and
    `value_head` its scalar head. forward() runs both on the same tokens."""

    def __init__(self, policy: TinyMindForCausalLM, value_trunk: torch.nn.Module, value_head: torch.nn.Linear):
        super().__init__()
        self.policy, self.value_trunk, self.value_head = policy, value_trunk, value_head
        self.config = policy.config  # what the Trainer names files after

    def values(self, input_ids, attention_mask, keep: int) -> torch.Tensor:
        """V at the last `keep` - 1 positions that predict a token: [N, keep - 1]. With keep = C + 1 over prompt +
        completion, column t is the value of the state before completion token t. The head runs in fp32."""
        hidden, _ = self.value_trunk(input_ids, attention_mask=attention_mask)
        hidden = hidden[:, -keep:-1]
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return self.value_head(hidden.float()).squeeze(-1)

    def forward(self, input_ids, attention_mask, logits_to_keep: int):
        out = self.policy(input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep)
        return out, self.values(input_ids, attention_mask, logits_to_keep)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token for the MFU the Trainer logs on GPUs: the policy's (PaLM's formula, see
        TinyMindForCausalLM.flops_per_token) plus the value model's, 6 x its trunk and head parameters without the
        embedding lookup (all experts, for an MoE trunk) plus the same attention term."""
        cfg = self.value_trunk.config
        qk_dim, v_dim = ((cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim) if cfg.use_mla
                         else (cfg.head_dim, cfg.head_dim))
        attention = 6 * cfg.num_hidden_layers * cfg.num_attention_heads * (qk_dim + v_dim) * seq_len
        matmuls = sum(p.numel() for p in self.parameters()) - sum(p.numel() for p in self.policy.parameters()) \
            - self.value_trunk.embed_tokens.weight.numel()
        return self.policy.flops_per_token(seq_len) + 6 * matmuls + attention


def value_model(args, policy: TinyMindForCausalLM, reward_path: str, tokenizer) -> tuple[torch.nn.Module,
                                                                                        torch.nn.Linear, str]:
    """(trunk, head, how it was initialised). reward: the reward checkpoint's trunk and score head (it must be one
    of our .pth files, trained with the policy's tokenizer); policy: a copy of the policy's trunk, head zero."""
    if args.value_init == "reward":
        if not reward_path.endswith(".pth"):
            raise SystemExit(f"error: --value_init reward needs one of our .pth reward checkpoints, not "
                             f"{reward_path}; pass --value_init policy")
        state, config = load_weights(reward_path)
        if config is None:
            raise SystemExit(f"error: the reward model {reward_path} has no config JSON beside it")
        check_same_tokenizer(config, args.tokenizer_path, f"the reward model {reward_path}")
        if config.vocab_size < len(tokenizer):
            raise SystemExit(f"error: the reward model {reward_path} has vocab_size {config.vocab_size}, the "
                             f"tokenizer {len(tokenizer)} tokens; pass --value_init policy")
        head_state = {key[len("score."):]: state.pop(key) for key in list(state) if key.startswith("score.")}
        if "weight" not in head_state:
            raise SystemExit(f"error: the reward model {reward_path} has no 'score.weight' value head")
        model = TinyMindForCausalLM(config)
        load_state_into(model, state, reward_path)
        head = torch.nn.Linear(config.hidden_size, 1, bias="bias" in head_state)
        head.load_state_dict(head_state)
        return without_dropout(model.model), head, f"the reward model's trunk and head ({reward_path})"
    head = torch.nn.Linear(policy.config.hidden_size, 1, bias=False)
    torch.nn.init.zeros_(head.weight)
    return without_dropout(copy.deepcopy(policy.model)), head, "the policy's trunk, zero head"


def reward_model_path(args, hidden_size: int) -> str:
    if os.path.isdir(args.reward_model):
        return args.reward_model
    return resolve_weight(args.reward_model, args.save_dir, hidden_size, "--reward_model")


# ========================================================================================================= the loop


class PPOSteps:
    """PPO's optimizer steps for the shared Trainer loop. When the last rollout is used up (num_ppo_epochs x
    num_mini_batches steps), a step first collects a new one (generate, score, pi_old / pi_ref / V_old, rewards,
    GAE, whitening) and draws the mini-batch order of all its epochs; every step then updates on one mini-batch.
    Checkpoints happen only between rollouts, so a resumed run starts with a fresh rollout exactly where the
    uninterrupted run would (the RNG that samples and shuffles is restored with the checkpoint)."""

    def __init__(self, args, trainer: Trainer, runtime, tokenizer, train_set, scorer, ref_model):
        self.args, self.trainer, self.runtime, self.tokenizer = args, trainer, runtime, tokenizer
        self.train_set, self.scorer, self.ref_model = train_set, scorer, ref_model
        self.mini_batch = args.batch_size * args.accumulation_steps
        self.prompts_per_rollout = self.mini_batch * args.num_mini_batches
        self.updates_per_rollout = args.num_ppo_epochs * args.num_mini_batches
        self.generation_config = GenerationConfig(
            max_new_tokens=args.max_gen_len, do_sample=True, temperature=args.temperature, top_p=args.top_p,
            top_k=args.top_k, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id)
        needs = (f"{args.batch_size} x {args.accumulation_steps} accumulation x {args.num_mini_batches} "
                 f"mini-batches x {runtime.world_size} ranks")
        self.total_steps = rollout_step_count(len(train_set), runtime, self.prompts_per_rollout,
                                              self.updates_per_rollout, args, needs)
        self.batches = None  # this rank's prompt batches, created at the first step (after a resume is loaded)
        self.rollout, self.buffers, self.stats, self.schedule = None, {}, {}, []
        self.window = {"rollout": 0.0, "update": 0.0, "tokens": 0.0, "generation": 0.0}

    @property
    def wrapper(self) -> PolicyAndValue:
        """The bare policy + value module (generation and no-grad passes bypass DDP)."""
        return unwrap(self.trainer.model)

    def describe(self) -> str:
        args = self.args
        kl = (f"{args.kl_estimator} KL x {args.kl_coef} in the reward" if args.kl_penalty == "reward" else
              f"k3 KL x {args.kl_coef} in the loss")
        return (f"{len(self.train_set):,} prompts, {self.total_steps:,} optimizer steps: {self.prompts_per_rollout} "
                f"prompts x {self.runtime.world_size} ranks per rollout, {args.num_ppo_epochs} PPO epochs x "
                f"{args.num_mini_batches} mini-batches of {self.mini_batch}; {kl}; gamma {args.gamma}, lam {args.lam}")

    def step(self) -> StepResult:
        if not self.schedule:
            if self.batches is None:
                self.batches = prompt_batches(self.train_set, self.trainer.state, self.args.seed,
                                              self.runtime, self.prompts_per_rollout)
            started = time.time()
            self.rollout, self.buffers, self.stats = self.collect(next(self.batches))
            self.window["rollout"] += time.time() - started
            self.window["tokens"] += self.stats.pop("generated_tokens")
            self.window["generation"] += self.stats.pop("generation_time")
            self.trainer.state.samples_into_epoch += self.prompts_per_rollout
            # Every epoch's mini-batches, drawn now: a fresh permutation of the rollout per PPO epoch (TRL).
            n = self.prompts_per_rollout
            for _ in range(self.args.num_ppo_epochs):
                order = torch.randperm(n).tolist()
                self.schedule += [order[s:s + self.mini_batch] for s in range(0, n, self.mini_batch)]
        started = time.time()
        result = self.update(self.schedule.pop(0))
        result.metrics.update(**self.stats)
        self.window["update"] += time.time() - started
        return result

    def can_checkpoint(self) -> bool:
        return not self.schedule

    def log_fields(self) -> dict:
        window, spent = self.window, self.window["rollout"] + self.window["update"]
        fields = {"rollout_time": window["rollout"], "update_time": window["update"],
                  "rollout_share": window["rollout"] / max(spent, 1e-9),
                  "generation_tokens_per_sec": window["tokens"] / max(window["generation"], 1e-9)}
        self.window = dict.fromkeys(window, 0.0)
        return fields

    @staticmethod
    def log_line(record: dict, total_steps: int) -> str:
        return " | ".join([
            f"step {record['step']}/{total_steps}", f"score {record['score']:.3f}", f"kl {record['kl']:.3f}",
            f"len {record['completion_length']:.0f}", f"eos {record['eos_rate']:.2f}",
            f"pg {record['pg_loss']:.4f}", f"vf {record['vf_loss']:.4f}", f"clip {record['pg_clipfrac']:.3f}",
            f"vclip {record['vf_clipfrac']:.3f}", f"ev {record['explained_variance']:.2f}",
            f"lr {record['lr']:.2e}", f"gnorm {record['grad_norm']:.2f}",
            f"rollout {record['rollout_time']:.1f}s update {record['update_time']:.1f}s"])

    # ---- 1 - 3: rollout, scores, rewards, advantages -----------------------------------------------------------
    @torch.no_grad()
    def collect(self, items: list[dict]):
        args, runtime = self.args, self.runtime
        wrapper = self.wrapper
        wrapper.eval()
        started = time.time()
        with runtime.autocast():
            rollout = generate_rollout(wrapper.policy, self.tokenizer, items, 1, self.generation_config,
                                       runtime.device)
        generation_time = time.time() - started
        mask = rollout.completion_mask.to(runtime.device)
        ended = (rollout.completion_ids == self.tokenizer.eos_token_id).any(dim=1)
        raw_scores = score_rollout(rollout, [self.scorer])[:, 0].to(runtime.device)
        scores = raw_scores.clone()
        if args.missing_eos_penalty is not None:
            scores[~ended] -= args.missing_eos_penalty

        n, width = rollout.completion_ids.shape
        old_logps, ref_logps, values = (torch.zeros(n, width, device=runtime.device) for _ in range(3))
        with runtime.autocast():
            for start in range(0, n, args.batch_size):
                rows = list(range(start, min(start + args.batch_size, n)))
                part = rollout.select(rows)
                old_logps[rows] = completion_logprobs(wrapper.policy, part, args.temperature)[0].float()
                ref_logps[rows] = completion_logprobs(self.ref_model, part, args.temperature)[0].float()
                input_ids = torch.cat([part.prompt_ids, part.completion_ids], dim=1)
                attention_mask = torch.cat([part.prompt_mask, part.completion_mask], dim=1)
                values[rows] = wrapper.values(input_ids, attention_mask, width + 1).float()
        kl_coef = args.kl_coef if args.kl_penalty == "reward" else 0.0
        rewards, kl = kl_penalty_rewards(old_logps, ref_logps, scores, mask, kl_coef, args.kl_estimator)
        advantages, returns = gae(rewards, values * mask, mask, args.gamma, args.lam)
        advantages = masked_whiten(advantages, mask)
        buffers = {"old_logps": old_logps, "ref_logps": ref_logps, "values": values * mask, "returns": returns,
                   "advantages": advantages, "mask": mask}

        # Metrics over every rank's rollout (TRL's objective/*): per-sequence sums of the KL and the KL reward.
        lengths = mask.sum(dim=1).float()
        per_row = torch.stack([raw_scores, scores, kl.sum(dim=1), (rewards.sum(dim=1) - scores), lengths,
                               ended.float().to(runtime.device), (-old_logps * mask).sum(dim=1)], dim=1)
        table = gather_rows(per_row.cpu(), runtime)
        returns_var = masked_var_safe(returns, mask)
        explained = 1.0 - masked_var_safe(returns - values * mask, mask) / max(returns_var, 1e-8)
        stats = {"score": table[:, 0].mean().item(), "score_std": table[:, 0].std().item() if len(table) > 1 else 0.0,
                 "score_with_penalty": table[:, 1].mean().item(), "kl": table[:, 2].mean().item(),
                 "non_score_reward": table[:, 3].mean().item(),
                 "rlhf_reward": (table[:, 1] + table[:, 3]).mean().item(),
                 "completion_length": table[:, 4].mean().item(), "eos_rate": table[:, 5].mean().item(),
                 "entropy": table[:, 6].mean().item(), "value_mean": masked_mean(values, mask).item(),
                 "explained_variance": explained, "generated_tokens": lengths.sum().item(),
                 "generation_time": generation_time}
        return rollout, buffers, stats

    # ---- 4: one mini-batch update ------------------------------------------------------------------------------
    def update(self, rows: list[int]) -> StepResult:
        args, runtime, trainer = self.args, self.runtime, self.trainer
        trainer.model.train()
        micro = [rows[k * args.batch_size:(k + 1) * args.batch_size] for k in range(args.accumulation_steps)]
        mask = self.buffers["mask"]
        tokens = mask[rows].sum()
        local_tokens = int(tokens.item())
        if runtime.distributed:
            dist.all_reduce(tokens)
        # Each micro-batch's summed token losses / normaliser: every token of the mini-batch weighs the same on
        # every rank (the engine divides by accumulation_steps, DDP averages over ranks).
        normaliser = tokens / (runtime.world_size * args.accumulation_steps)
        loss_sum, micro_metrics = torch.zeros((), device=runtime.device), []
        for k, part_rows in enumerate(micro):
            with trainer.engine.no_sync(k == len(micro) - 1), runtime.autocast():
                loss, metrics = self.micro_batch_loss(part_rows, normaliser)
            trainer.backward(loss)
            loss_sum += loss.detach().float()
            micro_metrics.append(metrics)
        return StepResult(loss_sum, len(micro), local_tokens, token_weighted_metrics(micro_metrics, runtime))

    def micro_batch_loss(self, rows: list[int], normaliser) -> tuple[torch.Tensor, dict]:
        args = self.args
        part = self.rollout.select(rows)
        width = int(self.buffers["mask"][rows].sum(dim=1).max().item())  # trailing columns with no real token
        completion_ids = part.completion_ids[:, :width]
        buf = {k: v[rows][:, :width] for k, v in self.buffers.items()}
        input_ids = torch.cat([part.prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([part.prompt_mask, part.completion_mask[:, :width]], dim=1)
        out, values = self.trainer.model(input_ids, attention_mask, width + 1)
        logps = token_logprobs(out.logits[:, :-1], completion_ids, temperature=args.temperature)
        mask = buf["mask"]
        pg_loss, pg_metrics = ppo_policy_loss(logps, buf["old_logps"], buf["advantages"], mask, args.cliprange,
                                              normaliser)
        vf_loss, vf_metrics = ppo_value_loss(values, buf["values"], buf["returns"], mask, args.cliprange_value,
                                             normaliser)
        loss = pg_loss + args.vf_coef * vf_loss
        metrics = {"pg_loss": pg_loss.detach() * normaliser / mask.sum().clamp(min=1),
                   "vf_loss": vf_loss.detach() * normaliser / mask.sum().clamp(min=1), **pg_metrics, **vf_metrics}
        if args.kl_penalty == "loss":
            kl_loss = masked_mean(k3_kl(logps, buf["ref_logps"]), mask, normaliser)
            loss = loss + args.kl_coef * kl_loss
            metrics["kl_loss"] = kl_loss.detach() * normaliser / mask.sum().clamp(min=1)
        metrics["num_tokens"] = mask.sum().detach()
        return with_aux_loss(loss, out.aux_loss, metrics)


def masked_var_safe(values: torch.Tensor, mask: torch.Tensor) -> float:
    """Population variance over the masked entries (0 for fewer than 2), for the explained-variance metric."""
    if mask.sum() < 2:
        return 0.0
    mean = masked_mean(values, mask)
    return masked_mean((values - mean) ** 2, mask).item()


# ========================================================================================================= evaluation


@torch.no_grad()
def sequence_kl(policy, ref_model, rollout) -> torch.Tensor:
    """[N] exact KL(pi || pi_ref) summed over each completion's positions: sum_t sum_v p_t(v) log(p_t(v) / q_t(v))
    with the full next-token distributions (temperature 1) along the reply."""
    width = rollout.completion_ids.shape[1]
    input_ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], dim=1)
    attention_mask = torch.cat([rollout.prompt_mask, rollout.completion_mask], dim=1)
    logp = torch.log_softmax(policy(input_ids, attention_mask=attention_mask,
                                    logits_to_keep=width + 1).logits[:, :-1].float(), dim=-1)
    logq = torch.log_softmax(ref_model(input_ids, attention_mask=attention_mask,
                                       logits_to_keep=width + 1).logits[:, :-1].float(), dim=-1)
    per_position = (logp.exp() * (logp - logq)).sum(dim=-1)
    return (per_position * rollout.completion_mask.to(per_position.dtype)).sum(dim=1)


@torch.no_grad()
def evaluate_policy(policy, ref_model, tokenizer, val_set, scorer, runtime, args) -> tuple[dict, list]:
    """Replies to the first --eval_samples held-out prompts (this rank's share; sums all-reduced): mean reward-model
    score, exact KL to the reference per reply, reply length, share ending with <|im_end|>. Greedy by default, so
    the numbers move only when the model does; with --eval_temperature > 0, sampled from the same seed every time
    (RNG forked: the training run's own sampling continues as if no evaluation happened). Returns (metrics,
    [(prompt, reply, score)])."""
    sampled = args.eval_temperature > 0
    config = GenerationConfig(max_new_tokens=args.max_gen_len, do_sample=sampled,
                              temperature=args.eval_temperature if sampled else None, top_k=0 if sampled else None,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                              bos_token_id=tokenizer.bos_token_id)
    devices = [runtime.device] if runtime.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(args.seed + runtime.rank)
        return _evaluate(policy, ref_model, tokenizer, val_set, scorer, runtime, args, config)


def _evaluate(policy, ref_model, tokenizer, val_set, scorer, runtime, args, config):
    count = min(len(val_set), args.eval_samples)
    indices = list(range(runtime.rank, count, runtime.world_size))
    sums = torch.zeros(5, dtype=torch.float64)  # score, kl, length, ended, replies
    samples = []
    for start in range(0, len(indices), args.eval_batch_size):
        items = [val_set[i] for i in indices[start:start + args.eval_batch_size]]
        rollout = generate_rollout(policy, tokenizer, items, 1, config, runtime.device)
        scores = score_rollout(rollout, [scorer])[:, 0]
        kl = torch.cat([sequence_kl(policy, ref_model, rollout.select(list(range(s, min(s + 16, len(rollout))))))
                        for s in range(0, len(rollout), 16)])
        ended = (rollout.completion_ids == tokenizer.eos_token_id).any(dim=1)
        sums += torch.tensor([scores.sum().item(), kl.sum().item(), rollout.completion_mask.sum().item(),
                              ended.sum().item(), len(rollout)], dtype=torch.float64)
        samples += list(zip([item["prompt"][-1]["content"] for item in items], rollout.texts, scores.tolist()))
    if runtime.distributed:
        sums = sums.to(runtime.device)
        dist.all_reduce(sums)
        sums = sums.cpu()
    n = max(sums[4].item(), 1.0)
    return {"score": sums[0].item() / n, "kl": sums[1].item() / n, "completion_length": sums[2].item() / n,
            "eos_rate": sums[3].item() / n}, samples


# ============================================================================================================ main


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    runtime, tokenizer = start_stage(args)
    train_set = load_prompts(args.data_path, tokenizer, args, "train")
    val_path = args.val_data_path or default_val_path(args.data_path)
    val_set = load_prompts(val_path, tokenizer, args, "held-out") if val_path and args.eval_samples > 0 else None

    policy, _ = build_model(args, vocab_size=len(tokenizer), dropout=False)
    # The reference is the starting policy, frozen: copied before the Trainer can load resumed weights.
    ref_model = frozen_copy(policy).to(runtime.device)
    reward_path = reward_model_path(args, policy.config.hidden_size)
    try:
        functions, _, _ = reward_lib.build_reward_functions(["reward_model"], None, reward_path, runtime.device)
    except ValueError as error:
        raise SystemExit(f"error: {error}")
    scorer = functions[0]
    trunk, head, value_source = value_model(args, policy, reward_path, tokenizer)
    print0(f"reward model: {reward_path}; value model: {value_source}")
    wrapper = PolicyAndValue(policy, trunk, head)

    last_samples = []

    def evaluate(model):
        metrics, samples = evaluate_policy(model.policy, ref_model, tokenizer, val_set, scorer, runtime, args)
        last_samples[:] = samples
        return metrics

    weights_file = weight_path(args.save_dir, args.save_weight, policy.config)

    def save_policy(model):
        save_weights(model.policy, weights_file, stage=args.tinymind_stage)

    trainer = Trainer(args, wrapper, runtime, args.save_weight, save_weights_fn=save_policy, weights_file=weights_file)
    steps = PPOSteps(args, trainer, runtime, tokenizer, train_set, scorer, ref_model)
    before = trainer.evaluate(evaluate, 0) if val_set is not None and not trainer.resumed else None
    after = trainer.run(steps, evaluate if val_set is not None else None)
    report_run_end(args, runtime, before, after, ("score", "kl", "completion_length", "eos_rate"),
                   ((prompt, text) for prompt, text, _ in last_samples),
                   [f"reply | {prompt!r} -> {text!r} (score {score:.3f})"
                    for prompt, text, score in last_samples[:args.show_completions]])
    barrier(runtime)
    cleanup(runtime)
    return {"before": before, "after": after, "weights": trainer.weights_file}


if __name__ == "__main__":
    main()
