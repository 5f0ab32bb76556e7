"""Stage 3: an interpolated Kneser-Ney n-gram LM over characters or words (our own, small enough to read), trained
on reference text; CCNet-style document perplexity and the head / middle / tail buckets it is cut into."""

import math
from collections import Counter

from .records import BadLine, joined_text, parse_record, record_texts
from .rules import DocView
from .text import DIGIT_RE, WHITESPACE_RE, detect_language, normalize_text
from .words import tokenize


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
