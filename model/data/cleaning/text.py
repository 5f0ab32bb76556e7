"""Text as every stage sees it: Unicode normalization that keeps the punctuation Chinese text uses, optional
traditional -> simplified, control characters removed; and the character classes that tell Chinese from English."""

import re
import unicodedata

CJK_RANGES = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"
CJK_RE = re.compile(f"[{CJK_RANGES}]")
LATIN_RE = re.compile(r"[A-Za-z]")
WHITESPACE_RE = re.compile(r"\s+")
DIGIT_RE = re.compile(r"\d")
# C0/C1 controls except \t \n \r (handled as whitespace), zero-width and bidi-override characters, BOM
CONTROL_RE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")
# NFKC folds these full-width forms to ASCII (，-> ,); Chinese text uses the full-width ones, so keep them
CJK_PUNCT_KEPT = "，！？：；（）～…"
NFKC_SEGMENT_RE = re.compile(f"[^{re.escape(CJK_PUNCT_KEPT)}]+")
ZH_MIN_CJK_SHARE = 0.2  # a document is treated as Chinese when CJK >= 20% of CJK + Latin letters


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


def count_matches(pattern: re.Pattern, text: str) -> int:
    return len(text) - len(pattern.sub("", text))  # counts single-character matches at C speed


def detect_language(text: str) -> str:
    cjk, latin = count_matches(CJK_RE, text), count_matches(LATIN_RE, text)
    return "zh" if cjk and cjk >= ZH_MIN_CJK_SHARE * (cjk + latin) else "en"
