"""What a run is configured by beyond the flags: the stage names, the reason codes the report groups drops by, and
prepare_config, which checks the parsed flags and adds the derived fields (compiled patterns, LSH bands) once, in
the parent, so every forked worker inherits them."""

import re

from .dedup import lsh_params
from .rules import DEFAULT_BAD_WORDS, DEFAULT_BOILERPLATE, load_phrases, phrase_regex
from .text import to_simplified
from .words import jieba_words

# reason codes (the report groups drops by them)
REASONS = {
    # input
    "malformed_json": "line is not valid JSON",
    "invalid_utf8": "line is not valid UTF-8",
    "bad_schema": "no text field / conversations list of {role, content} strings",
    # stage 1
    "empty": "nothing left after normalization",
    "empty_turn": "a conversation turn is empty after normalization",
    "too_short": "fewer than --min_chars characters (pretrain text only)",
    "too_long": "more than --max_chars characters",
    "mojibake": "share of U+FFFD replacement characters above --max_replacement_ratio",
    "too_many_symbols": "share of characters that are not CJK/letter/digit above --max_symbol_ratio",
    "too_little_cjk": "share of CJK characters below --min_cjk_ratio",
    "bad_words": "more than --max_bad_words hits of the bad-word list",
    "boilerplate": "more than --max_boilerplate_phrases hits of the boilerplate phrase list",
    "dup_char_ngrams": "characters inside repeated character n-grams above --max_dup_char_ngram_frac (Chinese)",
    "dup_para_frac": "Gopher: duplicated paragraphs share above --max_dup_para_frac",
    "dup_para_char_frac": "Gopher: characters in duplicated paragraphs above --max_dup_para_char_frac",
    "dup_line_frac": "Gopher: duplicated lines share above --max_dup_line_frac",
    "dup_line_char_frac": "Gopher: characters in duplicated lines above --max_dup_line_char_frac",
    "top_{n}_gram": "Gopher: characters of the most frequent word n-gram (n=2,3,4) above --max_top_ngram_frac",
    "duplicated_{n}_n_grams": "Gopher: characters in repeated word n-grams (n=5..10) above --max_dup_ngram_frac",
    "gopher_short_doc": "Gopher: fewer than --gopher_min_words non-symbol words (English pretrain text)",
    "gopher_long_doc": "Gopher: more than --gopher_max_words non-symbol words (English)",
    "gopher_below_avg_threshold": "Gopher: mean word length below --gopher_min_mean_word_len (English)",
    "gopher_above_avg_threshold": "Gopher: mean word length above --gopher_max_mean_word_len (English)",
    "gopher_too_many_hashes": "Gopher: '#' per word above --max_symbol_word_ratio",
    "gopher_too_many_ellipsis": "Gopher: ellipses per word above --max_symbol_word_ratio",
    "gopher_too_many_bullets": "Gopher: lines starting with a bullet above --max_bullet_lines_frac",
    "gopher_too_many_end_ellipsis": "Gopher: lines ending with an ellipsis above --max_ellipsis_lines_frac",
    "gopher_below_alpha_threshold": "Gopher: words with a letter below --min_alpha_words_frac (English)",
    "gopher_enough_stop_words": "Gopher: fewer than --min_stop_words of the stop words (English pretrain text)",
    # stage 2
    "exact_duplicate": "same normalized text as an earlier document",
    "near_duplicate": "MinHash-LSH cluster with an earlier document",
    "empty_after_sentence_dedup": "only boilerplate sentences were left",
    # stage 3
    "quality_head": "perplexity bucket head not in --keep_buckets",
    "quality_middle": "perplexity bucket middle not in --keep_buckets",
    "quality_tail": "perplexity bucket tail not in --keep_buckets",
}

STAGES = ("filter", "dedup", "quality")


def prepare_config(cfg):
    """Validate flags and add derived fields (compiled patterns, LSH bands) shared by all workers."""
    unknown = (set(cfg.stages) - set(STAGES)) | (set(cfg.keep_buckets) - {"head", "middle", "tail"})
    if unknown:
        raise SystemExit(f"unknown stage or bucket name(s): {sorted(unknown)}")
    cfg.stages = tuple(s for s in STAGES if s in cfg.stages)
    assert len(cfg.max_top_ngram_frac) == 3 and len(cfg.max_dup_ngram_frac) == 6, "threshold lists: 3 and 6 values"
    assert len(cfg.bucket_percentiles) == 2, "--bucket_percentiles needs two values"
    assert cfg.shingle_size >= 1 and cfg.lm_order >= 1
    cfg.keep_buckets = set(cfg.keep_buckets)
    if not cfg.max_chunks_in_flight:
        cfg.max_chunks_in_flight = 4 * max(cfg.num_workers, 1)
    cfg.special_tokens_re = re.compile("(" + "|".join(map(re.escape, cfg.special_tokens)) + ")") \
        if cfg.special_tokens else None
    cfg.bad_words_re = phrase_regex(load_phrases(cfg.bad_words_file, DEFAULT_BAD_WORDS))
    cfg.boilerplate_re = phrase_regex(load_phrases(cfg.boilerplate_file, DEFAULT_BOILERPLATE))
    cfg.lsh_b, cfg.lsh_r = lsh_params(cfg.minhash_threshold, cfg.num_perm)
    if cfg.verify_threshold is None:
        cfg.verify_threshold = cfg.minhash_threshold
    if cfg.t2s:
        to_simplified("")  # fail now, not in a worker, if opencc is missing
    jieba_words("预热")  # load the dictionary once, before the workers fork
    return cfg
