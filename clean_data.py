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
Malformed lines (bad JSON, bad UTF-8, wrong schema) are skipped, counted and reported with file and line number.
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
(--tmp_dir), removed at the end.
"""

import argparse
import hashlib
import json
import logging
import math
import os
import re
import resource
import shutil
import sys
import tempfile
import time
import unicodedata
from collections import Counter, deque
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

# -----------------------------------------------------------------------------------------------------------------
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

# -----------------------------------------------------------------------------------------------------------------
# character classes

CJK_RANGES = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"
CJK_RE = re.compile(f"[{CJK_RANGES}]")
LATIN_RE = re.compile(r"[A-Za-z]")
SYMBOL_RE = re.compile(r"[^\w\s]|_")  # \w covers letters of every script, digits and CJK; '_' counts as symbol
WHITESPACE_RE = re.compile(r"\s+")
DIGIT_RE = re.compile(r"\d")
# C0/C1 controls except \t \n \r (handled as whitespace), zero-width and bidi-override characters, BOM
CONTROL_RE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")
# NFKC folds these full-width forms to ASCII (，-> ,); Chinese text uses the full-width ones, so keep them
CJK_PUNCT_KEPT = "，！？：；（）～…"
NFKC_SEGMENT_RE = re.compile(f"[^{re.escape(CJK_PUNCT_KEPT)}]+")
# English words for shingles and the word LM (the Gopher rules use english_words below, which mimics spaCy)
EN_TOKEN_RE = re.compile(r"\w+(?:[.'’]\w+)*|\.\.\.|[^\w\s]")
CONTENT_CHAR_RE = re.compile(r"[^\W_]")  # a letter (any script) or a digit
SENTENCE_END_CHARS = set("。！？!?；;…\n")
# a sentence: anything up to terminal punctuation (a '.' only before whitespace), closing quotes, trailing space
SENTENCE_RE = re.compile(
    r"(?:[^。！？!?；;…\n.]|\.(?!\s|$))*(?:(?:[。！？!?；;…]+|\.+(?=\s|$))[”’\"'」』）)\]]*)?[ \t]*\n*"
)
PARAGRAPH_RE = re.compile(r"\n{2,}")
LINES_RE = re.compile("\n+")
STOP_WORDS = {"the", "be", "to", "of", "and", "that", "have", "with"}  # Gopher / datatrove
ZH_MIN_CJK_SHARE = 0.2  # a document is treated as Chinese when CJK >= 20% of CJK + Latin letters

# Small illustrative lists; real runs should pass their own with --bad_words_file / --boilerplate_file.
DEFAULT_BAD_WORDS = [
    "赌博网站", "网上赌场", "博彩平台", "六合彩", "裸聊", "约炮",
    "成人视频", "色情网站", "代开发票", "办证刻章",
    "porn", "xxx", "casino bonus", "viagra", "cialis", "escort service", "online gambling", "hot singles",
]
DEFAULT_BOILERPLATE = [
    "lorem ipsum", "javascript is disabled", "enable javascript", "enable cookies", "all rights reserved",
    "click here to subscribe", "本文来源于网络", "转载请注明出处",
    "版权归原作者所有", "如有侵权请联系",
    "扫描二维码关注", "关注公众号", "点击下方链接",
]


# -----------------------------------------------------------------------------------------------------------------
# records: parsing and access to their texts

class BadLine(Exception):
    def __init__(self, reason, message):
        super().__init__(message)
        self.reason = reason


def parse_record(raw: bytes, text_field: str) -> dict:
    """Decode one input line into a record dict, or raise BadLine with a reason code."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadLine("invalid_utf8", str(e)) from None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadLine("malformed_json", str(e)) from None
    if not isinstance(record, dict):
        raise BadLine("bad_schema", f"expected a JSON object, got {type(record).__name__}")
    if "conversations" in record:
        turns = record["conversations"]
        if not isinstance(turns, list) or not turns or not all(
            isinstance(t, dict) and isinstance(t.get("content"), str) and isinstance(t.get("role"), str) for t in turns
        ):
            raise BadLine("bad_schema", "conversations must be a non-empty list of {role, content} strings")
        return record
    if not isinstance(record.get(text_field), str):
        raise BadLine("bad_schema", f"no string field '{text_field}' and no 'conversations'")
    return record


def record_kind(record: dict) -> str:
    return "conversation" if "conversations" in record else "text"


def record_texts(record: dict, text_field: str) -> list:
    if "conversations" in record:
        return [turn["content"] for turn in record["conversations"]]
    return [record[text_field]]


def with_texts(record: dict, text_field: str, texts: list) -> dict:
    """A copy of the record with its text(s) replaced; other fields untouched."""
    record = dict(record)
    if "conversations" in record:
        record["conversations"] = [dict(turn, content=t) for turn, t in zip(record["conversations"], texts)]
    else:
        record[text_field] = texts[0]
    return record


def joined_text(record: dict, text_field: str) -> str:
    return "\n".join(record_texts(record, text_field))


# -----------------------------------------------------------------------------------------------------------------
# stage 1: normalization

def normalize_unicode(text: str, fold_cjk_punct: bool = False) -> str:
    """NFKC, except for the full-width punctuation that Chinese text uses (unless fold_cjk_punct)."""
    if fold_cjk_punct:
        return unicodedata.normalize("NFKC", text)
    if unicodedata.is_normalized("NFKC", text):
        return text
    # the kept characters have no combining marks, so normalizing the pieces between them equals normalizing all
    return NFKC_SEGMENT_RE.sub(lambda m: unicodedata.normalize("NFKC", m.group()), text)


_T2S = None


def to_simplified(text: str) -> str:
    global _T2S
    if _T2S is None:
        try:
            import opencc  # optional: pip install opencc (bundles its dictionaries, works offline)
        except ImportError:
            raise SystemExit("--t2s needs the optional package opencc: pip install opencc") from None
        _T2S = opencc.OpenCC("t2s")
    return _T2S.convert(text)


def normalize_text(text: str, cfg) -> str:
    text = normalize_unicode(text, cfg.fold_cjk_punct)
    text = CONTROL_RE.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    if cfg.t2s:
        text = to_simplified(text)
    text = re.sub(r"[ \t]+\n", "\n", text)  # trailing spaces would make equal lines look different
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


# -----------------------------------------------------------------------------------------------------------------
# stage 1: the document as the rules see it

def count_matches(pattern: re.Pattern, text: str) -> int:
    return len(text) - len(pattern.sub("", text))  # counts single-character matches at C speed


def detect_language(text: str) -> str:
    cjk, latin = count_matches(CJK_RE, text), count_matches(LATIN_RE, text)
    return "zh" if cjk and cjk >= ZH_MIN_CJK_SHARE * (cjk + latin) else "en"


_JIEBA = None


def jieba_words(text: str) -> list:
    global _JIEBA
    if _JIEBA is None:
        import jieba
        jieba.setLogLevel(logging.WARNING)
        jieba.initialize()
        _JIEBA = jieba
    return _JIEBA.lcut(text, HMM=False)  # the HMM finds new words; 20% slower and not needed for counting


def is_symbol_token(token: str) -> bool:
    return CONTENT_CHAR_RE.search(token) is None


def tokenize(text: str, lang: str) -> list:
    """Words with punctuation tokens kept (as datatrove's tokenizers do), whitespace dropped."""
    if lang == "zh":
        return [w.strip() for w in jieba_words(text) if not w.isspace() and w]
    return english_words(text)


# -----------------------------------------------------------------------------------------------------------------
# English words as datatrove counts them. It splits with spaCy's blank English tokenizer; this is a small copy of
# that algorithm (whitespace, then prefixes / suffixes / special cases, then infixes) with the rules that matter for
# English prose. Same tokens as spaCy 3.8 on 99% of the demo Shakespeare documents (50 of 330k tokens differ).
_QUOTES = "'\"”“`‘´’‚„»«"
_PUNCT = ",:;!?¿¡()[\\]{}<>_#*&"
_PREFIX_RE = re.compile(rf"\.\.+|…+|[§%=—–{re.escape(_PUNCT + _QUOTES)}$£€¥]|\+(?![0-9])")
_SUFFIX_RE = re.compile(
    rf"(?:\.\.+|…+|[{re.escape(_PUNCT + _QUOTES)}—–]|['’][sS]|(?<=[0-9])[+$£€¥%]"
    rf"|(?<=[0-9])(?:km|m|cm|mm|kg|g|mg|lb|oz|ft|yd|in|mph|am|pm|GB|MB|KB|TB)"
    rf"|(?<=[0-9a-z{re.escape(_PUNCT + _QUOTES)}%])\.|(?<=[A-Z][A-Z])\.)$")
_INFIX_RE = re.compile(r"\.\.+|…|(?<=[0-9])[+\-*^](?=[0-9-])|(?<=[a-z'\"])\.(?=[A-Z'\"])|(?<=[A-Za-z]),(?=[A-Za-z])"
                       r"|(?<=[A-Za-z0-9])(?:---|--|-|–|—|~)(?=[A-Za-z])|(?<=[A-Za-z0-9])[:<>=/](?=[A-Za-z])")
_URL_RE = re.compile(r"^(?:https?://|www\.)\S+$|^[\w.+-]+@[\w-]+\.[\w.]+$")
_CONTRACTION_RE = re.compile(r"^(?i:(do|does|did|is|are|was|were|has|have|had|could|would|should|must|need|might|ca|wo"
                             r"|sha|ai)(n't)|(i|you|he|she|it|we|they|who|what|there|that)('ll|'re|'ve|'m|'d))$")
_ABBREVIATION_RE = re.compile(r"^(?:[A-Za-z]\.|(?:[A-Za-z]\.){2,}|Mr\.|Mrs\.|Ms\.|Dr\.|St\.|vs\.|Jr\.|Sr\.|Co\.)$")
_SPLIT_WORDS = {"cannot": 3, "gonna": 3, "gotta": 3, "wanna": 3, "dont": 2, "cant": 2, "wont": 2, "isnt": 2,
                "didnt": 3, "doesnt": 4, "wasnt": 3}  # where spaCy's exceptions cut these words
_KEPT_WORDS = {"'em", "o'clock", "ma'am", "'ll", "'re", "'ve", "'m", "'d", "'s", "n't"}


def _special_case(s: str):
    """spaCy's tokenizer exceptions: the tokens for s, or None if s is not a special case."""
    lower = s.lower()
    if lower in _SPLIT_WORDS:
        return [s[:_SPLIT_WORDS[lower]], s[_SPLIT_WORDS[lower]:]]
    if lower in _KEPT_WORDS or _ABBREVIATION_RE.match(s) or _URL_RE.match(s):
        return [s]
    m = _CONTRACTION_RE.match(s)
    return [g for g in m.groups() if g] if m else None


def english_words(text: str) -> list:
    out = []
    for chunk in text.split():
        prefixes, suffixes, special = [], [], _special_case(chunk)
        while chunk and special is None:  # spaCy's Tokenizer._split_affixes
            pre = _PREFIX_RE.match(chunk)
            pre_len = pre.end() if pre else 0
            if pre_len and len(chunk) > pre_len and _special_case(chunk[pre_len:]) is not None:
                prefixes.append(chunk[:pre_len])
                chunk = chunk[pre_len:]
                special = _special_case(chunk)
                break
            suf = _SUFFIX_RE.search(chunk[pre_len:]) if len(chunk) > pre_len else None
            suf_len = len(chunk) - pre_len - suf.start() if suf else 0
            if suf_len and len(chunk) > suf_len and _special_case(chunk[:-suf_len]) is not None:
                suffixes.append(chunk[-suf_len:])
                chunk = chunk[:-suf_len]
                special = _special_case(chunk)
                break
            if not pre_len and not suf_len:
                break
            if pre_len:
                prefixes.append(chunk[:pre_len])
            if suf_len:
                suffixes.append(chunk[len(chunk) - suf_len:])
            chunk = chunk[pre_len:len(chunk) - suf_len]
            special = _special_case(chunk) if chunk else None
        out.extend(prefixes)
        if special is not None:
            out.extend(special)
        elif chunk:
            start = 0
            for m in _INFIX_RE.finditer(chunk):
                if m.start() == 0:  # spaCy ignores an infix at the very start
                    continue
                out += [chunk[start:m.start()], m.group()]
                start = m.end()
            if chunk[start:]:
                out.append(chunk[start:])
        out.extend(reversed(suffixes))
    return out


class DocView:
    """What the rules look at: the (joined) text with special tokens turned into line breaks, and lazy words."""

    def __init__(self, text: str, kind: str, cfg):
        self.text = cfg.special_tokens_re.sub("\n", text) if cfg.special_tokens_re else text
        self.kind = kind

    @cached_property
    def lang(self) -> str:
        return detect_language(self.text)

    @cached_property
    def jieba_tokens(self) -> list:
        """jieba's raw output, whitespace and line breaks included (dedup shingles reuse it)."""
        return jieba_words(self.text)

    @cached_property
    def words(self) -> list:
        if self.lang == "zh":
            return [w.strip() for w in self.jieba_tokens if w and not w.isspace()]
        return english_words(self.text)

    @cached_property
    def content_words(self) -> list:
        return [w for w in self.words if not is_symbol_token(w)]

    @cached_property
    def non_space_len(self) -> int:
        return len(self.text) - count_matches(WHITESPACE_RE, self.text)


# -----------------------------------------------------------------------------------------------------------------
# stage 1: rules. Each returns a reason code to drop the document, or None to keep it.

def rule_too_short(doc, cfg):
    if cfg.min_chars > 0 and doc.kind == "text" and doc.non_space_len < cfg.min_chars:
        return "too_short"


def rule_too_long(doc, cfg):
    if cfg.max_chars > 0 and doc.non_space_len > cfg.max_chars:
        return "too_long"


def rule_mojibake(doc, cfg):
    if cfg.max_replacement_ratio > 0 and doc.text.count("\ufffd") > cfg.max_replacement_ratio * len(doc.text):
        return "mojibake"


def rule_too_many_symbols(doc, cfg):
    if cfg.max_symbol_ratio > 0 and count_matches(SYMBOL_RE, doc.text) > cfg.max_symbol_ratio * doc.non_space_len:
        return "too_many_symbols"


def rule_too_little_cjk(doc, cfg):
    if cfg.min_cjk_ratio > 0 and count_matches(CJK_RE, doc.text) < cfg.min_cjk_ratio * doc.non_space_len:
        return "too_little_cjk"


def rule_bad_words(doc, cfg):
    if cfg.max_bad_words >= 0 and cfg.bad_words_re and len(cfg.bad_words_re.findall(doc.text)) > cfg.max_bad_words:
        return "bad_words"


def rule_boilerplate(doc, cfg):
    limit = cfg.max_boilerplate_phrases
    if limit >= 0 and cfg.boilerplate_re and len(cfg.boilerplate_re.findall(doc.text)) > limit:
        return "boilerplate"


def duplicated_ngram_chars(units: list, n: int) -> int:
    """Characters covered by repeated n-grams, counted greedily left to right (datatrove's find_all_duplicate)."""
    seen, repeated_chars, i = set(), 0, 0
    while i < len(units) - n + 1:
        ngram = "".join(units[i:i + n])
        if ngram in seen:
            repeated_chars += len(ngram)
            i += n
        else:
            seen.add(ngram)
            i += 1
    return repeated_chars


def rule_dup_char_ngrams(doc, cfg):
    # jieba splits runs like 哈哈哈哈 or 的的的 unpredictably; characters see every repeat
    if cfg.max_dup_char_ngram_frac > 0 and doc.lang == "zh":
        chars = [c for c in doc.text if not c.isspace()]
        if duplicated_ngram_chars(chars, cfg.char_ngram_size) > cfg.max_dup_char_ngram_frac * len(chars):
            return "dup_char_ngrams"


def find_duplicates(items: list) -> tuple:
    """(number of items seen before, their characters)"""
    seen, n_dup, dup_chars = set(), 0, 0
    for item in items:
        if item in seen:
            n_dup += 1
            dup_chars += len(item)
        else:
            seen.add(item)
    return n_dup, dup_chars


def rule_dup_paragraphs(doc, cfg):
    paragraphs = PARAGRAPH_RE.split(doc.text.strip())
    n_dup, dup_chars = find_duplicates(paragraphs)
    if cfg.max_dup_para_frac > 0 and n_dup > cfg.max_dup_para_frac * len(paragraphs):
        return "dup_para_frac"
    if cfg.max_dup_para_char_frac > 0 and dup_chars > cfg.max_dup_para_char_frac * len(doc.text):
        return "dup_para_char_frac"


def rule_dup_lines(doc, cfg):
    lines = LINES_RE.split(doc.text)
    n_dup, dup_chars = find_duplicates(lines)
    if cfg.max_dup_line_frac > 0 and n_dup > cfg.max_dup_line_frac * len(lines):
        return "dup_line_frac"
    if cfg.max_dup_line_char_frac > 0 and dup_chars > cfg.max_dup_line_char_frac * len(doc.text):
        return "dup_line_char_frac"


def repetition_words(doc) -> tuple:
    """Words and joiner for the n-gram repetition rules. English: datatrove's (punctuation tokens included,
    n-grams joined by spaces). Chinese: jieba words without punctuation, joined without spaces, so character
    fractions count only the text's own characters."""
    return (doc.words, " ") if doc.lang == "en" else (doc.content_words, "")


def rule_top_ngrams(doc, cfg):
    words, joiner = repetition_words(doc)
    # datatrove counts a top n-gram even when it occurs once, which drops any text of a few words; we follow it for
    # English pretrain text (which the word-count rule drops anyway) but ask for a repeat in Chinese and in chats,
    # whose short turns are exempt from the length rules
    min_count = 1 if doc.lang == "en" and doc.kind == "text" else 2
    for n, max_frac in zip((2, 3, 4), cfg.max_top_ngram_frac):
        if max_frac <= 0 or len(words) < n:
            continue
        (top, count), = Counter(joiner.join(words[i:i + n]) for i in range(len(words) - n + 1)).most_common(1)
        if count >= min_count and len(top) * count > max_frac * len(doc.text):
            return f"top_{n}_gram"


def rule_dup_ngrams(doc, cfg):
    words, _ = repetition_words(doc)
    for n, max_frac in zip(range(5, 11), cfg.max_dup_ngram_frac):
        if max_frac > 0 and duplicated_ngram_chars(words, n) > max_frac * len(doc.text):
            return f"duplicated_{n}_n_grams"


def gopher_english(doc) -> bool:
    return doc.lang == "en"


def rule_gopher_word_count(doc, cfg):
    if not gopher_english(doc):
        return None
    n = len(doc.content_words)
    if cfg.gopher_min_words > 0 and doc.kind == "text" and n < cfg.gopher_min_words:
        return "gopher_short_doc"
    if cfg.gopher_max_words > 0 and n > cfg.gopher_max_words:
        return "gopher_long_doc"


def rule_gopher_mean_word_length(doc, cfg):
    if not gopher_english(doc) or not doc.content_words:
        return None
    mean = sum(len(w) for w in doc.content_words) / len(doc.content_words)
    if cfg.gopher_min_mean_word_len > 0 and mean < cfg.gopher_min_mean_word_len:
        return "gopher_below_avg_threshold"
    if cfg.gopher_max_mean_word_len > 0 and mean > cfg.gopher_max_mean_word_len:
        return "gopher_above_avg_threshold"


def rule_symbol_words(doc, cfg):
    n_words = len(doc.words)
    if cfg.max_symbol_word_ratio <= 0 or not n_words:
        return None
    if doc.text.count("#") > cfg.max_symbol_word_ratio * n_words:
        return "gopher_too_many_hashes"
    if doc.text.count("...") + doc.text.count("…") > cfg.max_symbol_word_ratio * n_words:
        return "gopher_too_many_ellipsis"


def rule_bullet_lines(doc, cfg):
    lines = doc.text.splitlines()
    bullets = sum(line.lstrip().startswith(("•", "-")) for line in lines)
    if cfg.max_bullet_lines_frac > 0 and lines and bullets > cfg.max_bullet_lines_frac * len(lines):
        return "gopher_too_many_bullets"


def rule_ellipsis_lines(doc, cfg):
    lines = doc.text.splitlines()
    ending = sum(line.rstrip().endswith(("...", "…")) for line in lines)
    if cfg.max_ellipsis_lines_frac > 0 and lines and ending > cfg.max_ellipsis_lines_frac * len(lines):
        return "gopher_too_many_end_ellipsis"


def rule_alpha_words(doc, cfg):
    if not gopher_english(doc) or cfg.min_alpha_words_frac <= 0 or not doc.words:
        return None
    alpha = sum(any(c.isalpha() for c in w) for w in doc.words)
    if alpha < cfg.min_alpha_words_frac * len(doc.words):
        return "gopher_below_alpha_threshold"


def rule_stop_words(doc, cfg):
    if not gopher_english(doc) or doc.kind != "text" or cfg.min_stop_words <= 0:
        return None
    if len(STOP_WORDS.intersection(doc.words)) < cfg.min_stop_words:  # case-sensitive, as in datatrove
        return "gopher_enough_stop_words"


# cheap rules first; within the Gopher block datatrove's order (repetition filter, then quality filter)
GENERIC_RULES = [rule_too_short, rule_too_long, rule_mojibake, rule_too_many_symbols, rule_too_little_cjk,
                 rule_bad_words, rule_boilerplate, rule_dup_char_ngrams]
GOPHER_REPETITION_RULES = [rule_dup_paragraphs, rule_dup_lines, rule_top_ngrams, rule_dup_ngrams]
GOPHER_QUALITY_RULES = [rule_gopher_word_count, rule_gopher_mean_word_length, rule_symbol_words,
                        rule_bullet_lines, rule_ellipsis_lines, rule_alpha_words, rule_stop_words]
RULES = GENERIC_RULES + GOPHER_REPETITION_RULES + GOPHER_QUALITY_RULES


def first_failed_rule(doc: DocView, cfg, rules=RULES):
    for rule in rules:
        reason = rule(doc, cfg)
        if reason:
            return reason
    return None


def filter_record(record: dict, cfg) -> tuple:
    """Stage 1 for one record: (normalized record, None) to keep it, (None, reason code) to drop it."""
    record, reason, _ = filter_record_view(record, cfg)
    return record, reason


def filter_record_view(record: dict, cfg) -> tuple:
    """filter_record, plus the DocView the rules used (its jieba words are reused for dedup shingles)."""
    texts = [normalize_text(t, cfg) for t in record_texts(record, cfg.text_field)]
    kind = record_kind(record)
    if kind == "conversation" and not all(texts):
        return None, "empty_turn", None
    if not any(texts):
        return None, "empty", None
    view = DocView("\n".join(texts), kind, cfg)
    reason = first_failed_rule(view, cfg)
    if reason:
        return None, reason, view
    return with_texts(record, cfg.text_field, texts), None, view


# -----------------------------------------------------------------------------------------------------------------
# stage 2: dedup keys (map side)

def hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def exact_key(text: str) -> int:
    return hash64(WHITESPACE_RE.sub(" ", text.lower()).strip().encode("utf-8"))


def split_sentences(text: str) -> list:
    """Pieces such that "".join(pieces) == text; each a sentence with its end punctuation and trailing space."""
    return [m.group() for m in SENTENCE_RE.finditer(text) if m.group()]


def split_keep_special(text: str, cfg) -> list:
    """(piece, is_special_token) pairs; special tokens are never cut out or hashed as text."""
    if not cfg.special_tokens_re:
        return [(text, False)]
    parts = cfg.special_tokens_re.split(text)  # the pattern has one capture group: odd parts are the tokens
    return [(part, i % 2 == 1) for i, part in enumerate(parts) if part]


def sentence_key(sentence: str, cfg):
    normalized = WHITESPACE_RE.sub(" ", sentence.lower()).strip()
    if len(normalized) < cfg.sentence_min_chars:
        return None  # short sentences (好的。 / Thank you.) repeat everywhere and are not boilerplate
    return hash64(normalized.encode("utf-8"))


def shingles(text: str, cfg, view: DocView = None) -> set:
    """Word n-grams (lowercased, digits as 0) that never cross a sentence end; a sentence shorter than n words is
    one shingle. Chinese words are jieba's on the text as the rules see it (pass their DocView to reuse them)."""
    view = view or DocView(text, "text", cfg)
    if view.lang == "zh":
        tokens = [DIGIT_RE.sub("0", t.lower()) for t in view.jieba_tokens]
    else:
        tokens = EN_TOKEN_RE.findall(DIGIT_RE.sub("0", view.text.lower()).replace("\n", " . "))
    n, out, sentence = cfg.shingle_size, set(), []
    for token in tokens + ["\n"]:
        if token and all(c in SENTENCE_END_CHARS or c == "." for c in token):
            if sentence:
                if len(sentence) < n:
                    out.add(" ".join(sentence))
                else:
                    out.update(" ".join(sentence[i:i + n]) for i in range(len(sentence) - n + 1))
            sentence = []
        elif not token.isspace() and not is_symbol_token(token):
            sentence.append(token)
    return out


_MINHASH = {}


def minhash_signature(shingle_set: set, num_perm: int, seed: int) -> np.ndarray:
    """datasketch MinHash of the shingles (one reusable MinHash per process: building its permutations is slow)."""
    from datasketch import MinHash
    key = (num_perm, seed)
    if key not in _MINHASH:
        _MINHASH[key] = MinHash(num_perm=num_perm, seed=seed)
    m = _MINHASH[key]
    m.clear()
    m.update_batch([s.encode("utf-8") for s in shingle_set])
    return m.hashvalues.copy()


def lsh_params(threshold: float, num_perm: int) -> tuple:
    """(bands, rows) exactly as datasketch's MinHashLSH chooses them (minimising 0.5 FP + 0.5 FN)."""
    from datasketch import MinHashLSH
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    return lsh.b, lsh.r


def band_keys(signature: np.ndarray, bands: int, rows: int) -> list:
    # the band index goes into the hash, so equal rows in different bands are different buckets (as in datasketch)
    return [hash64(b.to_bytes(2, "little") + signature[b * rows:(b + 1) * rows].tobytes()) for b in range(bands)]


@dataclass
class DedupKeys:
    exact: int
    bands: list = field(default_factory=list)      # empty when the document has no shingles
    signature: np.ndarray = None                   # MinHash values, to verify LSH candidates
    sentences: list = field(default_factory=list)  # distinct keys; empty for conversations


def dedup_keys(record: dict, cfg, view: DocView = None) -> DedupKeys:
    """Stage 2 map: everything the reduce needs to know about one document (view: stage 1's, to reuse its words)."""
    text = joined_text(record, cfg.text_field)
    keys = DedupKeys(exact=exact_key(text))
    if cfg.near_dedup:
        shingle_set = shingles(text, cfg, view)
        # Too few shingles and one shared line already reaches the threshold (two 5-shingle stubs with the same title
        # line look like near-duplicates); such short texts get exact dedup only. Never empty: it would collide.
        if len(shingle_set) >= max(1, cfg.min_shingles):
            keys.signature = minhash_signature(shingle_set, cfg.num_perm, cfg.minhash_seed)
            keys.bands = band_keys(keys.signature, cfg.lsh_b, cfg.lsh_r)
    # conversations keep their sentences: repeated system prompts and templates are part of chat data
    if cfg.sentence_min_docs > 0 and record_kind(record) == "text":
        found = {sentence_key(sentence, cfg) for piece, special in split_keep_special(text, cfg) if not special
                 for sentence in split_sentences(piece)}
        keys.sentences = sorted(found - {None})
    return keys


def remove_sentences(record: dict, boilerplate: set, cfg) -> tuple:
    """Cut boilerplate sentences out of a pretrain text: (record, list of removed sentences)."""
    if not boilerplate or record_kind(record) != "text":
        return record, []
    kept, removed = [], []
    for piece, special in split_keep_special(record[cfg.text_field], cfg):
        if special:
            kept.append(piece)
            continue
        for sentence in split_sentences(piece):
            (removed if sentence_key(sentence, cfg) in boilerplate else kept).append(sentence)
    if not removed:
        return record, []
    return with_texts(record, cfg.text_field, ["".join(kept).strip()]), [s.strip() for s in removed]


def apply_dedup(doc_id: int, record: dict, removed: np.ndarray, boilerplate: set, cfg) -> tuple:
    """Stage 2 final map: (record or None, reason or None, removed sentences)."""
    if removed[doc_id] == EXACT:
        return None, "exact_duplicate", []
    if removed[doc_id] == NEAR:
        return None, "near_duplicate", []
    record, cut = remove_sentences(record, boilerplate, cfg)
    if cut:
        remaining = record[cfg.text_field]
        if cfg.special_tokens_re:
            remaining = cfg.special_tokens_re.sub("", remaining)
        if not remaining.strip():
            return None, "empty_after_sentence_dedup", cut
    return record, None, cut


# -----------------------------------------------------------------------------------------------------------------
# stage 2: reduce over (key, doc id) pairs kept in shard files

PAIR_DTYPE = np.dtype([("key", "<u8"), ("doc", "<i8")])
KEPT, EXACT, NEAR = 0, 1, 2


class ShardWriter:
    """Appends (key, doc id) pairs to num_shards files, partitioned by key, so a reduce needs one shard at a time."""

    def __init__(self, directory: str, name: str, num_shards: int, flush_every: int = 1 << 18):
        self.paths = [os.path.join(directory, f"{name}-{i:04d}.bin") for i in range(num_shards)]
        self.keys, self.docs, self.flush_every = [], [], flush_every

    def add(self, keys: list, doc_id: int):
        self.keys.extend(keys)
        self.docs.extend([doc_id] * len(keys))
        if len(self.keys) >= self.flush_every:
            self.flush()

    def flush(self):
        pairs = np.empty(len(self.keys), dtype=PAIR_DTYPE)
        pairs["key"], pairs["doc"] = np.array(self.keys, dtype=np.uint64), self.docs
        shard = pairs["key"] % np.uint64(len(self.paths))
        for i, path in enumerate(self.paths):
            with open(path, "ab") as f:
                pairs[shard == i].tofile(f)
        self.keys, self.docs = [], []

    def shards(self):
        self.flush()
        for path in self.paths:
            yield np.fromfile(path, dtype=PAIR_DTYPE) if os.path.exists(path) else np.empty(0, dtype=PAIR_DTYPE)


def group_firsts(pairs: np.ndarray) -> tuple:
    """Sort pairs by (key, doc); return (first doc of its key group, doc) for every pair that is not a first."""
    pairs = pairs[np.lexsort((pairs["doc"], pairs["key"]))]
    keys, docs = pairs["key"], pairs["doc"]
    is_first = np.ones(len(pairs), dtype=bool)
    is_first[1:] = keys[1:] != keys[:-1]
    first_index = np.maximum.accumulate(np.where(is_first, np.arange(len(pairs)), 0))
    return docs[first_index][~is_first], docs[~is_first]


def exact_duplicates(shards, removed: np.ndarray):
    """Mark every document whose exact key was seen on a lower doc id."""
    for pairs in shards:
        _, later = group_firsts(pairs)
        removed[later] = EXACT


class UnionFind:
    """Over the documents that share a bucket with another one; the root of a cluster is its lowest doc id."""

    def __init__(self):
        self.parent = {}

    def find(self, x):
        root = x
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while x != root:  # path compression
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a, b):
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


class SignatureStore:
    """MinHash signatures on disk, one row per document that has shingles, in doc id order (ids ascend in every
    pass). The reduce reads only the rows of candidate pairs."""

    def __init__(self, directory: str, num_perm: int):
        self.path, self.ids_path, self.num_perm = (os.path.join(directory, "signatures.u32"),
                                                   os.path.join(directory, "signature_ids.i64"), num_perm)
        self.f, self.ids_f, self.rows, self.ids = open(self.path, "wb"), open(self.ids_path, "wb"), None, None
        self.buffer, self.buffer_ids = [], []

    def add(self, doc_id: int, signature: np.ndarray):
        self.buffer.append(signature)
        self.buffer_ids.append(doc_id)
        if len(self.buffer) >= 65536:
            self.flush()

    def flush(self):
        if self.buffer:
            np.stack(self.buffer).astype(np.uint32).tofile(self.f)
            np.array(self.buffer_ids, dtype=np.int64).tofile(self.ids_f)
        self.buffer, self.buffer_ids = [], []

    def close(self):
        self.flush()
        self.f.close()
        self.ids_f.close()
        self.ids = np.fromfile(self.ids_path, dtype=np.int64)
        if len(self.ids):
            self.rows = np.memmap(self.path, dtype=np.uint32, mode="r").reshape(-1, self.num_perm)

    def jaccard(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Estimated Jaccard similarity of documents a[i] and b[i]: the share of equal MinHash values."""
        ra, rb = np.searchsorted(self.ids, a), np.searchsorted(self.ids, b)
        return (self.rows[ra] == self.rows[rb]).mean(axis=1)


def near_duplicates(shards, removed: np.ndarray, signatures=None, min_jaccard: float = 0.0) -> tuple:
    """Union documents sharing an LSH band bucket, if their estimated Jaccard is >= min_jaccard (checked when
    signatures are given); mark all but each cluster's lowest id. Returns (candidate edges, verified edges)."""
    uf, n_candidates, n_edges = UnionFind(), 0, 0
    for pairs in shards:
        pairs = pairs[removed[pairs["doc"]] == KEPT]  # exact duplicates are already gone
        firsts, others = group_firsts(pairs)
        if not len(others):
            continue
        edges = np.unique(np.stack([firsts, others], axis=1), axis=0)
        n_candidates += len(edges)
        if signatures is not None and min_jaccard > 0:
            # a band collision is only a candidate: without this check, documents sharing a header or a few
            # stock phrases chain whole clusters together through union-find
            edges = edges[signatures.jaccard(edges[:, 0], edges[:, 1]) >= min_jaccard]
        n_edges += len(edges)
        for a, b in edges.tolist():
            uf.union(a, b)
    for doc in list(uf.parent):
        if uf.find(doc) != doc:
            removed[doc] = NEAR
    return n_candidates, n_edges


def boilerplate_sentences(shards, removed: np.ndarray, min_docs: int) -> set:
    """Sentence keys found in at least min_docs documents that survived document-level dedup."""
    found = set()
    for pairs in shards:
        pairs = pairs[removed[pairs["doc"]] == KEPT]
        keys, counts = np.unique(pairs["key"], return_counts=True)
        found.update(keys[counts >= min_docs].tolist())
    return found


# -----------------------------------------------------------------------------------------------------------------
# stage 3: interpolated Kneser-Ney n-gram LM

class KneserNeyLM:
    """Interpolated Kneser-Ney (Chen & Goodman 1998, one discount per order) over characters or words.

    Stored in backoff form, which is exactly the interpolated model: for every seen n-gram its full interpolated
    log10 probability, for every seen context its log10 backoff weight gamma(h) = D * N1+(h.) / c(h.).
    P(w|h) = stored(hw) if seen, else gamma(h) * P(w|h[1:]) (gamma = 1 for unseen h), down to a uniform
    distribution over the vocabulary plus one unknown token. Sequences are str (characters) or tuples (words).
    """

    def __init__(self, order: int = 4, unit: str = "char"):
        self.order, self.unit = order, unit
        self.bos, self.eos = ("\x02", "\x03") if unit == "char" else (("<s>",), ("</s>",))
        self.logprob, self.logbackoff, self.log_uniform = {}, {}, 0.0

    def pad(self, seq):
        return self.bos * (self.order - 1) + seq + self.eos

    def fit(self, sequences):
        order = self.order
        counts = {order: Counter()}  # raw counts for the highest order
        for seq in sequences:
            padded = self.pad(seq)
            for i in range(order - 1, len(padded)):
                counts[order][padded[i - order + 1:i + 1]] += 1
        for k in range(order - 1, 0, -1):  # lower orders: continuation counts N1+(. g)
            counts[k] = Counter(g[1:] for g in counts[k + 1])
        vocab = {g for g in counts[1] if g != self.bos}
        self.log_uniform = -math.log10(len(vocab) + 1)  # +1: the unknown token
        for k in range(1, order + 1):
            self._fit_order(counts[k])
        return self

    def _fit_order(self, counts: Counter):
        count_of_counts = Counter(c for c in counts.values() if c <= 2)
        n1, n2 = count_of_counts[1], count_of_counts[2]
        discount = min(max(n1 / (n1 + 2 * n2), 0.1), 0.9) if n1 and n2 else 0.5
        context_total, context_types = Counter(), Counter()
        for g, c in counts.items():
            context_total[g[:-1]] += c
            context_types[g[:-1]] += 1
        for h, total in context_total.items():
            self.logbackoff[h] = math.log10(discount * context_types[h] / total)
        for g, c in counts.items():
            h, w = g[:-1], g[-1:]
            lower = 10 ** self.log10_prob(h[1:], w) if h else 10 ** self.log_uniform
            gamma = 10 ** self.logbackoff[h]
            self.logprob[g] = math.log10((c - discount) / context_total[h] + gamma * lower)

    def log10_prob(self, context, token) -> float:
        """log10 P(token | context); context is at most order-1 long."""
        total = 0.0
        for start in range(len(context) + 1):
            h = context[start:]
            lp = self.logprob.get(h + token)
            if lp is not None:
                return total + lp
            total += self.logbackoff.get(h, 0.0)
        return total + self.log_uniform

    def score(self, seq) -> tuple:
        """(sum of log10 probabilities, number of predictions = len(seq) + 1 for the end token)"""
        padded, n = self.pad(seq), self.order - 1
        total = 0.0
        for i in range(n, len(padded)):
            total += self.log10_prob(padded[i - n:i], padded[i:i + 1])
        return total, len(padded) - n


def lm_units(text: str, cfg) -> list:
    """CCNet-style normalization (lowercase, digits -> 0, whitespace collapsed) and one sequence per line."""
    view = DocView(text, "text", cfg).text
    lines = [WHITESPACE_RE.sub(" ", line).strip() for line in DIGIT_RE.sub("0", view.lower()).split("\n")]
    lines = [line for line in lines if line]
    if cfg.lm_unit == "word":
        return [tuple(tokenize(line, detect_language(line))) for line in lines]
    return lines


def document_perplexity(record: dict, lm: KneserNeyLM, cfg) -> float:
    """CCNet: 10 ** (-sum of log10 P over lines / sum of (tokens + 1) over lines)."""
    log10_sum, n = 0.0, 0
    for seq in lm_units(joined_text(record, cfg.text_field), cfg):
        lp, count = lm.score(seq)
        log10_sum, n = log10_sum + lp, n + count
    return 10 ** (-log10_sum / n) if n else float("inf")


def quality_bucket(perplexity: float, cutoffs: tuple) -> str:
    low, high = cutoffs
    return "head" if perplexity < low else "middle" if perplexity < high else "tail"


def reference_texts(path: str, cfg, max_chars: int):
    """Texts of a jsonl file (either format), normalized like stage 1, up to max_chars characters."""
    n_chars = 0
    with open(path, "rb") as f:
        for raw in f:
            try:
                record = parse_record(raw, cfg.text_field)
            except BadLine:
                continue
            for text in record_texts(record, cfg.text_field):
                text = normalize_text(text, cfg)
                yield text
                n_chars += len(text)
                if n_chars >= max_chars:
                    return


def train_reference_lm(texts, cfg) -> tuple:
    seqs, n_chars = [], 0
    for text in texts:
        for seq in lm_units(text, cfg):
            seqs.append(seq)
            n_chars += len(seq)
    return KneserNeyLM(cfg.lm_order, cfg.lm_unit).fit(seqs), n_chars


# -----------------------------------------------------------------------------------------------------------------
# the pipeline: chunked, order-preserving parallel maps over files

_STATE = {}  # what the per-chunk functions need; set before the workers fork, so it is never pickled


def parallel_map(fn, chunks, num_workers: int, max_in_flight: int):
    """Yield (chunk bytes, fn(chunk items)) in input order, with at most max_in_flight chunks queued
    (Pool.imap would read the whole input ahead into memory)."""
    if num_workers <= 1:
        for nbytes, items in chunks:
            yield nbytes, fn(items)
        return
    import multiprocessing as mp
    pool = mp.get_context("fork").Pool(num_workers)
    try:
        pending = deque()
        for nbytes, items in chunks:
            pending.append((nbytes, pool.apply_async(fn, (items,))))
            if len(pending) >= max_in_flight:
                nb, result = pending.popleft()
                yield nb, result.get()
        while pending:
            nb, result = pending.popleft()
            yield nb, result.get()
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()  # reaped workers count in RUSAGE_CHILDREN (peak memory)


def raw_items(paths: list):
    """(doc id, file index, line number, bytes) for every non-blank input line; ids count across files."""
    doc_id = 0
    for file_index, path in enumerate(paths):
        with open(path, "rb") as f:
            for line_no, raw in enumerate(f, 1):
                raw = raw.rstrip(b"\r\n")
                if raw.strip():
                    yield doc_id, file_index, line_no, raw
                    doc_id += 1


def intermediate_items(path: str):
    with open(path, "rb") as f:
        for line in f:
            doc_id, _, raw = line.rstrip(b"\n").partition(b"\t")
            yield int(doc_id), -1, 0, raw


def chunked(items, size: int):
    chunk, nbytes = [], 0
    for item in items:
        chunk.append(item)
        nbytes += len(item[3]) + 1
        if len(chunk) == size:
            yield nbytes, chunk
            chunk, nbytes = [], 0
    if chunk:
        yield nbytes, chunk


class DocWriter:
    """Intermediate files carry the doc id ("id<TAB>json"); the final output is plain jsonl."""

    def __init__(self, path: str, with_ids: bool):
        self.f, self.with_ids, self.count = open(path, "w", encoding="utf-8"), with_ids, 0

    def write(self, doc_id: int, line: str):
        self.f.write(f"{doc_id}\t{line}\n" if self.with_ids else line + "\n")
        self.count += 1

    def close(self):
        self.f.close()


def dumps(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False)


# Each chunk function returns (results, {stage: CPU seconds}); the first pass also computes the dedup keys of the
# documents it keeps, so jieba segments a document once for the rules and the shingles.

def read_filter_chunk(items):
    cfg, out, cpu = _STATE["cfg"], [], Counter()
    for doc_id, file_index, line_no, raw in items:
        start = time.process_time()
        try:
            record = parse_record(raw, cfg.text_field)
        except BadLine as e:
            out.append((doc_id, None, e.reason, (file_index, line_no, str(e)), None))
            continue
        reason, view = None, None
        if "filter" in cfg.stages:
            record, reason, view = filter_record_view(record, cfg)
        middle = time.process_time()
        cpu["filter" if "filter" in cfg.stages else "read"] += middle - start
        keys = None
        if record is not None and "dedup" in cfg.stages:
            keys = dedup_keys(record, cfg, view)
            cpu["dedup: keys"] += time.process_time() - middle
        out.append((doc_id, dumps(record) if record else None, reason, None, keys))
    return out, cpu


def dedup_apply_chunk(items):
    cfg, out, start = _STATE["cfg"], [], time.process_time()
    for doc_id, _, _, raw in items:
        record, reason, cut = apply_dedup(doc_id, json.loads(raw), _STATE["removed"], _STATE["boilerplate"], cfg)
        out.append((doc_id, dumps(record) if record else None, reason, cut))
    return out, {"dedup: apply": time.process_time() - start}


def quality_score_chunk(items):
    cfg, lm, start = _STATE["cfg"], _STATE["lm"], time.process_time()
    out = [(doc_id, document_perplexity(json.loads(raw), lm, cfg)) for doc_id, _, _, raw in items]
    return out, {"quality: score": time.process_time() - start}


class Report:
    def __init__(self):
        self.passes, self.drops, self.malformed, self.n_malformed, self.info = [], Counter(), [], 0, {}
        self.cpu, self.cpu_docs = Counter(), Counter()  # per stage: CPU seconds summed over workers, documents

    def add_pass(self, name, docs_in, docs_out, seconds, nbytes):
        self.passes.append(dict(stage=name, docs_in=docs_in, docs_out=docs_out, dropped=docs_in - docs_out,
                                seconds=round(seconds, 2), docs_per_s=round(docs_in / max(seconds, 1e-9), 1),
                                mb_per_s=round(nbytes / 1e6 / max(seconds, 1e-9), 2)))

    def tables(self, docs_read: int, docs_written: int):
        import pandas as pd
        rows = [dict(stage="input", reason="lines read", docs=docs_read)]
        order = {stage: i for i, stage in enumerate(("input",) + STAGES)}
        rows += [dict(stage=s, reason=r, docs=n)
                 for (s, r), n in sorted(self.drops.items(), key=lambda item: (order[item[0][0]], -item[1]))]
        rows.append(dict(stage="output", reason="written", docs=docs_written))
        drops = pd.DataFrame(rows)
        drops["share_of_input"] = (drops["docs"] / max(docs_read, 1)).round(4)
        return drops, pd.DataFrame(self.passes)


def run_pass(name, fn, items, total_bytes, cfg, handle, report):
    """One parallel pass: feed chunks to fn, hand each result to handle(), time it, show a progress bar."""
    from tqdm import tqdm
    tqdm.monitor_interval = 0  # no monitor thread: the workers are forked from this process
    start, docs_in, nbytes = time.time(), 0, 0
    bar = tqdm(total=total_bytes, desc=name, unit="B", unit_scale=True, disable=cfg.quiet, file=sys.stderr)
    for chunk_bytes, (results, cpu) in parallel_map(fn, chunked(items, cfg.chunk_size), cfg.num_workers,
                                                    cfg.max_chunks_in_flight):
        report.cpu.update(cpu)
        for stage in cpu:
            report.cpu_docs[stage] += len(results)
        for result in results:
            handle(result)
        docs_in += len(results)
        nbytes += chunk_bytes
        bar.update(chunk_bytes)
    bar.close()
    return docs_in, time.time() - start, nbytes


def run_pipeline(cfg) -> dict:
    """Run the selected stages from cfg.input to cfg.output; returns the report dict (also saved to disk)."""
    t0, report = time.time(), Report()
    out_dir = os.path.dirname(os.path.abspath(cfg.output))
    os.makedirs(out_dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="clean_data_", dir=cfg.tmp_dir or out_dir)
    tmp_output = f"{cfg.output}.tmp-{os.getpid()}"
    last = [s for s in STAGES if s in cfg.stages][-1] if cfg.stages else "read"
    _STATE.clear()
    _STATE["cfg"] = cfg
    try:
        # pass 1: parse every line, report bad ones, apply stage 1, and emit the dedup keys of the kept documents
        path = tmp_output if last in ("read", "filter") else os.path.join(work, "after_filter.jsonl")
        writer = DocWriter(path, with_ids=path != tmp_output)
        stage = "filter" if "filter" in cfg.stages else "input"
        keys_store = DedupKeyStore(work, cfg) if "dedup" in cfg.stages else None

        def handle_read(result):
            doc_id, line, reason, bad, keys = result
            if keys is not None:
                keys_store.add(doc_id, keys)
            if bad is not None:
                report.n_malformed += 1
                if len(report.malformed) < cfg.max_reported_errors:
                    report.malformed.append(dict(file=cfg.input[bad[0]], line=bad[1], reason=reason, error=bad[2]))
                report.drops[("input", reason)] += 1
            elif line is None:
                report.drops[(stage, reason)] += 1
            else:
                writer.write(doc_id, line)

        total = sum(os.path.getsize(p) for p in cfg.input)
        name = ("filter" if stage == "filter" else "read") + (" + dedup keys" if keys_store else "")
        docs_read, seconds, nbytes = run_pass(name, read_filter_chunk, raw_items(cfg.input), total, cfg,
                                              handle_read, report)
        writer.close()
        report.add_pass(name, docs_read, writer.count, seconds, nbytes)
        n_ids, docs = docs_read, writer.count
        if "dedup" in cfg.stages:
            path, docs = run_dedup(cfg, report, work, path, keys_store, n_ids, tmp_output if last == "dedup" else None)
        if "quality" in cfg.stages:
            path, docs = run_quality(cfg, report, work, path, docs, tmp_output)
        os.replace(tmp_output, cfg.output)  # only a finished run appears under the final name
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if os.path.exists(tmp_output):
            os.remove(tmp_output)
    return finish_report(cfg, report, docs_read, docs, time.time() - t0)


class DedupKeyStore:
    """Where the first pass puts every kept document's dedup keys: (key, doc id) shards and signatures on disk."""

    def __init__(self, work: str, cfg):
        self.exact, self.bands, self.sentences = (ShardWriter(work, name, cfg.dedup_shards)
                                                  for name in ("exact", "band", "sentence"))
        self.signatures, self.count = SignatureStore(work, cfg.num_perm), 0

    def add(self, doc_id: int, keys: DedupKeys):
        self.exact.add([keys.exact], doc_id)
        self.bands.add(keys.bands, doc_id)
        self.sentences.add(keys.sentences, doc_id)
        if keys.signature is not None:
            self.signatures.add(doc_id, keys.signature)
        self.count += 1

    def remove_files(self):
        for writer in (self.exact, self.bands, self.sentences):
            for path in writer.paths:
                if os.path.exists(path):
                    os.remove(path)


def run_dedup(cfg, report, work, path, keys: DedupKeyStore, n_ids, final_path):
    # reduce: exact, then near duplicates among the rest, then boilerplate sentences among the survivors
    start, n = time.time(), keys.count
    removed = np.zeros(n_ids, dtype=np.uint8)
    exact_duplicates(keys.exact.shards(), removed)
    keys.signatures.close()
    n_candidates, n_edges = near_duplicates(keys.bands.shards(), removed, keys.signatures, cfg.verify_threshold) \
        if cfg.near_dedup else (0, 0)
    boilerplate = boilerplate_sentences(keys.sentences.shards(), removed, cfg.sentence_min_docs) \
        if cfg.sentence_min_docs > 0 else set()
    keys.remove_files()
    report.add_pass("dedup: reduce", n, n - int(np.count_nonzero(removed)), time.time() - start, 0)
    size = os.path.getsize(path)

    # map: drop duplicates, cut boilerplate sentences
    _STATE.update(removed=removed, boilerplate=boilerplate)
    out_path = final_path or os.path.join(work, "after_dedup.jsonl")
    writer = DocWriter(out_path, with_ids=final_path is None)
    sentences_cut, docs_cut, examples = 0, 0, Counter()

    def handle_apply(result):
        nonlocal sentences_cut, docs_cut
        doc_id, line, reason, cut = result
        if cut:
            sentences_cut += len(cut)
            docs_cut += 1
            if len(examples) < 10_000:
                examples.update(cut)
        if line is None:
            report.drops[("dedup", reason)] += 1
        else:
            writer.write(doc_id, line)

    n, seconds, nbytes = run_pass("dedup: apply", dedup_apply_chunk, intermediate_items(path), size, cfg,
                                  handle_apply, report)
    writer.close()
    os.remove(path)
    report.add_pass("dedup: apply", n, writer.count, seconds, nbytes)
    report.info["dedup"] = dict(
        lsh_bands=cfg.lsh_b, lsh_rows=cfg.lsh_r, minhash_threshold=cfg.minhash_threshold, num_perm=cfg.num_perm,
        shingle_size=cfg.shingle_size, exact_duplicates=int(np.count_nonzero(removed == EXACT)),
        near_duplicates=int(np.count_nonzero(removed == NEAR)), lsh_candidate_edges=n_candidates,
        verified_edges=n_edges, verify_threshold=cfg.verify_threshold,
        boilerplate_sentences=len(boilerplate), sentences_removed=sentences_cut,
        docs_with_sentences_removed=docs_cut, top_boilerplate=[s for s, _ in examples.most_common(10)])
    _STATE.pop("removed")
    return out_path, writer.count


def run_quality(cfg, report, work, path, docs, final_path):
    start = time.time()
    if cfg.reference and os.path.exists(cfg.reference):
        reference = cfg.reference
        texts = reference_texts(cfg.reference, cfg, cfg.reference_max_chars)
    else:
        # no reference corpus: score against the data itself, which still ranks noise and shuffles low
        reference = f"{cfg.reference} not found: first {cfg.reference_max_chars} chars of the input (fallback)"
        print(f"warning: {reference}", file=sys.stderr)
        texts = reference_texts_from_intermediate(path, cfg)
    lm, ref_chars = train_reference_lm(texts, cfg)
    report.add_pass("quality: train LM", 0, 0, time.time() - start, 0)

    pp_path = os.path.join(work, "perplexity.f64")
    pp_file = open(pp_path, "wb")
    _STATE["lm"] = lm
    buffer = []

    def handle_score(result):
        buffer.append(result[1])
        if len(buffer) >= 65536:
            np.array(buffer, dtype=np.float64).tofile(pp_file)
            buffer.clear()

    size = os.path.getsize(path)
    n, seconds, nbytes = run_pass("quality: score", quality_score_chunk, intermediate_items(path), size, cfg,
                                  handle_score, report)
    np.array(buffer, dtype=np.float64).tofile(pp_file)
    pp_file.close()
    _STATE.pop("lm")
    report.add_pass("quality: score", n, n, seconds, nbytes)

    # reduce: cutoffs from (a strided sample of) the perplexities
    perplexities = np.memmap(pp_path, dtype=np.float64, mode="r") if n else np.empty(0)
    stride = max(1, math.ceil(n / cfg.quantile_sample))
    sample = np.asarray(perplexities[::stride])
    sample = sample[np.isfinite(sample)]
    cutoffs = tuple(float(np.percentile(sample, p)) for p in cfg.bucket_percentiles) if len(sample) else (0.0, 0.0)

    # final map: bucket field, keep or drop
    start, writer, buckets = time.time(), DocWriter(final_path, with_ids=False), Counter()
    for (doc_id, _, _, raw), pp in zip(intermediate_items(path), perplexities):
        record = json.loads(raw)
        bucket = quality_bucket(float(pp), cutoffs)
        buckets[bucket] += 1
        if bucket not in cfg.keep_buckets:
            report.drops[("quality", f"quality_{bucket}")] += 1
            continue
        record["perplexity"], record["quality_bucket"] = round(float(pp), 2), bucket
        writer.write(doc_id, dumps(record))
    writer.close()
    del perplexities
    report.add_pass("quality: buckets", n, writer.count, time.time() - start, size)
    report.info["quality"] = dict(reference=reference, reference_chars=ref_chars, lm_order=cfg.lm_order,
                                  lm_unit=cfg.lm_unit, bucket_percentiles=list(cfg.bucket_percentiles),
                                  cutoffs=[round(c, 3) for c in cutoffs], buckets=dict(buckets),
                                  keep_buckets=sorted(cfg.keep_buckets))
    return final_path, writer.count


def reference_texts_from_intermediate(path: str, cfg):
    n_chars = 0
    for _, _, _, raw in intermediate_items(path):
        for text in record_texts(json.loads(raw), cfg.text_field):
            yield text
            n_chars += len(text)
            if n_chars >= cfg.reference_max_chars:
                return


def finish_report(cfg, report, docs_read, docs_written, seconds) -> dict:
    drops, passes = report.tables(docs_read, docs_written)
    # per stage, CPU time summed over the workers: docs_per_cpu_s is what one core does, whatever the worker count
    cpu = [dict(stage=stage, docs=report.cpu_docs[stage], cpu_seconds=round(report.cpu[stage], 2),
                docs_per_cpu_s=round(report.cpu_docs[stage] / max(report.cpu[stage], 1e-9), 1))
           for stage in report.cpu]
    peak = dict(parent_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                largest_worker_mb=round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1))
    result = dict(input=cfg.input, output=cfg.output, stages=list(cfg.stages), num_workers=cfg.num_workers,
                  docs_read=docs_read, docs_written=docs_written, seconds=round(seconds, 2), peak_rss=peak,
                  drops=drops.to_dict(orient="records"), passes=passes.to_dict(orient="records"), cpu_per_stage=cpu,
                  malformed_lines=dict(count=report.n_malformed, first=report.malformed), **report.info)
    prefix = cfg.report or cfg.output
    drops.to_csv(prefix + ".report.csv", index=False)
    with open(prefix + ".report.json", "w", encoding="utf-8") as f:
        json.dump(result, f, ensure_ascii=False, indent=1)
    if not cfg.quiet:
        import pandas as pd
        with pd.option_context("display.width", 120, "display.max_columns", 20, "display.max_rows", 200):
            print(passes.to_string(index=False))
            print()
            if cpu:
                print(pd.DataFrame(cpu).to_string(index=False))
                print()
            print(drops.to_string(index=False))
        for bad in report.malformed[:10]:
            print(f"malformed: {bad['file']}:{bad['line']} {bad['reason']}: {bad['error']}")
        if report.n_malformed > 10:
            print(f"... {report.n_malformed} malformed lines in all (first {len(report.malformed)} in the json)")
        for name in ("dedup", "quality"):
            if name in report.info:
                print(f"{name}: {json.dumps(report.info[name], ensure_ascii=False)}")
        print(f"peak RSS: {peak}; report: {prefix}.report.csv / .json")
    return result


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


def load_phrases(path, default):
    if path is None:
        return list(default)
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def phrase_regex(phrases: list):
    if not phrases:
        return None
    # ASCII phrases match whole words, case-insensitively; Chinese has no word boundaries to match
    parts = [rf"\b{re.escape(p)}\b" if p.isascii() else re.escape(p) for p in sorted(phrases, key=len, reverse=True)]
    return re.compile("|".join(parts), re.IGNORECASE)


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


def main(argv=None):
    cfg = make_config(argv if argv is not None else sys.argv[1:])
    for path in cfg.input:
        if not os.path.exists(path):
            raise SystemExit(f"input not found: {path}")
    run_pipeline(cfg)


if __name__ == "__main__":
    main()
