"""Multi-turn tool-calling episodes for agent RL (train_agent.py) and evaluation (scripts/eval_toolcall.py).

One episode: the prompt (system message with the tool schemas, user question) is rendered by the chat template;
the policy writes an assistant turn; if that turn holds <tool_call> blocks, each is parsed and run against the
local tools (model/tools.py), the results are appended as `tool` messages exactly as the chat template renders
them, followed by the header of the next assistant turn, and the policy writes again: until a turn without a call
(the final answer), a turn cut off before <|im_end|>, or --max_turns turns.

The episode is kept as TOKENS, not re-rendered text: each turn is generated from the exact ids the episode holds,
and the ids it generated are appended unchanged. So the sequence trained on is exactly the sequence sampled, and
the loss mask is exact: 1 on the tokens the policy generated (its replies and their <|im_end|>), 0 on the prompt,
the tool results and the template's glue between turns. Tool outputs are never trained on.

Every turn of every active episode is generated in ONE batched, left-padded, KV-cached `generate` call (reusing
model/training/rollouts.generate_rollout), so B prompts x G samples cost max_turns generate calls per step."""
import re
from dataclasses import dataclass, field, replace

import torch

from .training import rewards as reward_lib
from .training.losses import token_logprobs
from .training.rollouts import Rollout, generate_rollout
from .tools import TOOLS, call_message, parse_tool_calls, run_tool, same_call

# ================================================================================================ episodes


@dataclass
class Episode:
    """One multi-turn trajectory. ids = prompt + every generated turn + the tool messages between them; mask is
    1 exactly on the tokens the policy generated."""
    prompt: list  # the prompt conversation (messages)
    columns: dict  # the data line's other fields ("answer", "call", ...)
    prompt_len: int
    ids: list
    mask: list
    turns: list = field(default_factory=list)  # raw text of each generated turn (special tokens kept)
    tool_results: list = field(default_factory=list)  # per turn: the tool message texts fed back
    done: bool = False
    truncated: bool = False  # a turn hit the token limit before <|im_end|>
    hit_turn_limit: bool = False  # the last allowed turn still called a tool

    @property
    def final_text(self) -> str | None:
        """The final answer: the last turn, if it is a reply without calls that ended properly."""
        if not self.turns or self.truncated or self.hit_turn_limit:
            return None
        return self.turns[-1]

    def completion_messages(self) -> list[dict]:
        """What the policy produced after the prompt, as messages: assistant turns (raw text, calls included) and
        the tool messages answering them. Reward functions get this as the completion (TRL's conversational form:
        completion[-1] is the final assistant reply). A turn cut off before <|im_end|> is marked "finished": False."""
        messages = []
        for i, text in enumerate(self.turns):
            messages.append({"role": "assistant", "content": text})
            if self.truncated and i == len(self.turns) - 1:
                messages[-1]["finished"] = False
            if i < len(self.tool_results):
                messages += [{"role": "tool", "content": r} for r in self.tool_results[i]]
        return messages

    def chat_messages(self) -> list[dict]:
        """The whole conversation in MiniMind's form (assistant turns with tool_calls), e.g. to print or save."""
        messages = list(self.prompt)
        for i, text in enumerate(self.turns):
            content, calls = parse_tool_calls(text)
            ok = [c for c in calls if c.ok]
            messages.append(call_message(content, ok) if ok else {"role": "assistant", "content": text})
            if i < len(self.tool_results):
                messages += [{"role": "tool", "content": r} for r in self.tool_results[i]]
        return messages


def tool_turn_suffix(results: list[str]) -> str:
    """The text the chat template puts after an assistant turn's <|im_end|> when tool messages follow, up to the
    next assistant header: '\\n', one '<|im_start|>tool\\n...<|im_end|>\\n' per result, '<|im_start|>assistant\\n'."""
    return "\n" + "".join(f"<|im_start|>tool\n{r}<|im_end|>\n" for r in results) + "<|im_start|>assistant\n"


def answer_tools(text: str, tools: dict | None = None) -> list[str] | None:
    """The tool messages answering a turn: one per <tool_call> block (an "error: ..." for a malformed one), or None
    when the turn calls nothing (it is a final answer)."""
    _, calls = parse_tool_calls(text)
    if not calls:
        return None
    return [run_tool(c.name, c.arguments, tools) if c.ok else f"error: malformed tool call ({c.error})"
            for c in calls]


def run_episodes(policy, tokenizer, items: list[dict], num_generations: int, max_turns: int,
                 tools: dict | None = None) -> list[Episode]:
    """Run num_generations episodes per prompt item ({"prompt", "prompt_ids", "columns"}, as PromptDataset gives),
    group-contiguous. `policy(list of id lists) -> list of generated id lists`, one per row, each ending with
    <|im_end|> unless cut off (see model_policy; the tests use a scripted one). One policy call per turn, over
    every episode still running."""
    eos = tokenizer.eos_token_id
    episodes = [Episode(item["prompt"], item["columns"], len(item["prompt_ids"]), list(item["prompt_ids"]),
                        [0] * len(item["prompt_ids"])) for item in items for _ in range(num_generations)]
    for turn in range(max_turns):
        active = [e for e in episodes if not e.done]
        if not active:
            break
        for episode, generated in zip(active, policy([e.ids for e in active])):
            generated = list(generated)
            episode.ids += generated
            episode.mask += [1] * len(generated)
            ended = bool(generated) and generated[-1] == eos
            text = tokenizer.decode(generated[:-1] if ended else generated, skip_special_tokens=False)
            episode.turns.append(text)
            if not ended:
                episode.done = episode.truncated = True
                continue
            results = answer_tools(text, tools)
            if results is None:
                episode.done = True
            elif turn == max_turns - 1:
                episode.done = episode.hit_turn_limit = True
            else:
                episode.tool_results.append(results)
                glue = tokenizer.encode(tool_turn_suffix(results), add_special_tokens=False)
                episode.ids += glue
                episode.mask += [0] * len(glue)
    return episodes


def model_policy(model, tokenizer, generation_config, device):
    """A policy for run_episodes: one batched, left-padded, KV-cached generate call over the given contexts
    (generate_rollout), each reply cut after its first <|im_end|>."""
    @torch.no_grad()
    def policy(contexts: list[list[int]]) -> list[list[int]]:
        items = [{"prompt": None, "prompt_ids": ids, "columns": {}} for ids in contexts]
        rollout = generate_rollout(model, tokenizer, items, 1, generation_config, device)
        return [ids[:n] for ids, n in zip(rollout.completion_ids.tolist(), rollout.completion_mask.sum(1).tolist())]
    return policy


# ================================================================================================ training tensors


@dataclass
class AgentRollout(Rollout):
    """A Rollout whose completion is the whole multi-turn tail after the prompt. completion_mask is the LOSS mask
    (the policy's own tokens); attention_mask covers every real token of the tail, tool results included (they
    must be attended to, just not trained on)."""
    attention_mask: torch.Tensor | None = None  # [N, C] 1 on every real completion token
    episodes: list = field(default_factory=list)

    def select(self, rows: list[int]) -> "AgentRollout":
        picked = super().select(rows)
        pick = torch.tensor(rows, dtype=torch.long, device=self.attention_mask.device)
        return replace(picked, attention_mask=self.attention_mask[pick], episodes=[self.episodes[i] for i in rows])


def episodes_to_rollout(episodes: list[Episode], pad_id: int, device) -> AgentRollout:
    """Tensors for the loss: prompts left-padded (as generation saw them), tails right-padded."""
    from .generation import left_pad
    prompt_ids, prompt_mask = left_pad([e.ids[:e.prompt_len] for e in episodes], pad_id)
    tails = [e.ids[e.prompt_len:] for e in episodes]
    width = max(1, max(len(t) for t in tails))
    completion_ids = torch.full((len(episodes), width), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((len(episodes), width), dtype=torch.long)
    attention = torch.zeros((len(episodes), width), dtype=torch.long)
    for i, (episode, tail) in enumerate(zip(episodes, tails)):
        completion_ids[i, :len(tail)] = torch.tensor(tail, dtype=torch.long)
        loss_mask[i, :len(tail)] = torch.tensor(episode.mask[episode.prompt_len:], dtype=torch.long)
        attention[i, :len(tail)] = 1
    keys = sorted({k for e in episodes for k in e.columns})
    columns = {k: [e.columns.get(k) for e in episodes] for k in keys}
    return AgentRollout(prompt_ids.to(device), prompt_mask.to(device), completion_ids.to(device),
                        loss_mask.to(device), [e.prompt for e in episodes], columns,
                        texts=[e.final_text or "" for e in episodes], attention_mask=attention.to(device),
                        episodes=episodes)


def rollout_logprobs(model, rollout: AgentRollout, temperature: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(token | everything before it) [N, C] over the tail, from logits / temperature, and the MoE aux loss.
    Like rollouts.completion_logprobs, but attending to the tool results the loss mask leaves out."""
    input_ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], dim=1)
    attention_mask = torch.cat([rollout.prompt_mask, rollout.attention_mask], dim=1)
    completion_len = rollout.completion_ids.shape[1]
    out = model(input_ids, attention_mask=attention_mask, logits_to_keep=completion_len + 1)
    return token_logprobs(out.logits[:, :-1], rollout.completion_ids, temperature=temperature), out.aux_loss


# ================================================================================================ rewards

_ANSWER = re.compile(r"answer is\s*:?\s*(.+?)\s*$", re.DOTALL | re.IGNORECASE)


def extract_final_answer(text: str | None) -> str | None:
    """What the final reply answers: the text after its last "answer is" and an optional colon ("The answer is 391."
    and "The answer is:\n391" -> "391"), else an <answer> block, else the whole reply; a trailing full stop is dropped
    (answers_match normalises the rest)."""
    if text is None:
        return None
    text = text.strip()
    lowered = text.lower()
    if "answer is" in lowered:
        found = _ANSWER.search(text[lowered.rindex("answer is"):])
        return found.group(1).rstrip(".。").strip() if found else None
    block = reward_lib.extract_answer(text)
    return (block if block is not None else text).rstrip(".。").strip()


def _assistant_turns(completion) -> list[str]:
    return [m["content"] for m in completion if m["role"] == "assistant"]


def tool_format_reward(prompts, completions, **kwargs) -> list[float]:
    """1 if the episode called at least one tool and every <tool_call> block in it was well-formed: valid JSON
    {"name", "arguments": {...}}, closed, naming a known tool with arguments that fit its schema; else 0."""
    from .tools import check_call
    rewards = []
    for completion in completions:
        calls = [c for text in _assistant_turns(completion) for c in parse_tool_calls(text)[1]]
        good = bool(calls) and all(c.ok and check_call(c.name, c.arguments) is None for c in calls)
        rewards.append(1.0 if good else 0.0)
    return rewards


def tool_args_reward(prompts, completions, call=None, **kwargs) -> list[float | None]:
    """Against the data's reference call {"name", "arguments"}: 1 if the episode's first call names that tool with
    equivalent arguments (numbers by value, strings ignoring case and spaces), 0.5 for the right tool with other
    arguments, 0 otherwise. None (does not apply) for a line without a reference call."""
    if call is None:
        raise ValueError('the "tool_args" reward needs a "call" field ({"name": ..., "arguments": {...}}) per line')
    rewards = []
    for completion, reference in zip(completions, call):
        if reference is None:
            rewards.append(None)
            continue
        calls = [c for text in _assistant_turns(completion) for c in parse_tool_calls(text)[1] if c.ok]
        if not calls:
            rewards.append(0.0)
        elif same_call(calls[0].name, calls[0].arguments, reference):
            rewards.append(1.0)
        else:
            rewards.append(0.5 if calls[0].name == reference.get("name") else 0.0)
    return rewards


def final_answer_reward(prompts, completions, answer=None, **kwargs) -> list[float]:
    """1 if the final reply (a turn without calls, not cut off: "finished" not False) answers the data's "answer":
    the text after "answer is" compared by rewards.answers_match (numbers exactly, text case-folded); else 0."""
    if answer is None:
        raise ValueError('the "final_answer" reward needs an "answer" field per line')
    rewards = []
    for completion, reference in zip(completions, answer):
        last = completion[-1] if completion else None
        final = last["content"] if last is not None and last["role"] == "assistant" and \
            last.get("finished", True) and not parse_tool_calls(last["content"])[1] else None
        rewards.append(1.0 if reward_lib.answers_match(extract_final_answer(final), reference) else 0.0)
    return rewards


AGENT_REWARDS = {"tool_format": tool_format_reward, "tool_args": tool_args_reward,
                 "final_answer": final_answer_reward}
AGENT_DEFAULT_WEIGHTS = {"tool_format": 0.5, "tool_args": 0.5, "final_answer": 1.0}


def build_agent_rewards(names: list[str], weights: list[float] | None):
    """(functions, names, weights) for --reward_funcs: the agent rewards above by name; anything else as
    rewards.load_reward_function reads it (GRPO's built-ins, module:function, file.py:function)."""
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ValueError("--reward_funcs is empty: name at least one reward function")
    if weights is None:
        weights = [AGENT_DEFAULT_WEIGHTS.get(n, 1.0) for n in names]
    if len(weights) != len(names):
        raise ValueError(f"--reward_weights has {len(weights)} values for {len(names)} reward functions {names}")
    functions = [AGENT_REWARDS.get(n) or reward_lib.load_reward_function(n) for n in names]
    return functions, [n.rsplit(":", 1)[-1] for n in names], [float(w) for w in weights]


def score_episodes(episodes: list[Episode], reward_funcs) -> torch.Tensor:
    """[N, F] rewards per function, TRL's signature: completions are each episode's messages after the prompt."""
    keys = sorted({k for e in episodes for k in e.columns})
    columns = {k: [e.columns.get(k) for e in episodes] for k in keys}
    completions = [e.completion_messages() for e in episodes]
    completion_ids = [[t for t, m in zip(e.ids[e.prompt_len:], e.mask[e.prompt_len:]) if m] for e in episodes]
    return reward_lib.score(reward_funcs, [e.prompt for e in episodes], completions, completion_ids, columns)


# ================================================================================================ evaluation


def episode_metrics(episodes: list[Episode]) -> dict:
    """Held-out task metrics of greedy episodes (sums; divide by "episodes"): task success (final answer right),
    call well-formedness, argument accuracy (first call equals the reference), tool called at all, turns, and the
    generated tokens."""
    completions = [e.completion_messages() for e in episodes]
    answers = [e.columns.get("answer") for e in episodes]
    calls = [e.columns.get("call") for e in episodes]
    success = final_answer_reward(None, completions, answer=answers)
    formed = tool_format_reward(None, completions)
    args_ok = [1.0 if r == 1.0 else 0.0 for r in tool_args_reward(None, completions, call=calls) if r is not None]
    called = [1.0 if any(parse_tool_calls(t)[1] for t in e.turns) else 0.0 for e in episodes]
    return {"episodes": float(len(episodes)), "success": sum(success), "well_formed": sum(formed),
            "args_correct": sum(args_ok), "called_tool": sum(called),
            "turns": float(sum(len(e.turns) for e in episodes)),
            "generated_tokens": float(sum(sum(e.mask) for e in episodes))}


def finish_metrics(sums: dict) -> dict:
    n = max(sums["episodes"], 1.0)
    return {"success": sums["success"] / n, "well_formed": sums["well_formed"] / n,
            "args_correct": sums["args_correct"] / n, "called_tool": sums["called_tool"] / n,
            "turns": sums["turns"] / n, "generated_tokens": sums["generated_tokens"] / n, "episodes": int(n)}


@torch.no_grad()
def evaluate_episodes(model, tokenizer, items: list[dict], max_turns: int, max_gen_len: int, batch_size: int,
                      device, tools: dict | None = None) -> tuple[dict, list[Episode]]:
    """Greedy episodes for the given prompt items (so the numbers move only when the model does), in batches.
    Returns the metric sums (episode_metrics) and the episodes."""
    from transformers import GenerationConfig
    config = GenerationConfig(max_new_tokens=max_gen_len, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    policy = model_policy(model, tokenizer, config, device)
    sums, episodes = None, []
    for start in range(0, len(items), batch_size):
        batch = run_episodes(policy, tokenizer, items[start:start + batch_size], 1, max_turns, tools)
        part = episode_metrics(batch)
        sums = part if sums is None else {k: sums[k] + v for k, v in part.items()}
        episodes += batch
    return sums or episode_metrics([]), episodes


__all__ = ["Episode", "AgentRollout", "TOOLS", "run_episodes", "model_policy", "episodes_to_rollout",
           "rollout_logprobs", "build_agent_rewards", "score_episodes", "evaluate_episodes", "episode_metrics",
           "finish_metrics", "extract_final_answer", "tool_turn_suffix"]
