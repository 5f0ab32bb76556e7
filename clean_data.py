"""
Clean a MiniMind-style jsonl corpus: heuristic filters, deduplication, n-gram quality scoring.

    python clean_data.py --input dataset/pretrain_hq.jsonl --output dataset/pretrain_clean.jsonl --num_workers 2
    python clean_data.py --input a.jsonl b.jsonl --output clean.jsonl --stages filter,dedup
    python clean_data.py --input dataset/sft_mini_512.jsonl --output sft_clean.jsonl --stages filter,dedup

Input, one JSON object per line, the format detected per line:
    pretrain       {"text": "..."}                                            (field name: --text_field)
    conversation   {"conversations": [{"role": "user", "content": "..."}, ...]}
Each turn of a conversation is normalized on its own; rules, hashes and the language model see the turns joined by
newlines, and a conversation is kept or dropped as a unit. Other fields of a record pass through unchanged.
Malformed lines (bad JSON, bad UTF-8, wrong schema) are skipped, counted and reported with file and line number;
the checks are the trainers' own (model/data/schema.py), so what is kept can be trained on. An input with no valid
line at all stops the run with one line `error: ...`.
The output is written to a temporary name and renamed at the very end, so an interrupted run never leaves a half
file under the final name. The report (documents in/out, drops by stage and reason) is printed and saved as
<output>.report.csv and <output>.report.json.

Stages (always run in this order; --stages picks a subset)
  filter   Normalization: NFKC (keeping the full-width punctuation Chinese text uses), optional traditional ->
           simplified (--t2s, needs the optional `opencc` package), control and zero-width characters removed,
           whitespace tidied. Then rules, each a small function `rule_*(doc, cfg) -> reason code or None` with its
           own threshold flag (0 or a negative value switches it off; see RULES and REASONS below): length, broken
           encoding, symbol share, CJK share, bad-word and boilerplate phrase lists, repeated character n-grams, and
           the Gopher repetition and quality rules as datatrove implements them. Chinese documents get the
           repetition rules on jieba words; the English-only Gopher rules (word count, word length, stop words,
           alphabetic words) are skipped for them.
  dedup    (1) exact: 64-bit hash of the lowercased, whitespace-collapsed text, first occurrence kept.
           (2) near: datasketch MinHash (--num_perm 128) over word n-gram shingles (--shingle_size 3; jieba words
           for Chinese, words for English; shingles never cross a sentence end, so reordered sentences do not count
           as changes), LSH bands (b, r) as datasketch's MinHashLSH chooses them for --minhash_threshold, each
           candidate pair checked against the signatures' estimated Jaccard (--verify_threshold), then union-find
           over the verified pairs; each cluster keeps its lowest document id. Texts with fewer than
           --min_shingles distinct shingles get exact dedup only (one shared line would make them match).
           (3) sentences: sentences of >= --sentence_min_chars found in >= --sentence_min_docs surviving documents
           (boilerplate) are cut out of every document; the documents stay (only dropped if nothing is left).
  quality  An interpolated Kneser-Ney character n-gram LM (own implementation) trained on the first
           --reference_max_chars of --reference (default dataset/demo_pretrain.jsonl; without it, of the input),
           CCNet-style document perplexity, and head/middle/tail buckets at the --bucket_percentiles of the
           corpus' own perplexities, written to each record as "perplexity" and "quality_bucket";
           --keep_buckets decides which buckets are written out (default: all, i.e. label only).

How it maps onto map/reduce (and how this single machine runs it)
  Every stage is a pure function of one document plus, for dedup and quality, a small table computed by a reduce:
    map     filter_record(record, cfg)      -> record or None, reason
    map     dedup_keys(record, cfg)         -> exact key, LSH band keys, MinHash signature, sentence keys
    reduce  exact_duplicates / near_duplicates / boilerplate_sentences over (bucket key, doc id) pairs
    map     apply_dedup(doc_id, record, removed, boilerplate, cfg) -> record or None, reason
    map     document_perplexity(record, lm, cfg) -> float
    reduce  perplexity percentiles -> cutoffs;  map: quality_bucket(perplexity, cutoffs)
  Here the maps run on --num_workers forked processes over chunks of lines, in input order, with a bounded number
  of chunks in flight; the first pass runs filter_record and dedup_keys together, so jieba segments each document
  once for both. The (key, doc id) pairs go to --dedup_shards files on disk, partitioned by key; the reduce
  reads one shard at a time. A document's id is its position in the input (files in the order given, then
  lines), never a worker's, so the same text arriving at two workers lands in the same bucket and is kept once,
  and 1 or N workers give the same output. On a cluster the shards become the shuffle partitions of a
  map/reduce job: mappers emit (key, doc id) pairs, reducers emit duplicate ids / boilerplate keys, and a last
  map filters. Union-find over the pairs of one shard is local; the few edges it yields are merged in one place.

Memory: documents stream through; what grows with the corpus is one byte per document (the removed mask), the
union-find over documents that have near-duplicates, and the boilerplate keys. Everything else is bounded by the
chunk size, one dedup shard, the reference LM (about 400 MB for 1M characters, shared with the forked workers) and
a sample of at most --quantile_sample perplexities.
Disk: up to two intermediate copies of the surviving data plus the dedup pairs (16 bytes per document and band /
sentence) and signatures (4 bytes per permutation and document), in a temporary folder beside the output
(--tmp_dir), removed at the end, on an error and on SIGTERM; the folder of a run killed outright (kill -9) is
removed by the next run.
"""

import argparse
import os
import shutil
import signal
import sys
import threading
import time

from model.data.cleaning.config import STAGES, prepare_config
from model.data.cleaning.dedup import DedupKeyStore
from model.data.cleaning.passes import run_dedup_apply, run_dedup_reduce, run_filter, run_quality
from model.data.cleaning.report import Report, finish_report
from model.data.cleaning.runner import make_work_dir
from model.data.jsonl import BadInput

# -----------------------------------------------------------------------------------------------------------------
# command line

def float_list(text: str) -> tuple:
    return tuple(float(x) for x in text.split(",") if x.strip())


def name_list(text: str) -> tuple:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    io = p.add_argument_group("input / output")
    io.add_argument("--input", nargs="+", required=True, help="jsonl files, pretrain or conversation format")
    io.add_argument("--output", required=True, help="cleaned jsonl (written to a temp name, renamed at the end)")
    io.add_argument("--text_field", default="text", help="field holding the text of pretrain records")
    io.add_argument("--stages", type=name_list, default=STAGES, help="comma list of filter,dedup,quality")
    io.add_argument("--report", default=None, help="report path prefix (default: the output path)")
    io.add_argument("--tmp_dir", default=None, help="folder for intermediate files (default: beside the output)")
    io.add_argument("--max_reported_errors", type=int, default=1000, help="malformed lines listed in the report")
    io.add_argument("--special_tokens", type=name_list, default=("<|im_start|>", "<|im_end|>"),
                    help="tokens kept verbatim and treated as line breaks by the rules, hashes and the LM")
    run = p.add_argument_group("parallelism")
    run.add_argument("--num_workers", type=int, default=1, help="worker processes for the per-document maps")
    run.add_argument("--chunk_size", type=int, default=256, help="lines per task sent to a worker")
    run.add_argument("--max_chunks_in_flight", type=int, default=0, help="queued chunks (0: 4 x num_workers)")
    run.add_argument("--quiet", action="store_true", help="no progress bars and no printed report")

    norm = p.add_argument_group("stage 1: normalization")
    norm.add_argument("--fold_cjk_punct", action="store_true",
                      help="let NFKC turn the full-width ，！？：；（） into ASCII as well")
    norm.add_argument("--t2s", action="store_true", help="traditional -> simplified Chinese (needs opencc)")
    rules = p.add_argument_group("stage 1: rules (0 switches a rule off unless noted)")
    rules.add_argument("--min_chars", type=int, default=20, help="min non-space characters (pretrain text only)")
    rules.add_argument("--max_chars", type=int, default=100_000, help="max non-space characters")
    rules.add_argument("--max_replacement_ratio", type=float, default=0.01, help="max share of U+FFFD characters")
    rules.add_argument("--max_symbol_ratio", type=float, default=0.3,
                       help="max share of non-space characters that are not CJK, letters or digits")
    rules.add_argument("--min_cjk_ratio", type=float, default=0.0,
                       help="min share of CJK characters (e.g. 0.3 for a Chinese-only corpus)")
    rules.add_argument("--bad_words_file", default=None, help="one bad word per line (default: a small list)")
    rules.add_argument("--max_bad_words", type=int, default=2, help="drop above this many hits (negative: off)")
    rules.add_argument("--boilerplate_file", default=None, help="one boilerplate phrase per line")
    rules.add_argument("--max_boilerplate_phrases", type=int, default=0,
                       help="drop above this many boilerplate phrase hits (negative: off)")
    rules.add_argument("--char_ngram_size", type=int, default=10, help="n for the Chinese character repetition rule")
    rules.add_argument("--max_dup_char_ngram_frac", type=float, default=0.2,
                       help="max share of characters in repeated character n-grams (Chinese)")
    rules.add_argument("--max_dup_para_frac", type=float, default=0.3, help="Gopher: duplicated paragraphs")
    rules.add_argument("--max_dup_para_char_frac", type=float, default=0.2, help="Gopher: their characters")
    rules.add_argument("--max_dup_line_frac", type=float, default=0.3, help="Gopher: duplicated lines")
    rules.add_argument("--max_dup_line_char_frac", type=float, default=0.2, help="Gopher: their characters")
    rules.add_argument("--max_top_ngram_frac", type=float_list, default=(0.2, 0.18, 0.16),
                       help="Gopher: top word 2,3,4-gram character share")
    rules.add_argument("--max_dup_ngram_frac", type=float_list, default=(0.15, 0.14, 0.13, 0.12, 0.11, 0.10),
                       help="Gopher: repeated word 5..10-gram character share")
    rules.add_argument("--gopher_min_words", type=int, default=50, help="English pretrain text: min words")
    rules.add_argument("--gopher_max_words", type=int, default=100_000, help="English: max words")
    rules.add_argument("--gopher_min_mean_word_len", type=float, default=3, help="English: min mean word length")
    rules.add_argument("--gopher_max_mean_word_len", type=float, default=10, help="English: max mean word length")
    rules.add_argument("--max_symbol_word_ratio", type=float, default=0.1, help="'#' or ellipses per word")
    rules.add_argument("--max_bullet_lines_frac", type=float, default=0.9, help="lines starting with a bullet")
    rules.add_argument("--max_ellipsis_lines_frac", type=float, default=0.3, help="lines ending with an ellipsis")
    rules.add_argument("--min_alpha_words_frac", type=float, default=0.8, help="English: words with a letter")
    rules.add_argument("--min_stop_words", type=int, default=2, help="English pretrain text: distinct stop words")

    dedup = p.add_argument_group("stage 2: dedup")
    dedup.add_argument("--minhash_threshold", type=float, default=0.4,
                       help="Jaccard threshold the LSH is tuned to (0.4: copies with 10%% of words edited have a "
                            "3-shingle Jaccard of 0.5-0.6; 0.8 misses them, see the README)")
    dedup.add_argument("--num_perm", type=int, default=128, help="MinHash permutations")
    dedup.add_argument("--minhash_seed", type=int, default=1, help="MinHash seed (datasketch's default)")
    dedup.add_argument("--shingle_size", type=int, default=3, help="words per shingle (unigrams merge anything)")
    dedup.add_argument("--min_shingles", type=int, default=10,
                       help="documents with fewer distinct shingles get exact dedup only (one shared line would match)")
    dedup.add_argument("--verify_threshold", type=float, default=None,
                       help="keep an LSH candidate pair only if its estimated Jaccard is at least this "
                            "(default: --minhash_threshold; 0: off, as in datatrove)")
    dedup.add_argument("--no_near_dedup", dest="near_dedup", action="store_false", help="exact dedup only")
    dedup.add_argument("--sentence_min_docs", type=int, default=10,
                       help="a sentence in this many documents is boilerplate and cut out (0: off)")
    dedup.add_argument("--sentence_min_chars", type=int, default=12, help="shorter sentences are never cut")
    dedup.add_argument("--dedup_shards", type=int, default=16, help="shard files for the (key, doc id) pairs")

    quality = p.add_argument_group("stage 3: quality")
    quality.add_argument("--reference", default="dataset/demo_pretrain.jsonl", help="jsonl of good text for the LM")
    quality.add_argument("--reference_max_chars", type=int, default=1_000_000, help="reference text used")
    quality.add_argument("--lm_order", type=int, default=4, help="n-gram order")
    quality.add_argument("--lm_unit", choices=("char", "word"), default="char", help="LM tokens")
    quality.add_argument("--bucket_percentiles", type=float_list, default=(30.0, 60.0),
                         help="perplexity percentiles splitting head / middle / tail (CCNet)")
    quality.add_argument("--keep_buckets", type=name_list, default=("head", "middle", "tail"),
                         help="buckets written out, e.g. head,middle to drop the worst 40 percent")
    quality.add_argument("--quantile_sample", type=int, default=1_000_000, help="perplexities used for cutoffs")
    return p


def make_config(argv=None, **overrides):
    """Parse flags (tests: make_config(min_chars=5)) and prepare the derived fields."""
    argv = list(argv or [])
    if "--input" not in argv:
        argv += ["--input", "-"]
    if "--output" not in argv:
        argv += ["--output", "-"]
    cfg = build_parser().parse_args(argv)
    for key, value in overrides.items():
        assert hasattr(cfg, key), key
        setattr(cfg, key, value)
    return prepare_config(cfg)


# -----------------------------------------------------------------------------------------------------------------
# the run: the passes in order, each a map or a reduce (see "How it maps onto map/reduce" above)

def run_pipeline(cfg) -> dict:
    """Run the selected stages from cfg.input to cfg.output; returns the report dict (also saved to disk)."""
    t0, report = time.time(), Report()
    out_dir = os.path.dirname(os.path.abspath(cfg.output))
    os.makedirs(out_dir, exist_ok=True)
    work = make_work_dir(cfg.tmp_dir or out_dir)  # also removes the work folders of killed runs
    tmp_output = f"{cfg.output}.tmp-{os.getpid()}"
    last = [s for s in STAGES if s in cfg.stages][-1] if cfg.stages else "read"
    # SIGTERM (a scheduler's stop, `timeout`, a container shutdown) unwinds like an exception, through the finally
    # below that removes the work folder and the partial output; kill -9 cannot, and the next run sweeps up
    previous_handler = signal.signal(signal.SIGTERM, _stop_on_sigterm) \
        if threading.current_thread() is threading.main_thread() else None
    try:
        # pass 1 (map): parse every line, report bad ones, apply stage 1, and emit the dedup keys of the kept
        # documents; if no later stage follows, this pass writes the output
        path = tmp_output if last in ("read", "filter") else os.path.join(work, "after_filter.jsonl")
        keys = DedupKeyStore(work, cfg) if "dedup" in cfg.stages else None
        docs_read, docs = run_filter(cfg, report, path, with_ids=path != tmp_output, keys_store=keys)
        check_some_input_is_valid(cfg, report, docs_read)
        if "dedup" in cfg.stages:
            # reduce over the (key, doc id) shards: which documents are duplicates, which sentences boilerplate
            # (doc ids are input positions, so the lines read size the removed mask)
            removed, boilerplate = run_dedup_reduce(cfg, report, keys, n_ids=docs_read)
            # pass 2 (map): drop the duplicates, cut the boilerplate sentences
            path, docs = run_dedup_apply(cfg, report, work, path, removed, boilerplate,
                                         tmp_output if last == "dedup" else None)
        if "quality" in cfg.stages:
            # train the reference LM, score every document (map), cutoffs (reduce), label and keep buckets (map)
            path, docs = run_quality(cfg, report, work, path, docs, tmp_output)
        os.replace(tmp_output, cfg.output)  # only a finished run appears under the final name
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if os.path.exists(tmp_output):
            os.remove(tmp_output)
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    return finish_report(cfg, report, docs_read, docs, time.time() - t0)


def _stop_on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
    print("clean_data: stopped by SIGTERM; removing the work folder and the partial output", file=sys.stderr)
    raise SystemExit(128 + signum)


def check_some_input_is_valid(cfg, report, docs_read: int):
    """Bad lines are skipped and reported, but an input with no valid line at all (empty, binary, the wrong
    format) is a mistake to stop at, not a run that writes an empty file."""
    if docs_read == 0:
        raise BadInput(f"{', '.join(cfg.input)}: no lines to clean (the input is empty)")
    if report.n_malformed == docs_read:
        first = report.malformed[0] if report.malformed else {"file": cfg.input[0], "line": "?", "error": "?"}
        raise BadInput(f"{first['file']}:{first['line']}: {first['error']}; all {docs_read} lines of the input are "
                       "malformed, nothing to clean")


def main(argv=None):
    """The command line: bad input ends the run with one line `error: ...` and exit status 1."""
    cfg = make_config(argv if argv is not None else sys.argv[1:])
    for path in cfg.input:
        if not os.path.isfile(path):
            raise SystemExit(f"error: input not found: {path}")
    try:
        run_pipeline(cfg)
    except BadInput as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
