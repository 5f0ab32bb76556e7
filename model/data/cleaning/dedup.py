"""Stage 2 as map and reduce. Map: a document's exact key, MinHash signature, LSH band keys and sentence keys.
Shuffle: (key, doc id) pairs partitioned by key into shard files, so a reduce holds one shard at a time. Reduce:
exact duplicates, near-duplicates (verified LSH candidates, union-find) and boilerplate sentences. Last map: drop
the duplicates and cut the boilerplate sentences."""

import hashlib
import os
import re
from dataclasses import dataclass, field

import numpy as np

from .records import joined_text, record_kind, with_texts
from .rules import DocView
from .text import DIGIT_RE, WHITESPACE_RE
from .words import is_symbol_token

# English words for shingles (the rules count words with words.english_words, which mimics spaCy)
EN_TOKEN_RE = re.compile(r"\w+(?:[.'’]\w+)*|\.\.\.|[^\w\s]")
SENTENCE_END_CHARS = set("。！？!?；;…\n")
# a sentence: anything up to terminal punctuation (a '.' only before whitespace), closing quotes, trailing space
SENTENCE_RE = re.compile(
    r"(?:[^。！？!?；;…\n.]|\.(?!\s|$))*(?:(?:[。！？!?；;…]+|\.+(?=\s|$))[”’\"'」』）)\]]*)?[ \t]*\n*"
)

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
