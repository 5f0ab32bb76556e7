"""
Benchmarks for clean_data.py on generated documents (no data set needed).

    python -m scripts.bench.bench_clean_data dedup                 # planted near-duplicates: recall, false positives
    python -m scripts.bench.bench_clean_data speed --docs 100000   # docs/s per stage, peak memory, 1 and 2 workers
    python -m scripts.bench.bench_clean_data quality               # perplexity of clean vs corrupted held-out text
    python -m scripts.bench.bench_clean_data all
    python -m scripts.bench.bench_clean_data generate --docs 1400000 --output /tmp/big.jsonl    # ~1 GB for a scale run

dedup    Unrelated documents (Chinese from jieba's word frequencies, English from a made-up Zipfian vocabulary) mixed
         with planted near-duplicates of some of them: 5% or 10% of words edited, sentences shuffled, boilerplate
         sentences added, or all three. Reports, per language and perturbation, the exact Jaccard of the planted
         pairs' shingle sets, the recall (planted copy removed, its original kept), and the false-positive rate
         (unrelated documents removed, and unrelated pairs put in one cluster), for --thresholds, with 1 and 2
         workers, which must give identical outputs. Then the near duplicates each threshold removes from the
         real dataset/demo_pretrain.jsonl (almost no true near duplicates there), with and without the check of
         LSH candidates against the estimated Jaccard (--verify_threshold).
speed    Runs `python clean_data.py` as a subprocess per worker count on --docs generated documents (a 70/30 mix of
         Chinese and English of MiniMind's typical length, 2% exact and 3% near duplicates) and reads docs/s per
         pass, CPU time per stage and peak RSS from its report; projects the time for MiniMind's 1.6 GB
         pretrain_hq.jsonl from bytes per wall-second and per CPU-second (the latter holds on a shared machine).
quality  Trains the stage-3 LM on clean text (dataset/demo_pretrain.jsonl if present, else the test fixtures),
         scores held-out documents and the same documents corrupted with symbol noise, shuffled characters and
         repetition; reports median perplexity, the per-document ratio corrupted/clean and the ROC AUC.
"""

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

import clean_data as cd  # the command line (: make_config, run_pipeline)
from model.data.cleaning.dedup import lsh_params, shingles, split_sentences
from model.data.cleaning.ngram_lm import document_perplexity, train_reference_lm
from model.data.cleaning.rules import filter_record
from model.data.cleaning.text import CJK_RE, detect_language, normalize_text

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

FIXTURES = os.path.join(ROOT, "tests", "tools", "fixtures", "clean")
BOILERPLATE_ZH = ["本文内容仅供参考，如需转载请联系作者获得授权。",
                  "欢迎关注我们的频道，获取更多精彩内容和最新资讯。",
                  "以上就是今天分享的全部内容，感谢您的耐心阅读。"]
BOILERPLATE_EN = ["Thank you for reading this article, please share it with your friends.",
                  "Subscribe to our newsletter to receive the latest updates every week.",
                  "The views expressed here are those of the author and not of the publisher."]
MINIMIND_BYTES = 1.6e9  # MiniMind's pretrain_hq.jsonl


# -----------------------------------------------------------------------------------------------------------------
# document generators

class Vocabulary:
    """Words with Zipf-like frequencies: Chinese from jieba's dictionary counts, English made up from syllables."""

    def __init__(self, lang: str, rng: random.Random, size: int = 20000):
        self.lang = lang
        if lang == "zh":
            import jieba
            path = os.path.join(os.path.dirname(jieba.__file__), "dict.txt")
            entries = []
            with open(path, encoding="utf-8") as f:
                for line in f:
                    word, freq = line.split()[:2]
                    if CJK_RE.fullmatch(word[0]) and len(word) <= 4:
                        entries.append((int(freq), word))
            entries.sort(reverse=True)
            entries = entries[:size]
            self.words = [w for _, w in entries]
            weights = np.array([f for f, _ in entries], dtype=np.float64)
        else:
            syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou", "ee")]
            words = set()
            while len(words) < size:
                words.add("".join(rng.choice(syllables) for _ in range(rng.choice((1, 2, 2, 3)))))
            self.words = ["the", "of", "and", "to", "a", "in", "is", "that", "with", "for"] + sorted(words)
            weights = 1.0 / np.arange(1, len(self.words) + 1) ** 1.05
        self.cum = np.cumsum(weights / weights.sum())

    def sample(self, rng: random.Random, n: int) -> list:
        idx = np.searchsorted(self.cum, [rng.random() for _ in range(n)])
        return [self.words[min(i, len(self.words) - 1)] for i in idx]


def make_sentence(vocab: Vocabulary, rng: random.Random) -> list:
    return vocab.sample(rng, rng.randint(8, 18))


def render(sentences: list, lang: str) -> str:
    if lang == "zh":
        return "".join("".join(s) + "。" for s in sentences)
    return " ".join(" ".join(s).capitalize() + "." for s in sentences)


def make_doc(vocab, rng, n_sentences=None) -> list:
    """A document as a list of sentences (lists of words)."""
    return [make_sentence(vocab, rng) for _ in range(n_sentences or rng.randint(10, 16))]


def edit_words(doc: list, rate: float, vocab, rng) -> list:
    """Substitute, delete or insert words at the given rate (a share of the document's words)."""
    out = [list(s) for s in doc]
    n_words = sum(len(s) for s in out)
    for _ in range(max(1, round(rate * n_words))):
        s = rng.choice([s for s in out if len(s) > 2])
        i, op = rng.randrange(len(s)), rng.random()
        if op < 0.6:
            s[i] = vocab.sample(rng, 1)[0]
        elif op < 0.8:
            del s[i]
        else:
            s.insert(i, vocab.sample(rng, 1)[0])
    return out


def perturb(doc: list, kind: str, vocab, lang, rng) -> str:
    if kind == "edit5":
        return render(edit_words(doc, 0.05, vocab, rng), lang)
    if kind == "edit10":
        return render(edit_words(doc, 0.10, vocab, rng), lang)
    if kind == "shuffle":
        doc = list(doc)
        rng.shuffle(doc)
        return render(doc, lang)
    boiler = BOILERPLATE_ZH if lang == "zh" else BOILERPLATE_EN
    joiner = "" if lang == "zh" else " "
    if kind == "boilerplate":
        return joiner.join([rng.choice(boiler), render(doc, lang), rng.choice(boiler)])
    if kind == "all":
        doc = edit_words(doc, 0.05, vocab, rng)
        rng.shuffle(doc)
        return joiner.join([render(doc, lang), rng.choice(boiler)])
    raise ValueError(kind)


PERTURBATIONS = ("edit5", "edit10", "shuffle", "boilerplate", "all")


def make_dedup_corpus(lang: str, n_unrelated: int, n_planted_per_kind: int, seed: int) -> list:
    """Records with bench fields: bench_id, bench_group (original's id for planted copies), bench_kind."""
    rng = random.Random(seed)
    vocab = Vocabulary(lang, rng)
    records, bases = [], []
    for i in range(n_unrelated):
        doc = make_doc(vocab, rng)
        bases.append(doc)
        records.append(dict(text=render(doc, lang), bench_id=i, bench_group=i, bench_kind="original"))
    for kind in PERTURBATIONS:
        for j in rng.sample(range(n_unrelated), n_planted_per_kind):
            records.append(dict(text=perturb(bases[j], kind, vocab, lang, rng), bench_id=len(records),
                                bench_group=j, bench_kind=kind))
    # planted copies after all originals, so the cluster keeps the original (lowest id) and drops the copy
    return records


# -----------------------------------------------------------------------------------------------------------------
# dedup benchmark

def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def run_clean(input_path, output_path, workers, extra=()):
    argv = ["--input", input_path, "--output", output_path, "--num_workers", str(workers), "--quiet"] + list(extra)
    cfg = cd.make_config(argv)
    report = cd.run_pipeline(cfg)
    with open(output_path, encoding="utf-8") as f:
        return [json.loads(line) for line in f], report


def exact_jaccard(a: str, b: str, cfg) -> float:
    sa, sb = shingles(a, cfg), shingles(b, cfg)
    return len(sa & sb) / max(len(sa | sb), 1)


def dedup_scores(records, kept_ids, cluster_of=None):
    kept = set(kept_ids)
    out = {}
    for kind in PERTURBATIONS:
        planted = [r for r in records if r["bench_kind"] == kind]
        hits = sum(r["bench_id"] not in kept and r["bench_group"] in kept for r in planted)
        out[kind] = hits / max(len(planted), 1)
    originals = [r for r in records if r["bench_kind"] == "original"]
    # an original that has planted copies is expected to be kept; any removed original is a false positive
    out["fp_docs"] = sum(r["bench_id"] not in kept for r in originals) / len(originals)
    return out


def bench_dedup(args):
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for lang in ("zh", "en"):
            records = make_dedup_corpus(lang, args.unrelated, args.planted, seed=1 if lang == "zh" else 2)
            path = os.path.join(tmp, f"{lang}.jsonl")
            write_jsonl(path, records)
            cfg = cd.make_config()
            by_id = {r["bench_id"]: r for r in records}
            jac = {k: [] for k in PERTURBATIONS}
            for r in records:
                if r["bench_kind"] != "original":
                    jac[r["bench_kind"]].append(exact_jaccard(r["text"], by_id[r["bench_group"]]["text"], cfg))
            # unrelated pairs: the highest exact Jaccard among a sample of them
            rng = random.Random(0)
            originals = [r for r in records if r["bench_kind"] == "original"]
            sample = [exact_jaccard(*(x["text"] for x in rng.sample(originals, 2)), cfg) for _ in range(2000)]
            print(f"[{lang}] exact shingle Jaccard of planted pairs (median, min): "
                  + ", ".join(f"{k} {np.median(v):.2f}/{np.min(v):.2f}" for k, v in jac.items())
                  + f"; unrelated pairs max {max(sample):.3f}")
            for t in args.thresholds:
                outputs = {}
                for workers in (1, 2):
                    start = time.time()
                    out, report = run_clean(path, os.path.join(tmp, f"out-{lang}-{t}-{workers}.jsonl"), workers,
                                            ["--stages", "dedup", "--minhash_threshold", str(t),
                                             "--sentence_min_docs", "0"])
                    outputs[workers] = out
                    seconds = time.time() - start
                kept = [r["bench_id"] for r in outputs[1]]
                same = outputs[1] == outputs[2]
                scores = dedup_scores(records, kept)
                b, r = lsh_params(t, 128)
                pair_fp = unrelated_pair_fp(records, kept)
                row = dict(lang=lang, threshold=t, bands=b, rows=r, docs=len(records), **scores,
                           fp_pairs=pair_fp, same_1_vs_2_workers=same, seconds_2_workers=round(seconds, 1))
                rows.append(row)
                print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}))
        rows += bench_dedup_real(args, tmp)
    return rows


def bench_dedup_real(args, tmp):
    """Near duplicates removed from the real demo corpus (poems, classics, Shakespeare scenes; it has almost no true
    near duplicates, so removals there are mostly false positives), with and without the candidate check."""
    path = os.path.join(ROOT, "dataset", "demo_pretrain.jsonl")
    if not os.path.exists(path):
        print(f"{path} not found: no real-corpus check")
        return []
    rows = []
    for t in args.thresholds:
        for verify in (str(t), "0"):
            _, report = run_clean(path, os.path.join(tmp, "real.jsonl"), 2,
                                  ["--stages", "dedup", "--minhash_threshold", str(t), "--verify_threshold", verify,
                                   "--sentence_min_docs", "0"])
            d = report["dedup"]
            row = dict(set="demo_pretrain", threshold=t, verify_threshold=float(verify), docs=report["docs_read"],
                       exact=d["exact_duplicates"], near=d["near_duplicates"], candidates=d["lsh_candidate_edges"],
                       verified=d["verified_edges"])
            rows.append(row)
            print(json.dumps(row))
    return rows


def unrelated_pair_fp(records, kept_ids):
    """Unrelated pairs merged into one cluster / all unrelated pairs. Removed originals are the only way an
    unrelated pair can merge here (each removed document joins one other cluster): count one pair per removal."""
    kept = set(kept_ids)
    originals = [r for r in records if r["bench_kind"] == "original"]
    n = len(originals)
    merged = sum(r["bench_id"] not in kept for r in originals)
    return merged / (n * (n - 1) / 2)


# -----------------------------------------------------------------------------------------------------------------
# speed benchmark

def make_speed_corpus(path: str, n_docs: int, seed: int = 0):
    """MiniMind-like mix: 70% Chinese (~350 characters), 30% English (~150 words); 2% exact, 3% near copies."""
    rng = random.Random(seed)
    vocabs = {"zh": Vocabulary("zh", rng), "en": Vocabulary("en", rng)}
    recent = []
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n_docs):
            lang = "zh" if rng.random() < 0.7 else "en"
            roll = rng.random()
            if recent and roll < 0.02:
                text = rng.choice(recent)[1]
            elif recent and roll < 0.05:
                lang_, doc = rng.choice(recent)[0], rng.choice(recent)[2]
                text = perturb(doc, "edit5", vocabs[lang_], lang_, rng) if lang_ == lang else render(doc, lang_)
            else:
                doc = make_doc(vocabs[lang], rng, rng.randint(8, 14))
                text = render(doc, lang)
                if len(recent) < 5000:
                    recent.append((lang, text, doc))
                else:
                    recent[rng.randrange(5000)] = (lang, text, doc)
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")


def bench_speed(args):
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "speed.jsonl")
        start = time.time()
        make_speed_corpus(path, args.docs)
        size = os.path.getsize(path)
        print(f"generated {args.docs} documents, {size / 1e6:.1f} MB in {time.time() - start:.0f} s")
        reference = os.path.join(tmp, "reference.jsonl")
        with open(reference, "w", encoding="utf-8") as f:
            for name in ("clean_zh.txt", "clean_en.txt"):
                with open(os.path.join(FIXTURES, name), encoding="utf-8") as src:
                    for line in src:
                        f.write(json.dumps({"text": line.strip()}, ensure_ascii=False) + "\n")
        for workers in args.workers:
            out = os.path.join(tmp, f"out-{workers}.jsonl")
            cmd = [sys.executable, os.path.join(ROOT, "clean_data.py"), "--input", path, "--output", out,
                   "--num_workers", str(workers), "--quiet", "--reference", reference]
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.time()
            subprocess.run(cmd, check=True)
            wall = time.time() - start
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            # CPU of clean_data.py and its workers: unlike wall time, not inflated by other jobs on a shared machine
            cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            with open(out + ".report.json", encoding="utf-8") as f:
                report = json.load(f)
            print(f"\nworkers={workers}: wall {wall:.1f} s, CPU {cpu:.1f} s, {report['docs_read']} -> "
                  f"{report['docs_written']} docs, peak RSS parent {report['peak_rss']['parent_mb']} MB, "
                  f"largest worker {report['peak_rss']['largest_worker_mb']} MB")
            for p in report["passes"]:
                print(f"  pass  {p['stage']:<22} {p['docs_per_s']:>9.1f} docs/s {p['mb_per_s']:>7.2f} MB/s "
                      f"{p['seconds']:>8.1f} s wall")
            for c in report["cpu_per_stage"]:
                print(f"  stage {c['stage']:<22} {c['docs_per_cpu_s']:>9.1f} docs per CPU-second "
                      f"({c['cpu_seconds']:.1f} CPU-s)")
            wall_h = MINIMIND_BYTES / (size / wall) / 3600
            cpu_h = MINIMIND_BYTES / size * cpu / 3600
            print(f"  projection for a 1.6 GB file: {wall_h:.2f} h at this run's wall-clock rate; {cpu_h:.2f} CPU-hours"
                  f" in all, so about {cpu_h / workers:.2f} h on {workers} free core(s)")
            rows.append(dict(workers=workers, wall_s=round(wall, 1), cpu_s=round(cpu, 1), mb=round(size / 1e6, 1),
                             projection_wall_h=round(wall_h, 2), projection_cpu_h=round(cpu_h, 2),
                             **report["peak_rss"], passes=report["passes"], cpu_per_stage=report["cpu_per_stage"],
                             docs_written=report["docs_written"]))
            if len(rows) == 2:
                with open(os.path.join(tmp, f"out-{args.workers[0]}.jsonl"), "rb") as a, open(out, "rb") as b:
                    print(f"  outputs of {args.workers[0]} and {workers} workers identical: {a.read() == b.read()}")
    return rows


# -----------------------------------------------------------------------------------------------------------------
# quality benchmark

def corrupt(text: str, kind: str, rng: random.Random) -> str:
    if kind == "symbol_noise":  # a symbol after 20% of the characters
        symbols = "#$%&*@^~|<>{}[]=+_/\\"
        return "".join(c + (rng.choice(symbols) if rng.random() < 0.2 else "") for c in text)
    if kind == "shuffled_chars":
        chars = list(text)
        rng.shuffle(chars)
        return "".join(chars)
    if kind == "repeated_span":  # degenerate generation: the second half is a short span over and over
        i = rng.randrange(max(1, len(text) - 10))
        span = text[i:i + rng.randint(2, 8)]
        return text[:len(text) // 2] + span * (len(text) // 2 // max(len(span), 1))
    if kind == "repeated_sentence":
        return split_sentences(text)[0].strip() * 8
    raise ValueError(kind)


CORRUPTIONS = ("symbol_noise", "shuffled_chars", "repeated_span", "repeated_sentence")


def roc_auc(negatives, positives) -> float:
    """P(a corrupted document scores worse than a clean one); 1.0 = perfect separation."""
    neg, pos = np.asarray(negatives), np.asarray(positives)
    return float(((pos[:, None] > neg[None, :]).mean() + (pos[:, None] == neg[None, :]).mean() / 2))


def quality_sets(max_docs: int = 400):
    """(name, train texts, held-out texts) per language."""
    demo = os.path.join(ROOT, "dataset", "demo_pretrain.jsonl")
    sets = []
    if os.path.exists(demo):
        with open(demo, encoding="utf-8") as f:
            texts = [json.loads(line)["text"] for line in f if line.strip()]
        for lang in ("zh", "en"):
            docs = [t for t in texts if detect_language(t) == lang and len(t) > 100]
            held = docs[::20][:max_docs]
            train = [t for i, t in enumerate(docs) if i % 20]
            sets.append((f"demo_pretrain {lang}", train, held))
    for lang in ("zh", "en"):
        with open(os.path.join(FIXTURES, f"clean_{lang}.txt"), encoding="utf-8") as f:
            docs = [line.strip() for line in f if line.strip()]
        sets.append((f"fixtures {lang} (leave-one-out)", docs, None))
    return sets


def bench_quality(args):
    cfg = cd.make_config()
    rng = random.Random(0)
    rows = []
    for name, train, held in quality_sets():
        if held is None:  # tiny fixture sets: train on all but one document, score that one
            scored = []
            for i, text in enumerate(train):
                lm, _ = train_reference_lm(train[:i] + train[i + 1:], cfg)
                scored.append((text, lm))
        else:
            lm, _ = train_reference_lm((normalize_text(t, cfg) for t in train[:20000]), cfg)
            scored = [(t, lm) for t in held]
        clean = [document_perplexity({"text": t}, lm_, cfg) for t, lm_ in scored]
        line = f"{name}: {len(scored)} held-out docs, clean median perplexity {np.median(clean):.1f}"
        row = dict(set=name, docs=len(scored), clean_median=round(float(np.median(clean)), 1))
        for kind in CORRUPTIONS:
            bad = [document_perplexity({"text": corrupt(t, kind, rng)}, lm_, cfg) for t, lm_ in scored]
            ratio = np.array(bad) / np.array(clean)
            auc = roc_auc(clean, bad)
            stage1 = np.mean([filter_record({"text": corrupt(t, kind, rng)}, cfg)[0] is None for t, _ in scored])
            row[kind] = dict(median=round(float(np.median(bad)), 1), ratio_median=round(float(np.median(ratio)), 2),
                             ratio_min=round(float(ratio.min()), 2), auc=round(auc, 3),
                             stage1_drop_rate=round(float(stage1), 3))
            line += (f"\n  {kind:<18} median {np.median(bad):8.1f}  ratio to clean: median {np.median(ratio):5.2f}"
                     f" min {ratio.min():5.2f}  AUC {auc:.3f}  dropped by stage 1: {stage1:.0%}")
        print(line)
        rows.append(row)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("what", choices=("dedup", "speed", "quality", "all", "generate"),
                   help="which benchmark; generate: only write the speed corpus (--docs of it) to --output, for a "
                        "scale run of clean_data.py by hand")
    p.add_argument("--unrelated", type=int, default=2000, help="dedup: unrelated documents per language")
    p.add_argument("--planted", type=int, default=200, help="dedup: planted copies per perturbation and language")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.8, 0.5, 0.4], help="dedup: --minhash_threshold")
    p.add_argument("--docs", type=int, default=100_000, help="speed: generated documents")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="speed: worker counts")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--output", default=None, help="generate: where the corpus goes")
    args = p.parse_args()
    if args.what == "generate":
        if not args.output:
            p.error("generate needs --output")
        make_speed_corpus(args.output, args.docs)
        print(f"{args.docs:,} documents, {os.path.getsize(args.output) / 1e9:.2f} GB -> {args.output}")
        return
    results = {}
    if args.what in ("dedup", "all"):
        results["dedup"] = bench_dedup(args)
    if args.what in ("quality", "all"):
        results["quality"] = bench_quality(args)
    if args.what in ("speed", "all"):
        results["speed"] = bench_speed(args)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, ensure_ascii=False, indent=1)


if __name__ == "__main__":
    main()
