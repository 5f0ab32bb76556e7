"""Talk to a trained TinyMind in the terminal, or answer a list of prompts (scripted).

    python eval_model.py                                   # chat with out/full_sft_<hidden>.pth, streamed
    python eval_model.py --weight pretrain                 # pretrained model: continues your text
    python eval_model.py --weight dpo --history_turns 3    # keep the last 3 exchanges as context
    python eval_model.py --weight full_sft --lora_name lora_identity   # + out/lora/lora_identity_<hidden>.pth
    python eval_model.py --load_from out/reason_256.pth --show_speed   # any .pth with its config JSON beside
    python eval_model.py --load_from export/tinymind --prompts builtin # a transformers directory (convert_model)
    python eval_model.py --prompts out/questions.txt --temperature 0 --output out/answers.jsonl   # one per line
    python eval_model.py --prompts heldout:dataset/demo_sft_val.jsonl --out_of_domain 2   # beside the references

The demo pipeline writes out/<stage>_256.pth (the GPU recipe _512; --use_moe/--use_mla add _moe/_mla). The
model's architecture (Dense, MoE, MLA, size) comes from the config JSON beside the weights, so no model flags
are needed. Pretrain checkpoints continue text; every later stage uses the chat template (--mode overrides).
In the interactive chat, /clear forgets the history and /exit (or Ctrl-D) quits.

--prompts heldout:<file> answers the first --num_prompts records of a held-out data file and keeps each one's
reference answer beside the model's (the report card shows both): a chat ({"conversations"}: the turns before the
last assistant reply are the prompt, that reply the reference; a prompt without an assistant reply takes its
"answer" field, as the GRPO files hold), a preference pair ({"chosen", "rejected"}: the chosen reply is the
reference), {"prompt", "answer"} or a pretraining text ({"text"}: its first two lines are the prompt, the third the
reference: a held-out poem's next line). --out_of_domain N adds N open prompts that no demo data teaches, marked
"out of domain", to tell what a stage learned from what it cannot know.
"""
import argparse
import json
import os
import sys

import torch

from model.inference import (GENERATION_DEFAULTS, build_prompt, default_generation_config, generate_stream,
                             load_model_for_inference, trim_history)

BUILTIN_CHAT_PROMPTS = [
    "你有什么特长？",
    "为什么天空是蓝色的？",
    "请用Python写一个计算斐波那契数列的函数",
    "解释一下“光合作用”的基本过程",
    "推荐一些中国的美食",
    "What is machine learning?",
]
BUILTIN_CONTINUE_PROMPTS = [
    "马克思主义基本原理",
    "人类大脑的主要功能是",
    "世界上最高的山峰是",
    "《静夜思》 李白\n",
    "The capital of France is",
]
# Open questions outside everything the demo data teaches (poems, Shakespeare, small sums, TinyMind's identity).
OUT_OF_DOMAIN_CHAT_PROMPTS = ["为什么天空是蓝色的？", "What is machine learning?"]
OUT_OF_DOMAIN_CONTINUE_PROMPTS = ["人类大脑的主要功能是", "The capital of France is"]
IN_DOMAIN, OUT_OF_DOMAIN = "in domain", "out of domain"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("which model")
    g.add_argument("--weight", default="full_sft",
                   help="stage name resolved in --save_dir: pretrain, full_sft, dpo, grpo, reason, ... "
                        "(out/<weight>_<hidden>[_moe][_mla].pth)")
    g.add_argument("--load_from", default=None,
                   help="a .pth file (its config JSON beside it) or a transformers directory; overrides --weight")
    g.add_argument("--save_dir", default="out", help="where --weight and --lora_name are looked up")
    g.add_argument("--lora_name", default=None,
                   help="add a LoRA adapter: out/lora/<lora_name>_<hidden>.pth (or a path), merged into the weights")
    g.add_argument("--hidden_size", type=int, default=None, help="only to choose between checkpoints of one stage")
    g.add_argument("--use_moe", type=int, default=None, choices=[0, 1],
                   help="only to choose between a dense and a MoE checkpoint of one stage")
    g.add_argument("--use_mla", type=int, default=None, choices=[0, 1],
                   help="only to choose between a GQA and an MLA checkpoint of one stage")
    g.add_argument("--tokenizer_path", default=None,
                   help="tokenizer directory (default: the transformers directory's own, else model/)")
    g.add_argument("--mode", default="auto", choices=["auto", "chat", "continue"],
                   help="chat: use the chat template; continue: plain text continuation; auto: continue for "
                        "pretrain checkpoints, chat otherwise")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: the best available)")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weight dtype (default: bfloat16/float16 on GPUs, float32 on CPUs)")
    g.add_argument("--num_threads", type=int, default=None, help="CPU threads for torch (default: all cores)")
    g = parser.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=GENERATION_DEFAULTS["temperature"],
                   help="softmax temperature; 0 = greedy decoding")
    g.add_argument("--top_p", type=float, default=GENERATION_DEFAULTS["top_p"], help="nucleus sampling mass")
    g.add_argument("--top_k", type=int, default=GENERATION_DEFAULTS["top_k"], help="sample among the k best (0: off)")
    g.add_argument("--repetition_penalty", type=float, default=GENERATION_DEFAULTS["repetition_penalty"],
                   help="divide the logits of tokens already in the context by this (1.0: off)")
    g.add_argument("--max_new_tokens", type=int, default=GENERATION_DEFAULTS["max_new_tokens"],
                   help="stop an answer after this many tokens")
    g.add_argument("--seed", type=int, default=42, help="sampling seed, reset before every answer (reproducible)")
    g = parser.add_argument_group("conversation")
    g.add_argument("--history_turns", type=int, default=0,
                   help="earlier question/answer pairs sent with each new prompt (0: every prompt stands alone)")
    g.add_argument("--system_prompt", default=None, help="a system message put before the conversation")
    g.add_argument("--prompts", default=None,
                   help="answer these prompts and exit instead of chatting: 'builtin', a .txt file (one prompt per "
                        "line), a .jsonl file with a 'prompt' (or 'text') field per line (and optionally a "
                        "'reference' or 'answer'), or 'heldout:<file>': records of a held-out data file, each with "
                        "its reference answer (see above)")
    g.add_argument("--num_prompts", type=int, default=None,
                   help="answer only the first N prompts (default: 4 of a heldout: file, all of the others)")
    g.add_argument("--out_of_domain", type=int, default=0,
                   help=f"with --prompts: also answer the first N of {len(OUT_OF_DOMAIN_CHAT_PROMPTS)} open prompts "
                        "no demo data teaches (chat: "
                        + ", ".join(OUT_OF_DOMAIN_CHAT_PROMPTS) + "), marked 'out of domain'")
    g.add_argument("--output", default=None,
                   help="with --prompts: also write the answers here (.jsonl: one per line; .json: one summary object)")
    g.add_argument("--show_speed", action="store_true", help="print prefill time and decode tokens/s per answer")
    return parser.parse_args(argv)


def prompt_item(prompt: str, context: list | None = None, reference: str | None = None,
                domain: str | None = None) -> dict:
    """One prompt to answer: the user's text, the turns before it (system message, earlier exchanges), the
    reference answer if known, and whether it comes from the stage's own held-out data."""
    return {"prompt": prompt, "context": context or [], "reference": reference, "domain": domain}


def read_prompts(spec: str, mode: str, count: int | None = None) -> list[dict]:
    """The prompts of --prompts (see its help), the first `count` of them if given."""
    if spec == "builtin":
        items = [prompt_item(p) for p in (BUILTIN_CONTINUE_PROMPTS if mode == "continue" else BUILTIN_CHAT_PROMPTS)]
        return items[:count] if count is not None else items
    if spec.startswith("heldout:"):
        return read_held_out(spec[len("heldout:"):], 4 if count is None else count)
    lines = read_lines(spec)
    if not spec.endswith(".jsonl"):
        return [prompt_item(line) for line in lines][:count]
    prompts = []
    for number, obj in json_records(spec, lines):
        text = obj.get("prompt", obj.get("text")) if isinstance(obj, dict) else None
        if not isinstance(text, str):
            raise SystemExit(f'{spec}:{number}: expected an object with a "prompt" (or "text") string')
        reference = obj.get("reference", obj.get("answer"))
        prompts.append(prompt_item(text, reference=reference if isinstance(reference, str) else None))
    return prompts[:count]


def read_lines(path: str) -> list[str]:
    if not os.path.exists(path):
        raise SystemExit(f"--prompts file not found: {path}")
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def json_records(path: str, lines: list[str]):
    for number, line in enumerate(lines, start=1):
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as error:
            raise SystemExit(f"{path}:{number}: not valid JSON ({error})") from None


def held_out_item(obj) -> dict | None:
    """A held-out record as a prompt with its reference (see the module help), or None for one that has no prompt
    to ask (a chat that opens with its only assistant reply)."""
    if not isinstance(obj, dict):
        return None
    messages = obj.get("conversations") or obj.get("chosen")
    if isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages):
        assistant = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
        if assistant and assistant[-1] > 0:
            before, reference = messages[:assistant[-1]], messages[assistant[-1]].get("content")
        elif not assistant:
            before, reference = messages, obj.get("answer")
        else:
            return None
        if before[-1].get("role") != "user" or not isinstance(before[-1].get("content"), str):
            return None
        context = [{"role": m["role"], "content": m.get("content") or ""} for m in before[:-1]]
        return prompt_item(before[-1]["content"], context, str(reference) if reference is not None else None,
                           IN_DOMAIN)
    if isinstance(obj.get("prompt"), str):
        reference = obj.get("answer", obj.get("reference"))
        return prompt_item(obj["prompt"], reference=str(reference) if reference is not None else None,
                           domain=IN_DOMAIN)
    if isinstance(obj.get("text"), str):
        lines = [line for line in obj["text"].split("\n") if line.strip()]
        if len(lines) >= 3:  # a title (and author) line, a first line: what comes next?
            return prompt_item("\n".join(lines[:2]) + "\n", reference=lines[2], domain=IN_DOMAIN)
        half = len(obj["text"]) // 2
        return prompt_item(obj["text"][:half], reference=obj["text"][half:half + 200], domain=IN_DOMAIN)
    return None


def read_held_out(path: str, count: int) -> list[dict]:
    """The first `count` usable records of a held-out data file, as prompts with their reference answers."""
    items = []
    for _, obj in json_records(path, read_lines(path)):
        item = held_out_item(obj)
        if item is not None:
            items.append(item)
        if len(items) >= count:
            break
    if not items:
        raise SystemExit(f"--prompts heldout:{path}: no record with a prompt (expected chats, preference pairs, "
                         '{"prompt", "answer"} or {"text"} records)')
    return items


def out_of_domain_prompts(mode: str, count: int) -> list[dict]:
    pool = OUT_OF_DOMAIN_CONTINUE_PROMPTS if mode == "continue" else OUT_OF_DOMAIN_CHAT_PROMPTS
    return [prompt_item(p, domain=OUT_OF_DOMAIN) for p in pool[:count]]


class Chat:
    """One conversation: the message history and the model that answers in it."""

    def __init__(self, loaded, args):
        self.loaded, self.args = loaded, args
        self.system = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
        self.history = []
        self.generation_config = default_generation_config(
            loaded.tokenizer, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
            repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens)

    def clear(self):
        self.history = []

    def answer(self, prompt: str, out=None, context: list | None = None) -> dict:
        """Stream the answer to `out` (stdout) as it is generated; remember the exchange; return it with timings.
        `context`: the turns before the prompt (a held-out record's system message and earlier exchanges), used
        instead of this chat's own history."""
        out = out or sys.stdout  # looked up now, not at import: tests and callers may have redirected it
        before = context if context else self.system + self.history
        messages = trim_history(before + [{"role": "user", "content": prompt}],
                                len(before) if context else self.args.history_turns)
        text = build_prompt(self.loaded.tokenizer, messages, self.loaded.mode)
        torch.manual_seed(self.args.seed)  # the same prompt gets the same answer, whatever came before it
        stream = generate_stream(self.loaded, text, self.generation_config)
        pieces = []
        try:
            for piece in stream:
                pieces.append(piece)
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            stream.cancel()  # otherwise the worker thread keeps generating into the void
            stream.join()
            raise
        out.write("\n")
        answer = "".join(pieces)
        self.history += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        result = {"prompt": prompt, "answer": answer, "prompt_tokens": stream.prompt_tokens,
                  "new_tokens": stream.new_tokens, "finish_reason": stream.finish_reason,
                  "prefill_seconds": round(stream.prefill_seconds, 4),
                  "decode_tokens_per_second": round(stream.decode_tokens_per_second, 2)}
        if self.args.show_speed:
            out.write(f"[{stream.new_tokens} tokens | prefill {stream.prompt_tokens} tokens in "
                      f"{1000 * stream.prefill_seconds:.0f} ms | decode {stream.decode_tokens_per_second:.1f} "
                      f"tokens/s]\n")
        return result


def run_prompts(chat: Chat, prompts: list, output: str | None):
    """Answer each prompt (a string or a prompt_item) and print it, beside its reference and marked in or out of
    domain where those are known."""
    results = []
    for item in prompts:
        item = prompt_item(item) if isinstance(item, str) else item
        tag = f" [{item['domain']}]" if item["domain"] else ""
        for turn in item["context"]:
            print(f"   {turn['role']}: {turn['content']}")
        print(f"👶{tag}: {item['prompt']}")
        print("🤖: ", end="", flush=True)
        result = chat.answer(item["prompt"], context=item["context"])
        if item["reference"] is not None:
            print(f"📖 reference: {item['reference']}")
        extra = {k: item[k] for k in ("context", "reference", "domain") if item[k]}
        results.append({**result, **extra})
        print()
    if output:
        write_results(results, output, chat.loaded.name)
    return results


def write_results(results: list[dict], path: str, model_name: str):
    """.jsonl: one {prompt, answer, timings} object per line (+ context, reference and domain where known). .json:
    one object, {"model", "samples": {prompt: answer}, "results": [...]}, the shape scripts/report.py reads from
    out/summaries/."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            for result in results:
                f.write(json.dumps(result, ensure_ascii=False) + "\n")
        else:
            summary = {"model": model_name, "samples": {r["prompt"]: r["answer"] for r in results}, "results": results}
            json.dump(summary, f, ensure_ascii=False, indent=1)
    print(f"answers written to {path}")


def run_interactive(chat: Chat):
    mode_hint = "type text to continue" if chat.loaded.mode == "continue" else "chat"
    print(f"{chat.loaded.name}: {mode_hint}; /clear forgets the history, /exit or Ctrl-D quits")
    while True:
        try:
            prompt = input("👶: ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if prompt.strip() in ("/exit", "/quit"):
            return
        if prompt.strip() == "/clear":
            chat.clear()
            print("(history cleared)")
            continue
        if not prompt.strip():
            continue
        print("🤖: ", end="", flush=True)
        try:
            chat.answer(prompt)
        except KeyboardInterrupt:  # Ctrl-C stops the current answer only
            print("\n(interrupted)")


def main(argv=None):
    args = parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    if args.history_turns < 0 or args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
        raise SystemExit("need --history_turns >= 0, --max_new_tokens >= 1, --temperature >= 0, 0 < --top_p <= 1")
    if (args.num_prompts is not None and args.num_prompts < 1) or args.out_of_domain < 0:
        raise SystemExit("need --num_prompts >= 1 and --out_of_domain >= 0")
    if (args.num_prompts is not None or args.out_of_domain) and not args.prompts:
        raise SystemExit("--num_prompts and --out_of_domain go with --prompts")
    loaded = load_model_for_inference(load_from=args.load_from, weight=args.weight, save_dir=args.save_dir,
                                      hidden_size=args.hidden_size, use_moe=args.use_moe, use_mla=args.use_mla,
                                      lora_name=args.lora_name, tokenizer_path=args.tokenizer_path,
                                      device=args.device, dtype=args.dtype, mode=args.mode)
    chat = Chat(loaded, args)
    if args.prompts:
        prompts = read_prompts(args.prompts, loaded.mode, args.num_prompts)
        return run_prompts(chat, prompts + out_of_domain_prompts(loaded.mode, args.out_of_domain), args.output)
    run_interactive(chat)


if __name__ == "__main__":
    main()
