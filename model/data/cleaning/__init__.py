"""Cleaning a MiniMind-style jsonl corpus: heuristic filters, deduplication, n-gram quality scoring. The command line
and the order of the passes are in clean_data.py at the repository root; its docstring is the user guide.

Modules, each importing only those above it:
    records    one input line -> one record (or BadLine), and the text(s) of a record
    text       Unicode normalization, character classes, language detection
    words      jieba words for Chinese, a spaCy-like English tokenizer
    rules      stage 1: DocView, one rule_* function per reason code, RULES, filter_record
    dedup      stage 2: exact / MinHash-LSH / sentence keys (map), shard files, the reduces, apply_dedup (map)
    ngram_lm   stage 3: Kneser-Ney LM, document perplexity, quality buckets
    config     stage names, reason codes, prepare_config (derived fields every worker reads)
    runner     chunked order-preserving parallel map over forked workers, intermediate files, run_pass
    report     the run's report: tables, .report.csv / .report.json, the printed summary
    passes     the passes of a run: filter + dedup keys, dedup reduce, dedup apply, quality
"""
