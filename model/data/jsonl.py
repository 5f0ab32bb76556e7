"""Reading jsonl (the other formats are turned into it record by record in formats.py): every reader names the file
and line of bad input, and token caches are keyed by the data (file, or the files of a folder), the format converters'
version and the tokenizer, so a stale one is never reused. A cache is complete or absent: its parts are written
under temp names and renamed, its summary last, and a summary that does not match its parts makes it count as
absent, so it is rebuilt."""
import hashlib
import json
import os
import re

from ..files import TEMP_SUFFIX, remove_stale_temps

CACHE_FORMAT_VERSION = 2  # 2: caches record their first bad line, so a reuse without --skip_bad_lines can refuse

# JSON may escape half of a UTF-16 surrogate pair on its own (\ud800); Python decodes it into a str that neither the
# tokenizer nor a UTF-8 writer accepts. Only lines holding such an escape are searched for one.
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class BadInput(ValueError):
    """Malformed input data; the message starts with the path (`path:line:` or `path: record N:` for a bad record,
    `path:` for a whole file)."""


def iter_lines(path: str, on_bytes=None):
    """Yield (line_number, raw bytes) of each non-blank line; `on_bytes(n)` is told the size of every line read."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file not found: {path}")
    if os.path.getsize(path) == 0:
        raise BadInput(f"{path}: the file is empty")
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            if on_bytes is not None:
                on_bytes(len(raw))
            if raw.strip():
                yield line_number, raw


def decode_line(raw: bytes) -> str:
    """A line's text: strict UTF-8, less a leading byte-order mark (Windows editors write one before the first
    line). The trainers and clean_data decode lines here, so they agree on which lines are text."""
    return raw.decode("utf-8-sig")


def has_lone_surrogate(value) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(has_lone_surrogate(k) or has_lone_surrogate(v) for k, v in value.items())
    return isinstance(value, list) and any(has_lone_surrogate(v) for v in value)


def load_line(raw: bytes) -> tuple[object, str | None, str | None]:
    """(JSON value, None, None) of a good line, else (None, code, why): code is clean_data's reason code."""
    try:
        obj = json.loads(decode_line(raw))
    except UnicodeDecodeError as error:
        return None, "invalid_utf8", f"not valid UTF-8 ({error})"
    except (json.JSONDecodeError, RecursionError) as error:  # RecursionError: arrays nested thousands deep
        return None, "malformed_json", f"not valid JSON ({error})"
    if SURROGATE_ESCAPE.search(raw) and has_lone_surrogate(obj):
        return None, "invalid_utf8", "not valid text: a string holds half a UTF-16 surrogate pair (a \\ud800 escape)"
    return obj, None, None


def parse_line(raw: bytes, validate=None) -> tuple[dict | None, str | None]:
    """(object, None) for a good JSON-object line, (None or object, why not) for a bad one."""
    obj, _, reason = load_line(raw)
    if reason is None and not isinstance(obj, dict):
        reason = f"expected a JSON object, got {type(obj).__name__}"
    if reason is None and validate is not None:
        reason = validate(obj)
    return obj, reason


def location(path: str, number: int, unit: str = "line") -> str:
    """Where a bad record is: `path:12` for a line of a text file, `path: record 17` for the 18th record of a JSON
    array, parquet file or datasets folder (counted from 0, as pandas and datasets index them)."""
    return f"{path}:{number}" if unit == "line" else f"{path}: {unit} {number}"


def note_bad_line(path: str, line_number: int, reason: str, skip_bad_lines: bool, stats: dict | None,
                  unit: str = "line"):
    where = location(path, line_number, unit)
    if not skip_bad_lines:
        raise BadInput(f"{where}: {reason} (pass --skip_bad_lines 1 to skip such {unit}s)")
    if stats is not None:
        stats["bad_lines"] = stats.get("bad_lines", 0) + 1
        stats.setdefault("bad_line_numbers", []).append(line_number)
        stats.setdefault("first_bad_line", f"{where}: {reason}")


def no_usable(path: str, what: str, stats: dict, note: str = "", unit: str = "line") -> BadInput:
    """The error of a file with nothing to train on: blank, or every line bad and skipped (or dropped: `note`)."""
    detail = f"; the first bad {unit}: {stats['first_bad_line']}" if stats.get("first_bad_line") else ""
    return BadInput(f"{path}: no usable {what}: {stats.get('lines', 0)} {unit}s, {stats.get('bad_lines', 0)} "
                    f"skipped{note}{detail}")


def refuse_skipped_lines(summary: dict, skip_bad_lines: bool):
    """A cache built with --skip_bad_lines 1 left lines out; reused without the flag, that is the first bad line's
    error, as if the file were read again."""
    if summary["bad_lines"] and not skip_bad_lines:
        raise BadInput(f"{summary['first_bad_line']} (pass --skip_bad_lines 1 to skip such lines; "
                       f"{summary['bad_lines']} lines were skipped when the token cache was built)")


def default_val_path(data_path: str) -> str | None:
    """The held-out twin beside a data file or folder (demo.jsonl -> demo_val.jsonl, chats/ -> chats_val/), if it
    exists."""
    root, ext = os.path.splitext(os.path.normpath(data_path))
    candidate = f"{root}_val{ext}"
    return candidate if os.path.exists(candidate) else None


def tokenizer_fingerprint(tokenizer) -> str:
    """Changes whenever the vocabulary or merges change, so a stale token cache is never reused."""
    state = tokenizer.backend_tokenizer.to_str() if hasattr(tokenizer, "backend_tokenizer") else str(tokenizer.vocab)
    state += str(getattr(tokenizer, "chat_template", None))  # chat caches hold rendered conversations
    return hashlib.sha1(state.encode()).hexdigest()[:12]


def data_signature(path: str) -> str:
    """Changes whenever the data changes: a file's size and mtime, or those of every file inside a folder (a
    datasets save_to_disk folder, whose own mtime misses a shard rewritten in place). Hidden entries are left out,
    so a cache_dir inside the folder does not change the key of the cache it holds."""
    if not os.path.isdir(path):
        stat = os.stat(path)
        return f"{stat.st_size}|{stat.st_mtime_ns}"
    entries = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(name for name in dirs if not name.startswith("."))
        for name in sorted(name for name in files if not name.startswith(".")):
            stat = os.stat(os.path.join(root, name))
            entries.append(f"{os.path.relpath(os.path.join(root, name), path)}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha1("|".join(entries).encode()).hexdigest()


def token_cache_path(data_path: str, tokenizer, cache_dir: str | None = None, suffix: str = "tokens") -> str:
    from .formats import FORMATS_VERSION  # formats.py builds on this module; a change in its converters is a new key
    data_path = os.path.normpath(data_path)  # a folder given as "chats/" is still named "chats"
    key = f"{os.path.abspath(data_path)}|{data_signature(data_path)}|{tokenizer_fingerprint(tokenizer)}|" \
          f"{CACHE_FORMAT_VERSION}|{FORMATS_VERSION}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    cache_dir = cache_dir or os.path.join(os.path.dirname(os.path.abspath(data_path)), ".cache")
    return os.path.join(cache_dir, f"{os.path.basename(data_path)}.{digest}.{suffix}")


# ------------------------------------------------------------------------------------------------ cache files

def sweep_stale_temps(directory: str, prefix: str):
    """Remove the temp files (names starting with `prefix`) of builds on this host whose process is gone: killed
    (kill -9, SIGTERM, out of memory) before they could clean up."""
    if not os.path.isdir(directory):
        return
    names = [name for name in sorted(os.listdir(directory)) if name.startswith(prefix) and TEMP_SUFFIX.search(name)]
    for path in remove_stale_temps([os.path.join(directory, name) for name in names]):
        pid = TEMP_SUFFIX.search(path).group(2)
        print(f"removed {path}: left by a build (process {pid}) that was killed")


def remove_files(paths):
    for path in paths:
        if os.path.exists(path):
            os.remove(path)


def read_cache_summary(cache_file: str, parts: list[str], check) -> dict | None:
    """The summary (cache_file + ".json") of a complete cache, or None when there is none to use: no summary (never
    built, or a build killed before its last rename) or a damaged one (unreadable, or `check(summary)` finds that
    the parts do not match it). Both are reported when parts exist, and the caller rebuilds."""
    path = cache_file + ".json"
    if not os.path.exists(path):
        if any(os.path.exists(cache_file + part) for part in parts):
            print(f"token cache {cache_file} is incomplete (its build was interrupted); rebuilding it")
        return None
    try:
        with open(path) as f:
            summary = json.load(f)
        reason = check(summary)
    except (OSError, ValueError, KeyError, TypeError) as error:
        reason = f"{type(error).__name__}: {error}"
    if reason is None:
        return summary
    print(f"token cache {cache_file} is damaged ({reason}); rebuilding it")
    return None


def file_size(path: str) -> int:
    return os.path.getsize(path) if os.path.exists(path) else -1
