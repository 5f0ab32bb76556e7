"""Reading MiniMind-format jsonl: every reader names the file and line of bad input, and token caches are keyed by
the data file and the tokenizer so a stale one is never reused."""
import hashlib
import json
import os

CACHE_FORMAT_VERSION = 1


class BadInput(ValueError):
    """Malformed input data; the message starts with `path:line:`."""


def iter_jsonl(path: str, skip_bad_lines: bool = False, stats: dict | None = None, validate=None, on_bytes=None):
    """Yield (line_number, object) for each JSON line. Blank lines are skipped. A line that is not a JSON object,
    or that `validate(obj)` rejects (by returning a reason string), raises BadInput("path:line: reason"), or is
    skipped and counted in stats["bad_lines"] when skip_bad_lines is set."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file not found: {path}")
    if os.path.getsize(path) == 0:
        raise BadInput(f"{path}: the file is empty")
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            if on_bytes is not None:
                on_bytes(len(raw))
            if not raw.strip():
                continue
            obj, reason = parse_line(raw, validate)
            if reason is not None:
                note_bad_line(path, line_number, reason, skip_bad_lines, stats)
                continue
            yield line_number, obj


def parse_line(raw: bytes, validate=None) -> tuple[dict | None, str | None]:
    """(object, None) for a good JSON-object line, (None or object, why not) for a bad one."""
    try:
        obj = json.loads(raw)
        reason = None if isinstance(obj, dict) else f"expected a JSON object, got {type(obj).__name__}"
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        obj, reason = None, f"not valid JSON ({error})"
    if reason is None and validate is not None:
        reason = validate(obj)
    return obj, reason


def note_bad_line(path: str, line_number: int, reason: str, skip_bad_lines: bool, stats: dict | None):
    if not skip_bad_lines:
        raise BadInput(f"{path}:{line_number}: {reason} (pass --skip_bad_lines 1 to skip such lines)")
    if stats is not None:
        stats["bad_lines"] = stats.get("bad_lines", 0) + 1
        stats.setdefault("bad_line_numbers", []).append(line_number)


def default_val_path(data_path: str) -> str | None:
    """The held-out twin beside a data file (demo.jsonl -> demo_val.jsonl), if it exists."""
    root, ext = os.path.splitext(data_path)
    candidate = f"{root}_val{ext}"
    return candidate if os.path.exists(candidate) else None


def tokenizer_fingerprint(tokenizer) -> str:
    """Changes whenever the vocabulary or merges change, so a stale token cache is never reused."""
    state = tokenizer.backend_tokenizer.to_str() if hasattr(tokenizer, "backend_tokenizer") else str(tokenizer.vocab)
    state += str(getattr(tokenizer, "chat_template", None))  # chat caches hold rendered conversations
    return hashlib.sha1(state.encode()).hexdigest()[:12]


def token_cache_path(data_path: str, tokenizer, cache_dir: str | None = None, suffix: str = "tokens") -> str:
    stat = os.stat(data_path)
    key = f"{os.path.abspath(data_path)}|{stat.st_size}|{stat.st_mtime_ns}|{tokenizer_fingerprint(tokenizer)}|" \
          f"{CACHE_FORMAT_VERSION}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    cache_dir = cache_dir or os.path.join(os.path.dirname(os.path.abspath(data_path)), ".cache")
    return os.path.join(cache_dir, f"{os.path.basename(data_path)}.{digest}.{suffix}")
