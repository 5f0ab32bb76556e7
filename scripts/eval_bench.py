"""Benchmarks from local files: multiple-choice accuracy (C-Eval, CMMLU, MMLU) and perplexity / bits per byte.

    python -m scripts.eval_bench mc --data_dir dataset/ceval-exam --split val --weight full_sft        # zero-shot
    python -m scripts.eval_bench mc --data_dir dataset/ceval-exam --split val --k_shot 5 --weight pretrain
    python -m scripts.eval_bench mc --data_dir dataset/cmmlu --split test --format cmmlu --load_from out/dpo_512.pth
    python -m scripts.eval_bench mc --data_dir dataset/bench_sample --split val        # the tiny sample set
    python -m scripts.eval_bench ppl --data_path dataset/pretrain_hq_val.jsonl --weight pretrain

Multiple choice is scored the way lm-evaluation-harness scores C-Eval: the prompt is the subject's description,
k solved examples from the dev split, then the question with its four options and "答案：" ("Answer:" for MMLU);
the model's answer is the option letter whose continuation (" A", " B", ...) has the highest log-likelihood. No
text is generated, so even a pretrained model that cannot follow instructions gets a fair score. Random guessing
scores 25%.

Data layouts (one CSV per subject, the split as a folder):
    C-Eval  <dir>/{dev,val,test}/<subject>_{dev,val,test}.csv   header id,question,A,B,C,D,answer[,explanation]
    CMMLU   <dir>/{dev,test}/<subject>.csv                       header ,Question,A,B,C,D,Answer
    MMLU    <dir>/{dev,val,test}/<subject>_{dev,val,test}.csv   no header: question,A,B,C,D,answer
C-Eval's test answers are not public: use --split val (1,346 questions) or submit predictions to cevalbenchmark.com.

Perplexity reads any jsonl with a "text" field (pretraining format) or "conversations" (SFT format, rendered with
the chat template), splits long documents into --max_seq_len windows and reports token perplexity and bits per
UTF-8 byte (comparable across tokenizers).
"""
import argparse
import csv
import json
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.inference import load_model_for_inference

LETTERS = ["A", "B", "C", "D"]

# lm-evaluation-harness's C-Eval subject names (lm_eval/tasks/ceval/_generate_configs.py), used in the description.
CEVAL_SUBJECTS = dict(item.split(":") for item in (
    "computer_network:计算机网络 operating_system:操作系统 computer_architecture:计算机组成 "
    "college_programming:大学编程 college_physics:大学物理 college_chemistry:大学化学 advanced_mathematics:高等数学 "
    "probability_and_statistics:概率统计 discrete_mathematics:离散数学 electrical_engineer:注册电气工程师 "
    "metrology_engineer:注册计量师 high_school_mathematics:高中数学 high_school_physics:高中物理 "
    "high_school_chemistry:高中化学 high_school_biology:高中生物 middle_school_mathematics:初中数学 "
    "middle_school_biology:初中生物 middle_school_physics:初中物理 middle_school_chemistry:初中化学 "
    "veterinary_medicine:兽医学 college_economics:大学经济学 business_administration:工商管理 "
    "marxism:马克思主义基本原理 mao_zedong_thought:毛泽东思想和中国特色社会主义理论体系概论 education_science:教育学 "
    "teacher_qualification:教师资格 high_school_politics:高中政治 high_school_geography:高中地理 "
    "middle_school_politics:初中政治 middle_school_geography:初中地理 modern_chinese_history:近代史纲要 "
    "ideological_and_moral_cultivation:思想道德修养与法律基础 logic:逻辑学 law:法学 "
    "chinese_language_and_literature:中国语言文学 art_studies:艺术学 professional_tour_guide:导游资格 "
    "legal_professional:法律职业资格 high_school_chinese:高中语文 high_school_history:高中历史 "
    "middle_school_history:初中历史 civil_servant:公务员 sports_science:体育学 plant_protection:植物保护 "
    "basic_medicine:基础医学 clinical_medicine:临床医学 urban_and_rural_planner:注册城乡规划师 accountant:注册会计师 "
    "fire_engineer:注册消防工程师 environmental_impact_assessment_engineer:环境影响评价工程师 tax_accountant:税务师 "
    "physician:医师资格").split())

# Per-format prompt pieces, as in the harness's task configs (description, then each question, then the answer cue).
DESCRIPTIONS = {
    "ceval": "以下是中国关于{subject}的单项选择题，请选出其中的正确答案。\n\n",
    "cmmlu": "以下是关于{subject}的单项选择题，请直接给出正确答案的选项。\n\n",
    "mmlu": "The following are multiple choice questions (with answers) about {subject}.\n\n",
}
ANSWER_CUES = {"ceval": "答案：", "cmmlu": "答案：", "mmlu": "Answer:"}


# ============================================================================================ benchmark files


@dataclass
class Question:
    subject: str
    question: str
    options: list[str]
    answer: int | None  # index into LETTERS; None when the split has no public answers


def subject_files(data_dir: str, split: str) -> dict[str, str]:
    """subject -> CSV path in <data_dir>/<split>/, with the "_<split>" file-name suffix (C-Eval, MMLU) removed."""
    folder = os.path.join(data_dir, split)
    if not os.path.isdir(folder):
        raise SystemExit(f"no {folder}/ folder: --data_dir must hold dev/, val/ or test/ folders of CSV files "
                         f"(see the layouts in this script's --help)")
    files = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".csv"):
            subject = name[:-len(".csv")]
            subject = subject[:-len(f"_{split}")] if subject.endswith(f"_{split}") else subject
            files[subject] = os.path.join(folder, name)
    if not files:
        raise SystemExit(f"no .csv files in {folder}/")
    return files


def read_csv_questions(path: str, subject: str) -> tuple[list[Question], str]:
    """The questions of one CSV and its layout: 'ceval' (lower-case header), 'cmmlu' (capitalised header with an
    index column) or 'mmlu' (no header)."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = [row for row in csv.reader(f) if row]
    if not rows:
        raise SystemExit(f"{path}: empty file")
    header = [cell.strip().lower() for cell in rows[0]]
    if "question" in header and "answer" in header:
        layout = "cmmlu" if "Question" in rows[0] else "ceval"
        columns = [header.index(name) for name in ("question", "a", "b", "c", "d", "answer")]
        body, first_line = rows[1:], 2
    else:
        layout, columns, body, first_line = "mmlu", [0, 1, 2, 3, 4, 5], rows, 1
    questions = []
    for number, row in enumerate(body, start=first_line):
        if len(row) <= max(columns):
            raise SystemExit(f"{path}:{number}: expected question, A, B, C, D and answer columns, got {len(row)} cells")
        question, a, b, c, d, answer = (row[i] for i in columns)
        answer = answer.strip().upper()
        if answer and answer not in LETTERS:
            raise SystemExit(f"{path}:{number}: answer must be one of A, B, C, D, got {answer!r}")
        questions.append(Question(subject, question, [a, b, c, d], LETTERS.index(answer) if answer else None))
    return questions, layout


def subject_display_name(fmt: str, subject: str, mapping: dict) -> str:
    """The name the description uses: C-Eval's Chinese names, else subject_mapping.json, else the file name."""
    if subject in mapping:
        value = mapping[subject]
        return value[1] if isinstance(value, list) and len(value) > 1 else str(value)
    if fmt == "ceval" and subject in CEVAL_SUBJECTS:
        return CEVAL_SUBJECTS[subject]
    return subject.replace("_", " ")


def format_question(fmt: str, question: Question, with_answer: bool) -> str:
    """doc_to_text of the harness (question, lettered options, the answer cue); solved examples add " <letter>"."""
    text = question.question.strip() + "".join(f"\n{letter}. {option}" for letter, option in
                                               zip(LETTERS, question.options, strict=True))
    text += "\n" + ANSWER_CUES[fmt]
    if with_answer:
        text += " " + LETTERS[question.answer]
    return text


def build_context(fmt: str, subject_name: str, shots: list[Question], question: Question) -> str:
    """description + solved examples separated by blank lines + the question, ending at the answer cue."""
    parts = [format_question(fmt, shot, with_answer=True) for shot in shots]
    parts.append(format_question(fmt, question, with_answer=False))
    return DESCRIPTIONS[fmt].format(subject=subject_name) + "\n\n".join(parts)


# ================================================================================================== scoring


def encode_pair(tokenizer, context: str, continuation: str, add_bos: bool) -> tuple[list[int], list[int]]:
    """Tokenize context + continuation together and split, as the harness does: BPE merges across the boundary
    would otherwise differ from how the model saw such text. Trailing spaces of the context move to the
    continuation, so "答案： A" is scored as context "答案：" + continuation " A"."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    continuation_ids = whole[len(context_ids):]
    if add_bos:
        context_ids = [tokenizer.bos_token_id] + context_ids
    return context_ids, continuation_ids


@torch.no_grad()
def loglikelihoods(model, pairs: list[tuple[list[int], list[int]]], batch_size: int, max_len: int,
                   device, pad_id: int = 0) -> list[float]:
    """Sum of log P(continuation | context) for each (context_ids, continuation_ids) pair.

    One forward pass over context + continuation[:-1] gives the log-probabilities of every continuation token, and
    pairs that share that sequence (the four single-token options of a question) share the forward pass: four
    options cost one pass, not four. Sequences are left-padded into batches, with explicit position ids so padding
    shifts nothing, and only the last positions' logits are computed."""
    jobs = {}  # the sequence to run -> [(pair index, number of continuation tokens)]
    for index, (context, continuation) in enumerate(pairs):
        if not continuation:
            raise ValueError("empty continuation")
        sequence = (context + continuation)[-(max_len + 1):][:-1]  # too long: drop the oldest context tokens
        jobs.setdefault(tuple(sequence), []).append((index, continuation))
    results = [0.0] * len(pairs)
    ordered = sorted(jobs, key=len, reverse=True)  # similar lengths together: less padding
    for start in range(0, len(ordered), batch_size):
        batch = ordered[start:start + batch_size]
        width = max(len(s) for s in batch)
        keep = max(len(c) for s in batch for _, c in jobs[s])
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, sequence in enumerate(batch):
            ids[row, width - len(sequence):] = torch.tensor(sequence)
            mask[row, width - len(sequence):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep).logits
        log_probs = F.log_softmax(logits.float(), dim=-1)  # [B, keep, vocab]: the last `keep` positions
        for row, sequence in enumerate(batch):
            for index, continuation in jobs[sequence]:
                # the last len(continuation) positions predict the continuation tokens, in order
                picked = log_probs[row, keep - len(continuation):].gather(
                    -1, torch.tensor(continuation, device=device)[:, None])
                results[index] = picked.sum().item()
    return results


def evaluate_multiple_choice(loaded, data_dir: str, split: str = "val", k_shot: int = 0, fmt: str = "auto",
                             subjects: list[str] | None = None, limit: int | None = None, batch_size: int = 16,
                             max_len: int = 2048, add_bos: bool = True, verbose: bool = True) -> dict:
    """Accuracy per subject and overall (micro: over all questions; macro: mean of the subjects' accuracies)."""
    tokenizer = loaded.tokenizer
    files = subject_files(data_dir, split)
    if subjects:
        unknown = sorted(set(subjects) - set(files))
        if unknown:
            raise SystemExit(f"--subjects {', '.join(unknown)} not in {data_dir}/{split}/ (has: {', '.join(files)})")
        files = {s: files[s] for s in subjects}
    mapping = {}
    mapping_file = os.path.join(data_dir, "subject_mapping.json")
    if os.path.exists(mapping_file):
        with open(mapping_file, encoding="utf-8") as f:
            mapping = json.load(f)
    dev_files = subject_files(data_dir, "dev") if k_shot > 0 else {}
    per_subject, details = {}, []
    start = time.time()
    for subject, path in files.items():
        questions, layout = read_csv_questions(path, subject)
        questions = questions[:limit] if limit else questions
        subject_fmt = layout if fmt == "auto" else fmt
        if any(q.answer is None for q in questions):
            raise SystemExit(f"{path}: some questions have no answer (C-Eval's test split keeps them secret); "
                             "use --split val")
        shots = []
        if k_shot > 0:
            if subject not in dev_files:
                raise SystemExit(f"--k_shot {k_shot}: no dev file for {subject} in {data_dir}/dev/")
            shots = read_csv_questions(dev_files[subject], subject)[0][:k_shot]  # the harness's first_n sampler
        name = subject_display_name(subject_fmt, subject, mapping)
        pairs, contexts = [], []
        for question in questions:
            context = build_context(subject_fmt, name, shots, question)
            contexts.append(context)
            pairs += [encode_pair(tokenizer, context, " " + letter, add_bos) for letter in LETTERS]
        scores = loglikelihoods(loaded.model, pairs, batch_size, max_len, loaded.device, tokenizer.pad_token_id or 0)
        correct = 0
        for i, question in enumerate(questions):
            option_scores = scores[4 * i:4 * i + 4]
            predicted = max(range(4), key=lambda j: option_scores[j])
            correct += predicted == question.answer
            details.append({"subject": subject, "question": question.question, "answer": LETTERS[question.answer],
                            "predicted": LETTERS[predicted], "loglikelihoods": option_scores})
        per_subject[subject] = {"accuracy": correct / len(questions), "correct": correct, "total": len(questions)}
        if verbose:
            print(f"{subject:<45} {100 * correct / len(questions):6.2f}%  ({correct}/{len(questions)})", flush=True)
    total = sum(s["total"] for s in per_subject.values())
    correct = sum(s["correct"] for s in per_subject.values())
    summary = {"accuracy": correct / total, "macro_accuracy": sum(s["accuracy"] for s in per_subject.values()) /
               len(per_subject), "correct": correct, "total": total, "subjects": per_subject, "split": split,
               "k_shot": k_shot, "seconds": round(time.time() - start, 2), "details": details}
    if verbose:
        print(f"{'overall':<45} {100 * summary['accuracy']:6.2f}%  ({correct}/{total}); mean over "
              f"{len(per_subject)} subjects {100 * summary['macro_accuracy']:.2f}%; {k_shot}-shot, "
              f"{summary['seconds']:.1f}s (random guessing: 25%)")
    return summary


# =============================================================================================== perplexity


def document_ids(tokenizer, obj: dict, where: str) -> tuple[list[int], int]:
    """(BOS + the document's tokens, its UTF-8 byte count). Text documents are scored as pretraining saw them;
    conversations are rendered with the chat template (every token scored, the template's markers included)."""
    if isinstance(obj.get("text"), str):
        text = obj["text"]
    elif isinstance(obj.get("conversations"), list):
        text = tokenizer.apply_chat_template(obj["conversations"], tokenize=False)
        if tokenizer.bos_token and text.startswith(tokenizer.bos_token):
            text = text[len(tokenizer.bos_token):]  # BOS is the context below, not a scored token
    else:
        raise SystemExit(f'{where}: expected a "text" string or a "conversations" list')
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [tokenizer.bos_token_id] + ids, len(text.encode("utf-8"))


@torch.no_grad()
def evaluate_perplexity(loaded, data_path: str, max_seq_len: int = 512, batch_size: int = 8,
                        limit: int | None = None, verbose: bool = True) -> dict:
    """Next-token loss over every token of every document (each predicted once: long documents are cut into
    disjoint windows of max_seq_len predictions), as perplexity per token and bits per UTF-8 byte."""
    if not os.path.exists(data_path):
        raise SystemExit(f"data file not found: {data_path}")
    windows, total_bytes, docs = [], 0, 0
    with open(data_path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if limit and docs >= limit:
                break
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as error:
                raise SystemExit(f"{data_path}:{number}: not valid JSON ({error})") from None
            ids, n_bytes = document_ids(loaded.tokenizer, obj, f"{data_path}:{number}")
            total_bytes += n_bytes
            docs += 1
            for start in range(0, len(ids) - 1, max_seq_len):  # window i predicts ids[start+1 : start+1+L]
                windows.append(ids[start:start + max_seq_len + 1])
    if not windows:
        raise SystemExit(f"{data_path}: no documents")
    total_nll, total_tokens = 0.0, 0
    windows.sort(key=len, reverse=True)
    for start in range(0, len(windows), batch_size):
        batch = windows[start:start + batch_size]
        width = max(len(w) for w in batch) - 1
        inputs = torch.full((len(batch), width), loaded.tokenizer.pad_token_id or 0, dtype=torch.long)
        targets = torch.full((len(batch), width), -100, dtype=torch.long)
        for row, window in enumerate(batch):
            inputs[row, :len(window) - 1] = torch.tensor(window[:-1])
            targets[row, :len(window) - 1] = torch.tensor(window[1:])
        # Right padding needs no attention mask: causal attention never lets a real token see the pads after it.
        logits = loaded.model(input_ids=inputs.to(loaded.device)).logits.float()
        total_nll += F.cross_entropy(logits.flatten(0, 1), targets.to(loaded.device).flatten(), ignore_index=-100,
                                     reduction="sum").item()
        total_tokens += int((targets != -100).sum())
    loss = total_nll / total_tokens
    result = {"documents": docs, "tokens": total_tokens, "bytes": total_bytes, "loss": loss,
              "perplexity": math.exp(min(loss, 100)), "bits_per_byte": total_nll / math.log(2) / total_bytes}
    if verbose:
        print(f"{data_path}: {docs} documents, {total_tokens:,} tokens, {total_bytes:,} bytes | loss {loss:.4f} | "
              f"perplexity {result['perplexity']:.3f} | bits/byte {result['bits_per_byte']:.4f}")
    return result


# ====================================================================================================== CLI


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("model")
    g.add_argument("--weight", default="full_sft", help="stage name resolved in --save_dir (pretrain, full_sft, ...)")
    g.add_argument("--load_from", default=None, help="a .pth file or a transformers directory; overrides --weight")
    g.add_argument("--save_dir", default="out", help="where --weight and --lora_name are looked up")
    g.add_argument("--lora_name", default=None, help="add out/lora/<lora_name>_<hidden>.pth (or a path)")
    g.add_argument("--hidden_size", type=int, default=None, help="only to choose between checkpoints of one stage")
    g.add_argument("--use_moe", type=int, default=None, choices=[0, 1], help="choose the MoE checkpoint of a stage")
    g.add_argument("--use_mla", type=int, default=None, choices=[0, 1], help="choose the MLA checkpoint of a stage")
    g.add_argument("--tokenizer_path", default=None, help="tokenizer directory (default: model/)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: the best available)")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weight dtype (default: bfloat16/float16 on GPUs, float32 on CPUs)")
    g.add_argument("--batch_size", type=int, default=16, help="sequences per forward pass")
    g.add_argument("--output", default=None, help="write the results (with per-question scores) as JSON here")
    sub = parser.add_subparsers(dest="task", required=True)
    mc = sub.add_parser("mc", parents=[common], help="multiple-choice accuracy (C-Eval / CMMLU / MMLU CSVs)")
    mc.add_argument("--data_dir", default="dataset/bench_sample", help="folder with dev/ val/ test/ CSV folders")
    mc.add_argument("--split", default="val", help="which folder to score: val, test (CMMLU/MMLU) or dev")
    mc.add_argument("--k_shot", type=int, default=0, help="solved dev-split examples before each question (0-5)")
    mc.add_argument("--format", default="auto", choices=["auto", "ceval", "cmmlu", "mmlu"],
                    help="prompt language/description; auto: from the CSV header")
    mc.add_argument("--subjects", default=None, help="comma-separated subjects to score (default: all)")
    mc.add_argument("--limit", type=int, default=None, help="score only the first N questions of each subject")
    mc.add_argument("--max_len", type=int, default=2048, help="longer prompts lose their oldest tokens")
    mc.add_argument("--add_bos", type=int, default=1, choices=[0, 1],
                    help="1: start every prompt with <|im_start|>, as every training document starts")
    ppl = sub.add_parser("ppl", parents=[common], help="perplexity and bits per byte on a held-out jsonl")
    ppl.add_argument("--data_path", required=True, help='jsonl with a "text" or "conversations" field per line')
    ppl.add_argument("--max_seq_len", type=int, default=512, help="tokens predicted per window")
    ppl.add_argument("--limit", type=int, default=None, help="score only the first N documents")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    loaded = load_model_for_inference(load_from=args.load_from, weight=args.weight, save_dir=args.save_dir,
                                      hidden_size=args.hidden_size, use_moe=args.use_moe, use_mla=args.use_mla,
                                      lora_name=args.lora_name, tokenizer_path=args.tokenizer_path,
                                      device=args.device, dtype=args.dtype)
    if args.task == "mc":
        subjects = args.subjects.split(",") if args.subjects else None
        max_len = min(args.max_len, loaded.context_length)
        result = evaluate_multiple_choice(loaded, args.data_dir, args.split, args.k_shot, args.format, subjects,
                                          args.limit, args.batch_size, max_len, bool(args.add_bos))
    else:
        result = evaluate_perplexity(loaded, args.data_path, args.max_seq_len, args.batch_size, args.limit)
    result["model"] = loaded.name
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(result, f, ensure_ascii=False, indent=1)
        print(f"results written to {args.output}")
    return result


if __name__ == "__main__":
    main()
