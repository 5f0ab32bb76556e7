"""How fast conversations become training tokens: the chat cache of SFTDataset (or DPODataset, --kind dpo)
built with 1 and with N processes, then reopened. Rendering the chat template is the slow part of every chat
stage's start (SFT, LoRA, distillation, DPO); this says how long MiniMind's files will take.

    python -m scripts.bench.bench_tokenize               # demo_sft.jsonl repeated to ~20 MB, 1 vs all cores
    python -m scripts.bench.bench_tokenize --kind dpo    # demo_dpo.jsonl repeated
    python -m scripts.bench.bench_tokenize --data_path dataset/sft_mini_512.jsonl --num_proc 1 16

Each build writes to a fresh temporary cache directory, so nothing is reused between the timed builds.
"""
import argparse
import os
import shutil
import tempfile
import time

from transformers import AutoTokenizer

from model.data.chat import SFTDataset
from model.data.preference import DPODataset

FULL_SIZE_MB = {"sft": ("sft_mini_512", 1200), "dpo": ("dpo", 900)}  # MiniMind's files


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", default="sft", choices=["sft", "dpo"], help="SFT conversations or DPO pairs")
    parser.add_argument("--data_path", default=None,
                        help="file to tokenize (default: dataset/demo_<kind>.jsonl repeated to --target_mb)")
    parser.add_argument("--target_mb", type=float, default=20, help="size of the default input")
    parser.add_argument("--tokenizer_path", default="model", help="directory with the tokenizer")
    parser.add_argument("--num_proc", type=int, nargs="+", default=[1, os.cpu_count() or 1],
                        help="process counts to time")
    parser.add_argument("--max_seq_len", type=int, default=1024, help="applied when the cache is opened")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_path)
    scratch = tempfile.mkdtemp(prefix="bench_tokenize_")
    try:
        data_path = args.data_path
        if data_path is None:
            data_path = os.path.join(scratch, f"demo_{args.kind}_repeated.jsonl")
            with open(f"dataset/demo_{args.kind}.jsonl", "rb") as f:
                demo = f.read()
            with open(data_path, "wb") as f:
                for _ in range(max(1, round(args.target_mb * 1e6 / len(demo)))):
                    f.write(demo)
        size_mb = os.path.getsize(data_path) / 1e6
        print(f"{data_path}: {size_mb:.1f} MB; {os.cpu_count()} CPU cores")
        results, dataset_class = {}, SFTDataset if args.kind == "sft" else DPODataset
        full_name, full_mb = FULL_SIZE_MB[args.kind]
        for num_proc in args.num_proc:
            cache_dir = os.path.join(scratch, f"cache_{num_proc}")
            start = time.perf_counter()
            dataset = dataset_class(data_path, tokenizer, args.max_seq_len, show_progress=False, cache_dir=cache_dir,
                                    num_proc=num_proc)
            built = time.perf_counter() - start
            start = time.perf_counter()
            dataset_class(data_path, tokenizer, args.max_seq_len, show_progress=False, cache_dir=cache_dir)
            reopened = time.perf_counter() - start
            results[num_proc] = {"seconds": built, "mb_per_s": size_mb / built, "reopen_seconds": reopened}
            print(f"{num_proc:>3} proc: {built:6.1f} s, {size_mb / built:5.2f} MB/s, {len(dataset) / built:8,.0f} "
                  f"{'conversations' if args.kind == 'sft' else 'pairs'}/s; reopening the cache: {reopened:.2f} s; "
                  f"{full_name}.jsonl ({full_mb} MB) would take {full_mb / (size_mb / built) / 60:.1f} min")
        return results
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
