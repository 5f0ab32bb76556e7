"""Stage 1: each rule looks at one normalized document (a DocView) and returns a reason code to drop it, or None;
filter_record normalizes a record and runs RULES in order until one fails. One small function per rule keeps each
threshold, its flag and its reason code side by side."""

import re
from collections import Counter
from functools import cached_property

from .records import record_kind, record_texts, with_texts
from .text import CJK_RE, WHITESPACE_RE, count_matches, detect_language, normalize_text
from .words import english_words, is_symbol_token, jieba_words

SYMBOL_RE = re.compile(r"[^\w\s]|_")  # \w covers letters of every script, digits and CJK; '_' counts as symbol
PARAGRAPH_RE = re.compile(r"\n{2,}")
LINES_RE = re.compile("\n+")
STOP_WORDS = {"the", "be", "to", "of", "and", "that", "have", "with"}  # Gopher / datatrove

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
    if kind == "conversation":
        turns = record["conversations"]
        if not all(text or turn.get("tool_calls") for text, turn in zip(texts, turns)):  # tool calls: not empty
            return None, "empty_turn", None
    if not any(texts):
        return None, "empty", None
    view = DocView("\n".join(texts), kind, cfg)
    reason = first_failed_rule(view, cfg)
    if reason:
        return None, reason, view
    return with_texts(record, cfg.text_field, texts), None, view
