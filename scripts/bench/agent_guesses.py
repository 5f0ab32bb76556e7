"""Agent SFT data in which some calculator tasks are answered without the tool: the agent experiment of
docs/agent.md ("When the data lets the agent skip its tool").

    python -m scripts.bench.agent_guesses --out_dir /tmp/agent_guesses --share 0.7
    python train_full_sft.py --from_weight reason --data_path /tmp/agent_guesses/demo_agent_sft.jsonl \\
        --max_seq_len 768 --save_weight agent_sft
    python train_agent.py --from_weight agent_sft --learning_rate 1e-4

The shipped dataset/demo_agent_sft.jsonl calls a tool in every chat. Here --share of its calculator chats answer at
once instead: the call and the tool's message are dropped and the final reply ("The answer is X.") follows the
question. The model then has two behaviours for a sum, as the reasoning data of docs/grpo.md's quick replies does:
call the calculator or answer from memory; agent RL's rewards pay for the call and for a right answer. The other
chats, the held-out file and the RL prompts are the shipped ones. The shipped data is only read.
"""
import argparse
import json
import random
import shutil
from pathlib import Path

from scripts.build_demo_data import write_jsonl

DATASET = Path(__file__).resolve().parents[2] / "dataset"


def answered_at_once(chat: dict) -> dict:
    """The chat without its tool call and tool message: system, question, final reply."""
    turns = chat["conversations"]
    return {**chat, "conversations": [turns[0], turns[1], turns[-1]] if turns[0]["role"] == "system"
            else [turns[0], turns[-1]]}


def calls(chat: dict, tool: str) -> bool:
    return any(call["name"] == tool for turn in chat["conversations"] for call in turn.get("tool_calls") or [])


def build(out_dir: Path, share: float, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    with (DATASET / "demo_agent_sft.jsonl").open(encoding="utf-8") as f:
        chats = [json.loads(line) for line in f]
    changed = 0
    for i, chat in enumerate(chats):
        if calls(chat, "calculator") and rng.random() < share:
            chats[i] = answered_at_once(chat)
            changed += 1
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "demo_agent_sft.jsonl", chats)
    shutil.copy(DATASET / "demo_agent_sft_val.jsonl", out_dir / "demo_agent_sft_val.jsonl")
    return {"chats": len(chats), "calculator chats answered at once": changed,
            "calculator chats": sum(calls(chat, "calculator") for chat in chats) + changed}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", type=Path, required=True, help="where demo_agent_sft(_val).jsonl are written")
    parser.add_argument("--share", type=float, default=0.7, help="share of calculator chats answered without the tool")
    parser.add_argument("--seed", type=int, default=7, help="which chats are changed")
    args = parser.parse_args()
    for name, count in build(args.out_dir, args.share, args.seed).items():
        print(f"{name}: {count:,}")
    print(f"written to {args.out_dir}")


if __name__ == "__main__":
    main()
