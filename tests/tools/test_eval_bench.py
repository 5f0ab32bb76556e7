"""scripts/eval_bench.py: the harness's C-Eval prompt, log-likelihood choices equal to a hand computation (one
unbatched forward per option), the CMMLU/MMLU layouts, and perplexity / bits per byte against a full forward."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from model import PRESETS, TinyMindConfig, TinyMindForCausalLM
from model.inference import LoadedModel
from scripts import eval_bench
from tests import ROOT, TOKENIZER

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest


SAMPLE = os.path.join(ROOT, "dataset", "bench_sample")


@pytest.fixture(scope="module")
def loaded():
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    torch.manual_seed(0)
    model = TinyMindForCausalLM(TinyMindConfig(vocab_size=len(tokenizer), **PRESETS["nano"])).eval()
    return LoadedModel(model, tokenizer, "pretrain_64", "memory", "continue", torch.device("cpu"), torch.float32)


def test_ceval_prompt_is_the_harness_prompt():
    shot = eval_bench.Question("computer_network", "HTTP默认端口是____。", ["21", "25", "80", "110"], 2)
    question = eval_bench.Question("computer_network", " IPv4地址有____位。 ", ["16", "32", "64", "128"], 1)
    assert eval_bench.build_context("ceval", "计算机网络", [], question) == (
        "以下是中国关于计算机网络的单项选择题，请选出其中的正确答案。\n\n"
        "IPv4地址有____位。\nA. 16\nB. 32\nC. 64\nD. 128\n答案：")
    assert eval_bench.build_context("ceval", "计算机网络", [shot], question) == (
        "以下是中国关于计算机网络的单项选择题，请选出其中的正确答案。\n\n"
        "HTTP默认端口是____。\nA. 21\nB. 25\nC. 80\nD. 110\n答案： C\n\n"
        "IPv4地址有____位。\nA. 16\nB. 32\nC. 64\nD. 128\n答案：")
    assert eval_bench.build_context("mmlu", "abstract algebra", [], question).endswith("D. 128\nAnswer:")


def hand_loglikelihood(model, tokenizer, context: str, letter: str) -> float:
    """log P(" <letter>" | BOS + context), from one plain forward over the whole text."""
    context_ids = [tokenizer.bos_token_id] + tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = [tokenizer.bos_token_id] + tokenizer(context + " " + letter, add_special_tokens=False)["input_ids"]
    assert whole[:len(context_ids)] == context_ids
    with torch.no_grad():
        log_probs = F.log_softmax(model(torch.tensor([whole])).logits[0].float(), dim=-1)
    return sum(log_probs[t - 1, whole[t]].item() for t in range(len(context_ids), len(whole)))


@pytest.mark.parametrize("k_shot", [0, 2])
def test_sample_set_choices_equal_hand_computed_loglikelihoods(loaded, k_shot):
    result = eval_bench.evaluate_multiple_choice(loaded, SAMPLE, "val", k_shot=k_shot, batch_size=3, verbose=False)
    assert result["total"] == 6 and set(result["subjects"]) == {"computer_network", "high_school_geography"}
    correct = 0
    for detail in result["details"]:
        files = eval_bench.subject_files(SAMPLE, "val")
        questions, _ = eval_bench.read_csv_questions(files[detail["subject"]], detail["subject"])
        question = next(q for q in questions if q.question == detail["question"])
        shots = eval_bench.read_csv_questions(eval_bench.subject_files(SAMPLE, "dev")[detail["subject"]],
                                              detail["subject"])[0][:k_shot]
        context = eval_bench.build_context("ceval", eval_bench.CEVAL_SUBJECTS[detail["subject"]], shots, question)
        by_hand = [hand_loglikelihood(loaded.model, loaded.tokenizer, context, letter) for letter in "ABCD"]
        assert detail["loglikelihoods"] == pytest.approx(by_hand, abs=1e-4)
        choice = "ABCD"[max(range(4), key=lambda i: by_hand[i])]
        assert detail["predicted"] == choice
        correct += choice == detail["answer"]
    assert result["correct"] == correct and result["accuracy"] == correct / 6


def test_batching_and_shared_prefixes_do_not_change_scores(loaded):
    tokenizer = loaded.tokenizer
    contexts = ["问题一\n答案：", "a much longer question about geography and rivers\nAnswer:", "短"]
    pairs = [eval_bench.encode_pair(tokenizer, c, continuation, True)
             for c in contexts for continuation in (" A", " B", " mountains and rivers")]
    one_by_one = eval_bench.loglikelihoods(loaded.model, pairs, 1, 2048, "cpu")
    batched = eval_bench.loglikelihoods(loaded.model, pairs, 8, 2048, "cpu")
    assert batched == pytest.approx(one_by_one, abs=1e-4)
    assert one_by_one[0] == pytest.approx(hand_loglikelihood(loaded.model, tokenizer, contexts[0], "A"), abs=1e-4)


def write_csv(path, rows):
    import csv
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows(rows)


def test_cmmlu_and_mmlu_layouts(loaded, tmp_path):
    write_csv(tmp_path / "cmmlu" / "test" / "agronomy.csv",
              [["", "Question", "A", "B", "C", "D", "Answer"],
               [0, "水稻属于____。", "禾本科", "豆科", "菊科", "蔷薇科", "A"],
               [1, "小麦是____作物。", "油料", "粮食", "纤维", "糖料", "B"]])
    cmmlu = eval_bench.evaluate_multiple_choice(loaded, str(tmp_path / "cmmlu"), "test", verbose=False)
    assert cmmlu["total"] == 2 and list(cmmlu["subjects"]) == ["agronomy"]
    write_csv(tmp_path / "mmlu" / "test" / "astronomy_test.csv",
              [["What is the closest star to Earth?", "Sirius", "The Sun", "Vega", "Polaris", "B"]])
    write_csv(tmp_path / "mmlu" / "dev" / "astronomy_dev.csv",
              [["Which planet is red?", "Mars", "Venus", "Earth", "Jupiter", "A"]])
    mmlu = eval_bench.evaluate_multiple_choice(loaded, str(tmp_path / "mmlu"), "test", k_shot=1, verbose=False)
    question = eval_bench.read_csv_questions(str(tmp_path / "mmlu" / "test" / "astronomy_test.csv"), "astronomy")
    assert question[1] == "mmlu" and mmlu["total"] == 1 and mmlu["details"][0]["answer"] == "B"


def test_unanswered_split_and_missing_folders_are_clear_errors(loaded, tmp_path):
    write_csv(tmp_path / "ceval" / "test" / "law_test.csv",
              [["id", "question", "A", "B", "C", "D", "answer"], [0, "q", "a", "b", "c", "d", ""]])
    with pytest.raises(SystemExit, match="use --split val"):
        eval_bench.evaluate_multiple_choice(loaded, str(tmp_path / "ceval"), "test", verbose=False)
    with pytest.raises(SystemExit, match="no .*val/ folder"):
        eval_bench.evaluate_multiple_choice(loaded, str(tmp_path / "ceval"), "val", verbose=False)
    with pytest.raises(SystemExit, match="no dev file|no .*dev/ folder"):
        eval_bench.evaluate_multiple_choice(loaded, str(tmp_path / "ceval"), "test", k_shot=1, verbose=False)


def test_perplexity_and_bits_per_byte_equal_a_full_forward(loaded, tmp_path):
    tokenizer = loaded.tokenizer
    conversation = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！我是TinyMind。"}]
    docs = [{"text": "春眠不觉晓，处处闻啼鸟。The quick brown fox."}, {"conversations": conversation}]
    data = tmp_path / "held_out.jsonl"
    data.write_text("\n".join(json.dumps(d, ensure_ascii=False) for d in docs) + "\n", encoding="utf-8")
    total_nll, total_tokens, total_bytes = 0.0, 0, 0
    for doc in docs:
        text = doc.get("text")
        if text is None:  # the rendered conversation's first <|im_start|> is the BOS every document starts with
            text = tokenizer.apply_chat_template(doc["conversations"], tokenize=False)[len("<|im_start|>"):]
        ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = loaded.model(torch.tensor([ids])).logits[0]
        total_nll += F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum").item()
        total_tokens += len(ids) - 1
        total_bytes += len(text.encode("utf-8"))
    result = eval_bench.evaluate_perplexity(loaded, str(data), max_seq_len=512, verbose=False)
    assert result["tokens"] == total_tokens and result["bytes"] == total_bytes
    assert result["loss"] == pytest.approx(total_nll / total_tokens, rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(total_nll / math.log(2) / total_bytes, rel=1e-5)
    windowed = eval_bench.evaluate_perplexity(loaded, str(data), max_seq_len=5, batch_size=3, verbose=False)
    assert windowed["tokens"] == total_tokens  # every token is still predicted exactly once, with less context


def test_command_line_writes_results(tmp_path, loaded):
    out = tmp_path / "out"
    out.mkdir()
    from model.checkpoint import save_weights
    save_weights(loaded.model, str(out / "pretrain_64.pth"))
    result_file = tmp_path / "results.json"
    eval_bench.main(["mc", "--save_dir", str(out), "--weight", "pretrain", "--tokenizer_path", TOKENIZER,
                     "--data_dir", SAMPLE, "--k_shot", "1", "--output", str(result_file), "--device", "cpu"])
    saved = json.loads(result_file.read_text(encoding="utf-8"))
    assert saved["model"] == "pretrain_64" and saved["total"] == 6 and saved["k_shot"] == 1
