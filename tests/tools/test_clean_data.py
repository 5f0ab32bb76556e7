"""clean_data.py and its package model.data.cleaning: every filter rule on keep/drop fixtures (English ones against
datatrove's Gopher filters), MinHash/LSH against datasketch, dedup across workers, the Kneser-Ney LM, and the
pipeline's I/O guarantees."""
import json
import math
import os
import random
import re
import socket
from collections import Counter

import numpy as np
import pytest

import clean_data as cd  # the command line: make_config, build_parser, run_pipeline, main
from model.data.cleaning.config import REASONS
from model.data.cleaning.dedup import UnionFind, band_keys, lsh_params, minhash_signature, shingles
from model.data.cleaning.ngram_lm import KneserNeyLM, document_perplexity, train_reference_lm
from model.data.cleaning.rules import (GOPHER_QUALITY_RULES, GOPHER_REPETITION_RULES, DocView, filter_record,
                                       first_failed_rule)
from model.data.cleaning.text import normalize_text, normalize_unicode
from model.data.cleaning.words import english_words

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "clean")
with open(os.path.join(FIXTURES, "clean_zh.txt"), encoding="utf-8") as f:
    ZH = [line.strip() for line in f if line.strip()]
with open(os.path.join(FIXTURES, "clean_en.txt"), encoding="utf-8") as f:
    EN = [line.strip() for line in f if line.strip()]

CFG = cd.make_config()


def reason_of(text, **overrides):
    cfg = cd.make_config(**overrides) if overrides else CFG
    return filter_record({"text": text}, cfg)[1]


def load_bench():
    """scripts/bench/bench_clean_data.py (imported when a test needs it: the benchmark is not the thing tested)."""
    from scripts.bench import bench_clean_data
    return bench_clean_data


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def run(tmp_path, records, *flags, name="in.jsonl"):
    src, out = str(tmp_path / name), str(tmp_path / "out.jsonl")
    write_jsonl(src, records)
    report = cd.run_pipeline(cd.make_config(["--input", src, "--output", out, "--quiet", *flags]))
    return read_jsonl(out), report


# -----------------------------------------------------------------------------------------------------------------
# stage 1: English fixtures, one or more per Gopher rule (their reason codes are datatrove's)

def words_text(words):
    return " ".join(words) + "."


def distinct_words(length, n, seed):
    rng = random.Random(seed)
    out = set()
    while len(out) < n:
        out.add("".join(rng.choice("bcdfghklmnprstvw") + rng.choice("aeiou") for _ in range(length // 2))[:length])
    return sorted(out)


def english_fixtures():
    base, other = EN[0], EN[1]
    sentences = re.split(r"(?<=\.) ", EN[2] + " " + EN[3])
    filler = " ".join(EN[4:8])
    return [
        ("keep_clean_1", base, None, {}),
        ("keep_clean_2", EN[5], None, {}),
        ("keep_two_paragraphs", base + "\n\n" + other, None, {}),
        ("dup_para_frac", "\n\n".join([base, base, base, other]), "dup_para_frac", {}),
        ("dup_para_char_frac", "\n\n".join([base, base, "A short note.", "Another short note.", "One more."]),
         "dup_para_char_frac", {}),
        ("dup_line_frac", "\n".join(sentences + ["Click here now."] * 6), "dup_line_frac", {}),
        ("dup_line_char_frac", "\n".join(sentences[:6] + [sentences[6]] * 2 + sentences[7:] + [base, base]),
         "dup_line_char_frac", {}),
        ("top_2_gram", " ".join(f"big data {w}," for w in distinct_words(6, 40, 1)) + " " + base, "top_2_gram", {}),
        ("top_3_gram", EN[4] + " " + EN[5] + " "
         + " ".join(f"reading good books {w}" for w in distinct_words(6, 15, 2)),
         "top_3_gram", {}),
        ("top_4_gram", filler + " "
         + " ".join(f"extraordinary magnificent wonderful spectacular {w}" for w in distinct_words(6, 12, 3)),
         "top_4_gram", {}),
        ("duplicated_5_n_grams", base + " " + other + " " + base, "duplicated_5_n_grams", {}),
        ("duplicated_10_n_grams", base + " " + other + " " + base, "duplicated_10_n_grams",
         dict(max_dup_ngram_frac=(0, 0, 0, 0, 0, 0.1))),
        ("gopher_short_doc", " ".join(base.split()[:40]), "gopher_short_doc", {}),
        ("gopher_long_doc", base, "gopher_long_doc", dict(gopher_max_words=60)),
        ("gopher_below_avg_threshold", words_text(distinct_words(2, 60, 4) + ["the", "of", "to", "and"]),
         "gopher_below_avg_threshold", {}),
        ("gopher_above_avg_threshold", words_text(distinct_words(14, 60, 5) + ["the", "of", "and"]),
         "gopher_above_avg_threshold", {}),
        ("gopher_too_many_hashes", base + " " + " ".join(f"#{w}" for w in distinct_words(6, 14, 6)),
         "gopher_too_many_hashes", {}),
        ("gopher_too_many_ellipsis", " ".join(w + (" ..." if i % 6 == 5 else "") for i, w in enumerate(base.split())),
         "gopher_too_many_ellipsis", {}),
        ("gopher_too_many_bullets", "\n".join("- " + s for s in sentences), "gopher_too_many_bullets", {}),
        ("gopher_too_many_end_ellipsis", "\n".join(s.rstrip(".") + "..." if i % 2 else s
                                                   for i, s in enumerate(sentences)),
         "gopher_too_many_end_ellipsis", {}),
        ("gopher_below_alpha_threshold", base + " " + " ".join(str(1000 + 37 * i) for i in range(40)),
         "gopher_below_alpha_threshold", {}),
        ("gopher_enough_stop_words", re.sub(r"\b(the|be|to|of|and|that|have|with)\b ?", "", base + " " + other),
         "gopher_enough_stop_words", {}),
    ]


EN_FIXTURES = english_fixtures()


@pytest.mark.parametrize("name,text,expected,overrides", EN_FIXTURES, ids=[f[0] for f in EN_FIXTURES])
def test_english_rule_fixtures(name, text, expected, overrides):
    assert reason_of(text, **overrides) == expected


def test_english_fixtures_agree_with_datatrove():
    pytest.importorskip("spacy")  # datatrove's English word tokenizer
    filters = pytest.importorskip("datatrove.pipeline.filters")
    from datatrove.data import Document
    disagreements = []
    for name, text, expected, overrides in EN_FIXTURES:
        cfg = cd.make_config(**overrides) if overrides else CFG
        repetition = filters.GopherRepetitionFilter(
            dup_line_frac=cfg.max_dup_line_frac, dup_para_frac=cfg.max_dup_para_frac,
            dup_line_char_frac=cfg.max_dup_line_char_frac, dup_para_char_frac=cfg.max_dup_para_char_frac,
            # datatrove has no "0 = off" for the n-gram thresholds: leave those out
            top_n_grams=tuple((n, f) for n, f in zip((2, 3, 4), cfg.max_top_ngram_frac) if f > 0),
            dup_n_grams=tuple((n, f) for n, f in zip(range(5, 11), cfg.max_dup_ngram_frac) if f > 0))
        quality = filters.GopherQualityFilter(max_doc_words=cfg.gopher_max_words)
        result = repetition.filter(Document(text=text, id=name))
        if result is True:
            result = quality.filter(Document(text=text, id=name))
        theirs = None if result is True else result[1]
        ours = first_failed_rule(DocView(text, "text", cfg), cfg, GOPHER_REPETITION_RULES + GOPHER_QUALITY_RULES)
        if theirs != ours:
            disagreements.append((name, theirs, ours))
    assert not disagreements


def test_english_tokenizer_matches_spacy():
    spacy = pytest.importorskip("spacy")
    nlp = spacy.blank("en")
    samples = EN + ["I'll say it's the U.S.A.'s best, isn't it? Dr. Smith wasn't... sure--then 'em left (quietly).",
                    "well-known e-mail x@y.com $4.99 50% 3.5kg CELIA. etc. e.g. o'clock cannot"]
    for text in samples:
        assert english_words(text) == [t.text for t in nlp(text) if t.text.strip()]


# -----------------------------------------------------------------------------------------------------------------
# stage 1: Chinese and language-independent rules

def zh_doc(i=0):
    return ZH[i]


ZH_FIXTURES = [
    ("keep_clean", ZH[0], None, {}),
    ("keep_clean_long", ZH[1] + "\n" + ZH[2], None, {}),
    ("too_short", "今天天气很好。", "too_short", {}),
    ("too_long", ZH[0], "too_long", dict(max_chars=50)),
    ("mojibake", ZH[0][:60] + "\ufffd" * 5 + ZH[0][60:], "mojibake", {}),
    ("too_many_symbols", ZH[0][:40] + "@#$%^&*~|<>{}[]=+" * 3, "too_many_symbols", {}),
    ("too_little_cjk", EN[0], "too_little_cjk", dict(min_cjk_ratio=0.3)),
    ("keep_enough_cjk", ZH[0], None, dict(min_cjk_ratio=0.3)),
    ("bad_words", ZH[0] + "点击进入赌博网站，网上赌场，六合彩开奖。", "bad_words", {}),
    ("keep_one_bad_word", ZH[0] + "警方查处了一个赌博网站。", None, {}),
    ("boilerplate", ZH[0] + "本文来源于网络，转载请注明出处。", "boilerplate", {}),
    ("dup_char_ngrams", ZH[0] + "哈哈哈哈哈哈哈哈哈哈" * 12, "dup_char_ngrams", {}),
    ("duplicated_zh_sentence", ZH[3] + ZH[3][:70] + ZH[4] + ZH[3][:70], "duplicated_5_n_grams",
     dict(max_dup_char_ngram_frac=0)),
    ("dup_line_frac_zh",
     "\n".join(line for s in re.split("(?<=。)", ZH[5])[:6] for line in ("好的，明白。", s)),
     "dup_line_frac", {}),
    ("top_2_gram_zh",
     ZH[6] + "".join(f"人工智能技术{w}，" for w in "甲乙丙丁戊己庚辛壬癸子丑寅卯辰巳午未申酉"),
     "top_2_gram", {}),
    ("keep_zh_with_english_terms", "我们用Python和PyTorch训练了一个小模型，" + ZH[8], None, {}),
]


@pytest.mark.parametrize("name,text,expected,overrides", ZH_FIXTURES, ids=[f[0] for f in ZH_FIXTURES])
def test_chinese_and_generic_rule_fixtures(name, text, expected, overrides):
    assert reason_of(text, **overrides) == expected


def test_all_clean_fixtures_pass_every_rule():
    for text in ZH + EN:
        assert reason_of(text) is None, text[:30]


def test_every_rule_can_be_switched_off():
    text = ZH[0] + "哈哈哈哈哈哈哈哈哈哈" * 12
    assert reason_of(text, max_dup_char_ngram_frac=0, max_top_ngram_frac=(0, 0, 0), max_dup_ngram_frac=(0,) * 6,
                     max_symbol_ratio=0) is None


def test_unknown_stage_names_are_refused():
    with pytest.raises(SystemExit):
        cd.make_config(["--stages", "filter,dedupe"])
    with pytest.raises(SystemExit):
        cd.make_config(["--keep_buckets", "good"])


def test_every_flag_has_help():
    for action in cd.build_parser()._actions:
        assert action.help, action.dest


def test_reason_codes_are_documented():
    produced = {f[2] for f in EN_FIXTURES + ZH_FIXTURES if f[2]}
    patterns = [re.compile("^" + code.replace("{n}", r"\d+") + "$") for code in REASONS]
    assert all(any(p.match(code) for p in patterns) for code in produced)


# -----------------------------------------------------------------------------------------------------------------
# stage 1: normalization and conversations

def test_nfkc_keeps_chinese_punctuation():
    text = "ＡＢＣ１２３，你好！（测试）：对；好吗？～…　全角空格"
    assert normalize_unicode(text) == "ABC123，你好！（测试）：对；好吗？～… 全角空格"
    assert normalize_unicode(text, fold_cjk_punct=True) == "ABC123,你好!(测试):对;好吗?~... 全角空格"


def test_normalize_text_removes_controls_and_zero_width():
    text = "第一行\u200b文字\x07\r\n第二行\ufeff  \r\n\n\n\n第三行 "
    assert normalize_text(text, CFG) == "第一行文字\n第二行\n\n第三行"


def test_traditional_to_simplified():
    pytest.importorskip("opencc")
    cfg = cd.make_config(t2s=True)
    assert normalize_text("漢字轉換，頭髮與發展", cfg) == "汉字转换，头发与发展"


def test_conversation_turns_are_normalized_and_dropped_as_a_unit():
    chat = {"id": 7, "conversations": [{"role": "user", "content": "你好\u200b！"},
                                        {"role": "assistant", "content": "你好！有什么可以帮你？"}]}
    record, reason = filter_record(chat, CFG)
    assert reason is None  # short chats are exempt from too_short and the English word-count rules
    assert record["conversations"][0] == {"role": "user", "content": "你好！"} and record["id"] == 7
    empty_turn = {"conversations": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "\u200b"}]}
    assert filter_record(empty_turn, CFG) == (None, "empty_turn")
    spam = {"conversations": [{"role": "user", "content": "推荐一下"},
                              {"role": "assistant",
                               "content": "赌博网站，网上赌场，六合彩，博彩平台"}]}
    assert filter_record(spam, CFG) == (None, "bad_words")


def test_special_tokens_are_line_breaks_for_the_rules():
    text = "<|im_start|>" + ZH[0] + "<|im_end|> <|im_start|>" + ZH[1] + "<|im_end|>"
    assert reason_of(text) is None
    assert "<|im_start|>" not in DocView(text, "text", CFG).text


# -----------------------------------------------------------------------------------------------------------------
# stage 2: MinHash and LSH against datasketch

def test_lsh_bands_equal_datasketch():
    from datasketch import MinHashLSH
    reference = {0.7: (14, 9), 0.8: (9, 13), 0.9: (5, 25)}  # references.md 5.8
    for t in (0.4, 0.5, 0.7, 0.8, 0.9):
        lsh = MinHashLSH(threshold=t, num_perm=128)
        assert lsh_params(t, 128) == (lsh.b, lsh.r)
        if t in reference:
            assert lsh_params(t, 128) == reference[t]


def test_minhash_estimates_within_three_sigma():
    from datasketch import MinHash
    rng = random.Random(0)
    for target in (0.2, 0.5, 0.8, 0.9):
        for trial in range(5):
            union = [f"shingle-{trial}-{i}" for i in range(400)]
            n_common = round(target * len(union))
            rng.shuffle(union)
            common, rest = union[:n_common], union[n_common:]
            a, b = set(common + rest[::2]), set(common + rest[1::2])
            exact = len(a & b) / len(a | b)
            sig_a, sig_b = minhash_signature(a, 128, 1), minhash_signature(b, 128, 1)
            estimate = float(np.mean(sig_a == sig_b))
            sigma = math.sqrt(exact * (1 - exact) / 128)
            assert abs(estimate - exact) <= 3 * sigma, (target, estimate, exact)
            ma, mb = MinHash(num_perm=128), MinHash(num_perm=128)
            ma.update_batch([s.encode() for s in a])
            mb.update_batch([s.encode() for s in b])
            assert ma.jaccard(mb) == pytest.approx(estimate)  # the same sketch as datasketch's own


def test_band_buckets_give_the_same_candidates_as_datasketch_lsh():
    from datasketch import MinHash, MinHashLSH
    bench = load_bench()
    records = bench.make_dedup_corpus("en", 60, 4, seed=3)
    t = 0.5
    b, r = lsh_params(t, 128)
    lsh = MinHashLSH(threshold=t, num_perm=128)
    buckets, sketches = {}, {}
    for rec in records:
        shingle_set = shingles(rec["text"], CFG)
        m = MinHash(num_perm=128)
        m.update_batch([s.encode() for s in shingle_set])
        sketches[rec["bench_id"]] = m
        lsh.insert(rec["bench_id"], m)
        for key in band_keys(minhash_signature(shingle_set, 128, 1), b, r):
            buckets.setdefault(key, []).append(rec["bench_id"])
    ours = {tuple(sorted((x, y))) for ids in buckets.values() for x in ids for y in ids if x != y}
    theirs = {tuple(sorted((i, j))) for i, m in sketches.items() for j in lsh.query(m) if i != j}
    assert ours == theirs and len(ours) >= 4 * 5  # every planted copy is a candidate of its original


def test_shingles_ignore_sentence_order_and_need_three_words():
    a = "我们今天去公园散步。然后回家吃了一顿丰盛的晚饭！"
    b = "然后回家吃了一顿丰盛的晚饭！我们今天去公园散步。"
    assert shingles(a, CFG) == shingles(b, CFG)
    assert all(len(s.split()) == 3 for s in shingles(EN[0], CFG))


def test_union_find_keeps_lowest_id():
    uf = UnionFind()
    for a, b in ((5, 3), (9, 5), (2, 7), (7, 9)):
        uf.union(a, b)
    assert {uf.find(x) for x in (2, 3, 5, 7, 9)} == {2}


# -----------------------------------------------------------------------------------------------------------------
# stage 2: dedup through the pipeline

def test_exact_near_and_cross_file_duplicates(tmp_path):
    near = ZH[1].replace("编程语言", "外国语言").replace("计算器", "小游戏")
    records = [{"text": t, "i": i} for i, t in enumerate(ZH[:6])]
    records += [{"text": "  " + ZH[2].upper() + "  ", "i": 100},  # exact after case/whitespace normalization
                {"text": near, "i": 101}]
    out, report = run(tmp_path, records, "--stages", "dedup", "--minhash_threshold", "0.5")
    assert [r["i"] for r in out] == list(range(6))
    assert report["dedup"]["exact_duplicates"] == 1 and report["dedup"]["near_duplicates"] == 1
    # the same document in two input files is kept once, the first occurrence
    write_jsonl(str(tmp_path / "a.jsonl"), [{"text": ZH[0], "f": "a"}, {"text": ZH[1], "f": "a"}])
    write_jsonl(str(tmp_path / "b.jsonl"), [{"text": ZH[1], "f": "b"}, {"text": ZH[2], "f": "b"}])
    out_path = str(tmp_path / "ab.jsonl")
    cd.run_pipeline(cd.make_config(["--input", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"),
                                    "--output", out_path, "--stages", "dedup", "--quiet"]))
    assert [(r["text"][:4], r["f"]) for r in read_jsonl(out_path)] == [(ZH[0][:4], "a"), (ZH[1][:4], "a"),
                                                                        (ZH[2][:4], "b")]


def test_default_threshold_finds_copies_with_ten_percent_of_words_edited(tmp_path):
    bench = load_bench()
    records = bench.make_dedup_corpus("en", 150, 20, seed=7)
    out, _ = run(tmp_path, records, "--stages", "dedup", "--sentence_min_docs", "0")
    scores = bench.dedup_scores(records, {r["bench_id"] for r in out})
    assert scores["edit5"] == 1.0 and scores["edit10"] >= 0.95 and scores["all"] >= 0.95, scores
    assert scores["fp_docs"] == 0.0


def test_short_texts_sharing_a_line_are_not_near_duplicates(tmp_path):
    title = "The Tragedy of Hamlet, Prince of Denmark."
    records = [{"text": f"{title} Enter Horatio."}, {"text": f"{title} Exit the ghost."}]  # 6 shingles, 5 shared
    out, report = run(tmp_path, records, "--stages", "dedup", "--sentence_min_docs", "0")
    assert len(out) == 2 and report["dedup"]["near_duplicates"] == 0
    out, report = run(tmp_path, records, "--stages", "dedup", "--sentence_min_docs", "0", "--min_shingles", "1")
    assert len(out) == 1 and report["dedup"]["near_duplicates"] == 1  # without the guard: one shared line is enough


@pytest.mark.slow
def test_one_and_two_workers_give_identical_output(tmp_path):
    bench = load_bench()
    records = bench.make_dedup_corpus("zh", 300, 20, seed=5)
    # the same document placed far apart, so with 2 workers its copies are in chunks of different workers
    records += [dict(records[3], bench_id=len(records), bench_kind="copy")]
    outputs = []
    for workers in ("1", "2"):
        out, _ = run(tmp_path, records, "--stages", "filter,dedup", "--num_workers", workers, "--chunk_size", "16",
                     "--sentence_min_docs", "0")
        outputs.append(out)
    assert outputs[0] == outputs[1]
    kept = {r["bench_id"] for r in outputs[0]}
    assert len(records) - 1 not in kept and 3 in kept
    scores = bench.dedup_scores(records, kept)
    assert scores["shuffle"] == 1.0 and scores["boilerplate"] >= 0.9 and scores["fp_docs"] == 0.0


def test_boilerplate_sentences_are_cut_not_documents(tmp_path):
    boiler = "本文内容仅供参考，如需转载请联系作者获得授权。"
    records = [{"text": f"<|im_start|>{ZH[i]}{boiler}<|im_end|>"} for i in range(12)]
    records.append({"text": ZH[12] + "好的。"})
    records.append({"conversations": [{"role": "system", "content": boiler}, {"role": "user", "content": ZH[13]}]})
    out, report = run(tmp_path, records, "--stages", "dedup", "--sentence_min_docs", "10")
    assert len(out) == len(records)
    assert all(boiler not in r["text"] and r["text"].startswith("<|im_start|>") and r["text"].endswith("<|im_end|>")
               for r in out[:12])
    assert out[12]["text"].endswith("好的。")  # short sentences are never cut
    assert out[13]["conversations"][0]["content"] == boiler  # chats keep theirs
    assert report["dedup"]["sentences_removed"] == 12 and report["dedup"]["top_boilerplate"] == [boiler]


# -----------------------------------------------------------------------------------------------------------------
# stage 3: Kneser-Ney LM and quality buckets

def direct_kneser_ney(lm_counts, order, context, token, discounts, vocab_size):
    """Textbook recursive interpolated KN, straight from the counts, to check the stored backoff form."""
    def prob(k, h, w):
        if k == 0:
            return 1.0 / (vocab_size + 1)
        counts = lm_counts[k]
        total = sum(c for g, c in counts.items() if g[:-1] == h)
        if total == 0:
            return prob(k - 1, h[1:], w)
        types = sum(1 for g in counts if g[:-1] == h)
        d = discounts[k]
        return max(counts.get(h + w, 0) - d, 0) / total + d * types / total * prob(k - 1, h[1:], w)
    return prob(order, context, token)


def test_kneser_ney_matches_the_recursive_formula_and_normalizes():
    corpus = ["abracadabra", "abba", "cabbage", "bad cab"]
    lm = KneserNeyLM(order=3).fit(corpus)
    counts = {3: Counter()}
    for seq in corpus:
        padded = lm.pad(seq)
        for i in range(2, len(padded)):
            counts[3][padded[i - 2:i + 1]] += 1
    counts[2] = Counter(g[1:] for g in counts[3])
    counts[1] = Counter(g[1:] for g in counts[2])
    discounts = {}
    for k in (1, 2, 3):
        n1 = sum(c == 1 for c in counts[k].values())
        n2 = sum(c == 2 for c in counts[k].values())
        discounts[k] = min(max(n1 / (n1 + 2 * n2), 0.1), 0.9) if n1 and n2 else 0.5
    vocab = sorted({c for seq in corpus for c in seq} | {lm.eos})
    for context in ("ab", "ca", "zz", "\x02\x02", "b "):
        total = 0.0
        for w in vocab + ["#"]:  # '#' is unknown
            p = 10 ** lm.log10_prob(context, w)
            if w != "#":
                assert p == pytest.approx(direct_kneser_ney(counts, 3, context, w, discounts, len(vocab)), rel=1e-9)
            total += p
        assert total == pytest.approx(1.0, abs=1e-9)  # unknown token included: mass sums to one


def test_word_level_lm():
    cfg = cd.make_config(lm_unit="word", lm_order=3)
    lm, _ = train_reference_lm(EN, cfg)
    assert document_perplexity({"text": EN[0]}, lm, cfg) < document_perplexity(
        {"text": " ".join(reversed(EN[0].split()))}, lm, cfg)


def test_corrupted_documents_score_clearly_worse():
    bench = load_bench()
    rng = random.Random(0)
    for docs in (ZH, EN):
        for i in range(0, len(docs), 3):
            lm, _ = train_reference_lm(docs[:i] + docs[i + 1:], CFG)  # held out: the scored document
            clean = document_perplexity({"text": docs[i]}, lm, CFG)
            for kind in ("symbol_noise", "shuffled_chars"):
                corrupted = document_perplexity({"text": bench.corrupt(docs[i], kind, rng)}, lm, CFG)
                assert corrupted > 1.3 * clean, (kind, docs[i][:20], clean, corrupted)
            # a repeated natural span is fluent text to any n-gram LM; stage 1's repetition rules drop it instead
            for kind in ("repeated_span", "repeated_sentence"):
                assert reason_of(bench.corrupt(docs[i], kind, rng)) is not None


def test_quality_buckets_and_keep_buckets(tmp_path):
    reference = str(tmp_path / "reference.jsonl")
    write_jsonl(reference, [{"text": t} for t in ZH[:12] + EN[:8]])
    records = [{"text": t} for t in ZH[12:] + EN[8:]]
    out, report = run(tmp_path, records, "--stages", "quality", "--reference", reference)
    assert len(out) == len(records)
    buckets = Counter(r["quality_bucket"] for r in out)
    assert set(buckets) == {"head", "middle", "tail"} and buckets["tail"] >= buckets["head"]
    low, high = report["quality"]["cutoffs"]
    assert all((r["perplexity"] < low) == (r["quality_bucket"] == "head") for r in out)
    out, report = run(tmp_path, records, "--stages", "quality", "--reference", reference,
                      "--keep_buckets", "head,middle")
    assert {r["quality_bucket"] for r in out} == {"head", "middle"}
    assert report["docs_written"] + dict(((d["stage"], d["reason"]), d["docs"]) for d in report["drops"])[
        ("quality", "quality_tail")] == len(records)


def test_missing_reference_falls_back_to_the_input(tmp_path, capsys):
    out, report = run(tmp_path, [{"text": t} for t in ZH], "--stages", "quality",
                      "--reference", str(tmp_path / "missing.jsonl"))
    assert len(out) == len(ZH) and "fallback" in report["quality"]["reference"]


# -----------------------------------------------------------------------------------------------------------------
# pipeline guarantees: bad lines, atomic output, report, stage subsets

def test_malformed_lines_are_reported_with_line_numbers(tmp_path):
    lines = [json.dumps({"text": ZH[0]}, ensure_ascii=False), '{"text": broken', "", "[1, 2]",
             json.dumps({"conversations": "not a list"}), json.dumps({"title": "no text"}),
             json.dumps({"text": ZH[1]}, ensure_ascii=False)]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with open(src, "ab") as f:
        f.write(b'{"text": "\xff\xfe"}\n' + json.dumps({"text": ZH[2]}, ensure_ascii=False).encode() + b"\n")
    out = str(tmp_path / "out.jsonl")
    report = cd.run_pipeline(cd.make_config(["--input", str(src), "--output", out, "--quiet",
                                             "--stages", "filter,dedup"]))
    assert len(read_jsonl(out)) == 3
    bad = {(m["line"], m["reason"]) for m in report["malformed_lines"]["first"]}
    assert bad == {(2, "malformed_json"), (4, "bad_schema"), (5, "bad_schema"), (6, "bad_schema"),
                   (8, "invalid_utf8")}
    assert report["malformed_lines"]["count"] == 5
    with open(out + ".report.json", encoding="utf-8") as f:
        assert json.load(f)["docs_written"] == 3
    import pandas as pd
    table = pd.read_csv(out + ".report.csv")
    assert {"stage", "reason", "docs", "share_of_input"} <= set(table.columns)
    assert int(table[(table.stage == "output")].docs.iloc[0]) == 3


def test_interrupted_run_leaves_no_partial_output(tmp_path, monkeypatch):
    src, out = str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl")
    write_jsonl(src, [{"text": t} for t in ZH])
    with open(out, "w") as f:
        f.write("previous run\n")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cd, "run_quality", crash)
    with pytest.raises(KeyboardInterrupt):
        cd.run_pipeline(cd.make_config(["--input", src, "--output", out, "--quiet"]))
    with open(out) as f:
        assert f.read() == "previous run\n"
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out.jsonl"]  # no temp file, no work folder


def test_a_bom_before_the_first_line_is_kept_as_the_trainers_keep_it(tmp_path):
    src, out = tmp_path / "in.jsonl", str(tmp_path / "out.jsonl")
    src.write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in ZH[:3])
                    .encode() + b"\n")
    report = cd.run_pipeline(cd.make_config(["--input", str(src), "--output", out, "--quiet", "--stages", "filter"]))
    assert report["malformed_lines"]["count"] == 0 and [r["text"] for r in read_jsonl(out)] == ZH[:3]


def test_cleaning_keeps_exactly_the_chats_the_trainers_accept(tmp_path, tokenizer):
    """One set of checks (model/data/schema.py): a chat clean_data keeps is one SFT trains on, and the other way
    round. Each line below carries its index "i"; both sides must keep the same ones."""
    from model.data.chat import SFTDataset

    def chat(i, *messages, **fields):
        return {"conversations": [{"role": "user", "content": f"问题 {i}：{ZH[i][:30]}"}, *messages], "i": i, **fields}
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 2}}}
    lines = [
        chat(0, {"role": "assistant", "content": ZH[0][:40]}),
        chat(1, {"role": "human", "content": ZH[1][:40]}, {"role": "assistant", "content": "好"}),  # unknown role
        chat(2, {"role": "assistant"}),  # no content
        chat(3, {"role": "assistant", "content": None, "tool_calls": [call]}),  # a tool call: no content needed
        chat(4, {"role": "assistant", "content": "", "tool_calls": json.dumps([call])}),  # tool calls as a string
        chat(5, {"role": "assistant", "content": ZH[5][:40], "reasoning_content": 5}),
        chat(6, {"role": "user", "content": None}, {"role": "assistant", "content": "好"}),
        chat(7, {"role": "assistant", "content": ZH[7][:40]}),
    ]
    src, out = tmp_path / "in.jsonl", str(tmp_path / "out.jsonl")
    write_jsonl(src, lines)
    with open(src, "ab") as f:  # a lone surrogate: JSON, but no tokenizer or UTF-8 writer takes it
        f.write(json.dumps(chat(8, {"role": "assistant", "content": "\ud800"})).encode() + b"\n")
    cd.run_pipeline(cd.make_config(["--input", str(src), "--output", out, "--quiet", "--stages", ""]))
    cleaned = {r["i"] for r in read_jsonl(out)}
    trained = SFTDataset(str(src), tokenizer, 1024, skip_bad_lines=True, show_progress=False,
                         cache_dir=str(tmp_path / "cache"))
    assert cleaned == {int(n) - 1 for n in trained.line_numbers} == {0, 3, 7}


def test_an_input_with_no_valid_line_is_an_error_and_leaves_nothing(tmp_path):
    out = str(tmp_path / "out.jsonl")
    for content, message in [(b"", "no lines to clean"), (b"\n \n", "no lines to clean"),
                             (bytes(range(11, 256)) * 4 + b"\n\x00\xff\n", "all 2 lines of the input are malformed")]:
        (tmp_path / "in.jsonl").write_bytes(content)
        with pytest.raises(SystemExit, match=f"error: .*in.jsonl.*{message}"):
            cd.main(["--input", str(tmp_path / "in.jsonl"), "--output", out, "--quiet"])
        assert os.listdir(tmp_path) == ["in.jsonl"]
    with pytest.raises(SystemExit, match="error: input not found"):
        cd.main(["--input", str(tmp_path / "nope.jsonl"), "--output", out])


def start_stalled_run(tmp_path):
    """clean_data in a subprocess, stopped inside its quality stage (the work folder holds partial data by then);
    returns the process once it is there."""
    import subprocess
    import sys
    import time
    from tests import ROOT
    src, flag = tmp_path / "in.jsonl", tmp_path.parent / f"{tmp_path.name}.stalled"
    write_jsonl(src, [{"text": t} for t in ZH])
    code = (f"import time, clean_data\n"
            f"def stall(*args, **kwargs):\n    open({str(flag)!r}, 'w').close()\n    time.sleep(120)\n"
            f"clean_data.run_quality = stall\n"
            f"clean_data.main(['--input', {str(src)!r}, '--output', {str(tmp_path / 'out.jsonl')!r}, '--quiet'])\n")
    process = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not flag.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert flag.exists(), process.communicate()[1]
    assert [name for name in os.listdir(tmp_path) if name.startswith("clean_data_")]  # the work folder
    return process


def test_sigterm_removes_the_work_folder_and_the_partial_output(tmp_path):
    import signal
    process = start_stalled_run(tmp_path)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM and "stopped by SIGTERM" in stderr
    assert os.listdir(tmp_path) == ["in.jsonl"]


def test_the_next_run_removes_the_work_folder_of_a_killed_run(tmp_path, capsys):
    import signal
    process = start_stalled_run(tmp_path)
    process.send_signal(signal.SIGKILL)  # nothing runs: the folder stays behind
    process.communicate(timeout=60)
    killed = [name for name in os.listdir(tmp_path) if name.startswith("clean_data_")]
    assert len(killed) == 1
    # a live run's folder and a folder without an owner file are not this run's to remove
    (tmp_path / "clean_data_live").mkdir()
    (tmp_path / "clean_data_live" / "owner").write_text(f"{socket.gethostname()} {os.getpid()}\n")
    (tmp_path / "clean_data_unknown").mkdir()
    cd.run_pipeline(cd.make_config(["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"),
                                    "--quiet", "--stages", "filter"]))
    assert f"removed {tmp_path / killed[0]}: the work folder of a clean_data run (process {process.pid}) that " \
           "was killed" in capsys.readouterr().err
    assert sorted(name for name in os.listdir(tmp_path) if name.startswith("clean_data_")) == \
        ["clean_data_live", "clean_data_unknown"]


def test_stage_subsets(tmp_path):
    records = [{"text": t} for t in ZH[:5]] + [{"text": ZH[0]}, {"text": "太短"}]
    out, report = run(tmp_path, records, "--stages", "filter")
    assert len(out) == 6 and "dedup" not in report and "perplexity" not in out[0]
    out, report = run(tmp_path, records, "--stages", "dedup")
    assert len(out) == 6 and "太短" in [r["text"] for r in out]
    out, _ = run(tmp_path, records, "--stages", "filter,dedup,quality", "--reference", "none")
    assert len(out) == 5 and all("quality_bucket" in r for r in out)


def test_main_runs_from_the_command_line(tmp_path, capsys):
    src, out = str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl")
    write_jsonl(src, [{"text": t} for t in ZH[:6]])
    cd.main(["--input", src, "--output", out, "--reference", src])
    printed = capsys.readouterr().out
    assert "written" in printed and "lines read" in printed and os.path.exists(out + ".report.csv")
