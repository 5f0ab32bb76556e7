"""The machinery every pass shares: input lines as (doc id, file, line, bytes) items, chunks of them mapped by
forked workers in input order with a bounded number in flight, intermediate files that carry the doc id, and
run_pass, which ties these together with timing and a progress bar."""

import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import deque

from ...files import writer_may_run

WORK_PREFIX = "clean_data_"


def make_work_dir(parent: str) -> str:
    """A fresh work folder for a run's intermediate files, with an `owner` file (host and pid) so that a later run
    can tell a killed run's folder (kill -9 leaves it, with partial data) from a live one's; it removes those."""
    os.makedirs(parent, exist_ok=True)
    sweep_stale_work_dirs(parent)
    work = tempfile.mkdtemp(prefix=WORK_PREFIX, dir=parent)
    with open(os.path.join(work, "owner"), "w") as f:
        f.write(f"{socket.gethostname()} {os.getpid()}\n")
    return work


def sweep_stale_work_dirs(parent: str):
    for name in sorted(os.listdir(parent)):
        path = os.path.join(parent, name)
        if not name.startswith(WORK_PREFIX) or not os.path.isdir(path):
            continue
        try:
            with open(os.path.join(path, "owner")) as f:
                host, pid = f.read().split()
            written = os.path.getmtime(os.path.join(path, "owner"))
        except (OSError, ValueError):  # no owner: being created right now, or not ours to judge
            continue
        if host == socket.gethostname() and not writer_may_run(int(pid), written):
            shutil.rmtree(path, ignore_errors=True)
            print(f"removed {path}: the work folder of a clean_data run (process {pid}) that was killed",
                  file=sys.stderr)


def _worker_init():
    # a forked worker inherits the parent's SIGTERM handler (clean up and exit); Pool.terminate() must just end it
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def parallel_map(fn, chunks, num_workers: int, max_in_flight: int):
    """Yield (chunk bytes, fn(chunk items)) in input order, with at most max_in_flight chunks queued
    (Pool.imap would read the whole input ahead into memory)."""
    if num_workers <= 1:
        for nbytes, items in chunks:
            yield nbytes, fn(items)
        return
    import multiprocessing as mp
    pool = mp.get_context("fork").Pool(num_workers, initializer=_worker_init)
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
