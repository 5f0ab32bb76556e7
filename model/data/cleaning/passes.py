"""The passes of a run, in the order clean_data.run_pipeline calls them: pass 1 parses, filters and emits the dedup
keys; the dedup reduce; the dedup apply pass; the quality passes (train the LM, score, cut into buckets). Each map
pass runs one of the chunk functions below on the workers."""

import json
import math
import os
import sys
import time
from collections import Counter

import numpy as np

from .dedup import (EXACT, NEAR, DedupKeyStore, apply_dedup, boilerplate_sentences, dedup_keys, exact_duplicates,
                    near_duplicates)
from .ngram_lm import document_perplexity, quality_bucket, reference_texts, train_reference_lm
from .records import BadLine, parse_record, record_texts
from .rules import filter_record_view
from .runner import DocWriter, dumps, intermediate_items, raw_items, run_pass

_STATE = {}  # what the per-chunk functions need; set before the workers fork, so it is never pickled


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


def run_filter(cfg, report, path: str, with_ids: bool, keys_store: DedupKeyStore = None) -> tuple:
    """Pass 1: parse every line, report bad ones, apply stage 1, write the kept documents to path and hand their
    dedup keys to keys_store (None without the dedup stage). Returns (lines read, documents written)."""
    _STATE.clear()  # a new run: nothing a previous run in this process left behind reaches the workers
    _STATE["cfg"] = cfg
    writer = DocWriter(path, with_ids=with_ids)
    stage = "filter" if "filter" in cfg.stages else "input"

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
    return docs_read, writer.count


def run_dedup_reduce(cfg, report, keys: DedupKeyStore, n_ids: int) -> tuple:
    """Exact, then near duplicates among the rest, then boilerplate sentences among the survivors.
    Returns (removed: KEPT / EXACT / NEAR per doc id, boilerplate sentence keys)."""
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
    # the apply pass adds what it cut to this entry
    report.info["dedup"] = dict(
        lsh_bands=cfg.lsh_b, lsh_rows=cfg.lsh_r, minhash_threshold=cfg.minhash_threshold, num_perm=cfg.num_perm,
        shingle_size=cfg.shingle_size, exact_duplicates=int(np.count_nonzero(removed == EXACT)),
        near_duplicates=int(np.count_nonzero(removed == NEAR)), lsh_candidate_edges=n_candidates,
        verified_edges=n_edges, verify_threshold=cfg.verify_threshold, boilerplate_sentences=len(boilerplate))
    return removed, boilerplate


def run_dedup_apply(cfg, report, work, path, removed, boilerplate, final_path) -> tuple:
    """Drop the duplicates and cut the boilerplate sentences, from path into final_path (or an intermediate file in
    work when a later stage follows). Returns (path written, documents written)."""
    size = os.path.getsize(path)
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
    report.info["dedup"].update(sentences_removed=sentences_cut, docs_with_sentences_removed=docs_cut,
                                top_boilerplate=[s for s, _ in examples.most_common(10)])
    _STATE.pop("removed")
    return out_path, writer.count


def run_quality(cfg, report, work, path, docs, final_path):
    """Stage 3: train the reference LM, score every document (map), perplexity cutoffs (reduce), then label each
    document with its bucket and keep the --keep_buckets ones (map), into final_path."""
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
