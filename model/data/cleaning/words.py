"""Words, as the rules, the shingles and the word LM count them: jieba's for Chinese, and for English a small copy of
the spaCy tokenizer datatrove uses, so the Gopher rules agree with datatrove without needing spaCy."""

import logging
import re

CONTENT_CHAR_RE = re.compile(r"[^\W_]")  # a letter (any script) or a digit


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
