"""Pretraining data (`{"text": ...}` per line; or a parquet file, datasets folder or JSON array with a "text" field,
or a .txt file of one document per line: formats.py), tokenized once into a uint16 memmap cache beside the data, then
served as packed windows: documents are concatenated end to end (`<|im_start|> text <|im_end|>` each) and cut into
max_seq_len-token windows, so no FLOP is spent on padding. Files of any size work: neither the text nor the tokens
are ever held in RAM (but for a JSON array's text: it is parsed whole)."""
import json
import os

import numpy as np
import torch
from torch.utils.data import Dataset

from .formats import open_source
from .jsonl import (BadInput, file_size, no_usable, read_cache_summary, refuse_skipped_lines, remove_files,
                    sweep_stale_temps, token_cache_path)
from ..files import temp_path


def build_token_cache(data_path: str, tokenizer, cache_file: str, skip_bad_lines: bool = False,
                      chunk_docs: int = 2048, show_progress: bool = True) -> dict:
    """Tokenize every document into one flat uint16 file (uint32 for vocabularies over 65,536) plus a JSON
    summary with the document lengths' histogram and the lines skipped. Both are written to temp names and renamed,
    the summary last: a cache whose summary exists is complete. A failed build removes its temp files; a killed
    one's are removed by the next build."""
    from tqdm import tqdm
    source = open_source(data_path, "pretrain", skip_bad_lines)
    dtype = np.uint16 if len(tokenizer) <= 65536 else np.uint32
    directory = os.path.dirname(cache_file)
    os.makedirs(directory, exist_ok=True)
    sweep_stale_temps(directory, os.path.basename(os.path.normpath(data_path)) + ".")
    tmp, summary_tmp = temp_path(cache_file), temp_path(cache_file + ".json")
    stats = {"bad_lines": 0}
    lengths, total_tokens = [], 0
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    progress = tqdm(total=source.progress_total(), unit="B" if source.unit == "line" else " records",
                    unit_scale=source.unit == "line", disable=not show_progress,
                    desc=f"tokenizing {os.path.basename(os.path.normpath(data_path))}")

    def flush(texts, out):
        nonlocal total_tokens
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            doc = np.asarray([bos, *ids, eos], dtype=dtype)
            out.write(doc.tobytes())
            lengths.append(len(doc))
            total_tokens += len(doc)

    try:
        with open(tmp, "wb") as out:
            texts = []
            for _, obj in source.records(skip_bad_lines, stats, on_progress=progress.update):
                texts.append(obj["text"])
                if len(texts) >= chunk_docs:  # batches let the Rust tokenizer use every core
                    flush(texts, out)
                    texts = []
            if texts:
                flush(texts, out)
        progress.n = progress.total or progress.n
        if total_tokens == 0:
            raise no_usable(data_path, "documents", stats, unit=source.unit)
        summary = {"documents": len(lengths), "tokens": total_tokens, "bad_lines": stats["bad_lines"],
                   "unit": source.unit, "bad_line_numbers": stats.get("bad_line_numbers", [])[:100],
                   "first_bad_line": stats.get("first_bad_line"), "dtype": np.dtype(dtype).name, "lengths": lengths}
        with open(summary_tmp, "w") as f:
            json.dump(summary, f)
        remove_files([cache_file + ".json"])  # an old, damaged summary must not vouch for the new tokens
        os.replace(tmp, cache_file)
        os.replace(summary_tmp, cache_file + ".json")
    except BaseException:
        remove_files([tmp, summary_tmp])
        raise
    finally:
        progress.close()
    return summary


def check_token_cache(cache_file: str):
    """What read_cache_summary asks of a pretraining cache: the tokens file holds exactly the summary's tokens."""
    def check(summary: dict) -> str | None:
        expected = summary["tokens"] * np.dtype(summary["dtype"]).itemsize
        if file_size(cache_file) != expected or len(summary["lengths"]) != summary["documents"]:
            return f"{file_size(cache_file)} bytes of tokens, the summary says {expected}"
        if not {"bad_lines", "bad_line_numbers", "first_bad_line"} <= summary.keys():
            return "the summary lacks the skipped lines"
        return None
    return check


class PretrainDataset(Dataset):
    """Packed next-token windows over a tokenized corpus. Item i is tokens[i*L : (i+1)*L] as both
    input_ids and labels (the model shifts labels itself); documents run into each other, separated by their
    <|im_start|>/<|im_end|> markers, so every position is a real training token."""

    def __init__(self, data_path: str, tokenizer, max_seq_len: int, cache_dir: str | None = None,
                 skip_bad_lines: bool = False, show_progress: bool = True):
        self.data_path, self.max_seq_len = data_path, max_seq_len
        if not os.path.exists(data_path):
            raise FileNotFoundError(f"data file not found: {data_path}")
        self.cache_file = token_cache_path(data_path, tokenizer, cache_dir)
        self.summary = read_cache_summary(self.cache_file, [""], check_token_cache(self.cache_file))
        if self.summary is None:
            self.summary = build_token_cache(data_path, tokenizer, self.cache_file, skip_bad_lines,
                                             show_progress=show_progress)
        refuse_skipped_lines(self.summary, skip_bad_lines)
        if self.summary["bad_lines"]:
            unit = self.summary.get("unit", "line")
            print(f"{data_path}: skipped {self.summary['bad_lines']} bad {unit}s "
                  f"(first at {unit}s {self.summary['bad_line_numbers'][:5]})")
        self.tokens = np.memmap(self.cache_file, dtype=self.summary["dtype"], mode="r")
        self.num_windows = len(self.tokens) // max_seq_len
        if self.num_windows == 0:
            raise BadInput(f"{data_path}: only {len(self.tokens)} tokens, fewer than one {max_seq_len}-token window")

    def __len__(self):
        return self.num_windows

    def __getitem__(self, index):
        start = index * self.max_seq_len
        window = torch.from_numpy(self.tokens[start:start + self.max_seq_len].astype(np.int64))
        return {"input_ids": window, "labels": window}

    def padding_fraction_if_padded(self) -> float:
        """The share of positions that would be padding if each document were padded (or truncated) to
        max_seq_len on its own, as MiniMind does. Packing makes this zero."""
        lengths = np.minimum(np.asarray(self.summary["lengths"]), self.max_seq_len)
        return float(1 - lengths.sum() / (len(lengths) * self.max_seq_len))
