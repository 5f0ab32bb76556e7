"""The data readers under bad input (issue 18): every bad line is an error naming file and line, or skipped and
counted with skip_bad_lines; token caches are complete or absent, and a failed or killed build leaves nothing behind.
clean_data's side (the shared checks, its work folder) is in tests/tools/test_clean_data.py."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

import model.data.pretrain as pretrain_module
from model.data.chat import SFTDataset
from model.data.jsonl import BadInput, token_cache_path
from model.data.preference import DPODataset
from model.data.pretrain import PretrainDataset
from model.data.prompts import PromptDataset


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def write_lines(path, rows) -> str:
    """rows: dicts (written as JSON) or raw strings/bytes (written as they are), one per line."""
    with open(path, "wb") as f:
        for row in rows:
            row = json.dumps(row, ensure_ascii=False) if isinstance(row, (dict, list)) else row
            f.write((row.encode() if isinstance(row, str) else row) + b"\n")
    return str(path)


def texts(count=20):
    return [{"text": f"document {i}: the moon over the river, the wind in the pines."} for i in range(count)]


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# ================================================================================ D1: failed builds leave nothing


def test_a_failed_pretrain_cache_build_leaves_no_temp_file(tokenizer, tmp_path):
    data = write_lines(tmp_path / "corpus.jsonl", texts() + ["{broken"])
    cache_dir = tmp_path / "cache"
    with pytest.raises(BadInput, match=rf"{data}:21: not valid JSON"):
        PretrainDataset(data, tokenizer, 16, str(cache_dir), show_progress=False)
    assert list(cache_dir.iterdir()) == []


def test_an_exception_inside_the_pretrain_tokenizing_leaves_no_temp_file(tmp_path):
    data = write_lines(tmp_path / "corpus.jsonl", texts())
    cache_dir = tmp_path / "cache"

    class Crash(RuntimeError):
        pass

    class CrashingTokenizer:
        """Fails on its first batch, once the temp file is open (as a worker's error or a full disk would)."""
        bos_token_id, eos_token_id = 1, 2

        def __len__(self):
            return 6400

        def __call__(self, texts, **kwargs):
            raise Crash("tokenizer failed")

    with pytest.raises(Crash):
        pretrain_module.build_token_cache(data, CrashingTokenizer(), str(cache_dir / "c.tokens"), show_progress=False)
    assert list(cache_dir.iterdir()) == []


def test_a_build_sweeps_the_temp_files_of_killed_builds_only(tokenizer, tmp_path, capsys):
    data = write_lines(tmp_path / "corpus.jsonl", texts())
    cache_file = token_cache_path(data, tokenizer, str(tmp_path / "cache"))
    os.makedirs(os.path.dirname(cache_file))
    dead, host = dead_pid(), socket.gethostname()
    stale = [f"{cache_file}.tmp.{dead}", f"{cache_file}.tmp.{host}.{dead}", f"{cache_file}.json.tmp.{host}.{dead}"]
    kept = [f"{cache_file}.tmp.{host}.1",  # pid 1 is alive: a build still running
            f"{cache_file}.tmp.some-other-host.{dead}",  # another host's on a shared disk: its pids are not ours
            os.path.join(os.path.dirname(cache_file), f"unrelated.jsonl.tmp.{dead}")]  # not this data file's
    for path in stale + kept:
        open(path, "w").close()
    PretrainDataset(data, tokenizer, 16, str(tmp_path / "cache"), show_progress=False)
    assert not any(os.path.exists(path) for path in stale) and all(os.path.exists(path) for path in kept)
    assert f"left by a build (process {dead}) that was killed" in capsys.readouterr().out


# =================================================================== D5: a skip-built cache is not reused silently


def test_a_pretrain_cache_built_with_skip_bad_lines_is_refused_without_the_flag(tokenizer, tmp_path):
    data = write_lines(tmp_path / "corpus.jsonl", texts(10) + [{"txt": "wrong field"}] + texts(10))
    cache_dir = str(tmp_path / "cache")
    assert PretrainDataset(data, tokenizer, 16, cache_dir, skip_bad_lines=True, show_progress=False) \
        .summary["bad_lines"] == 1
    with pytest.raises(BadInput, match=rf'{data}:11: missing the "text" field \(pass --skip_bad_lines 1'):
        PretrainDataset(data, tokenizer, 16, cache_dir, show_progress=False)
    assert len(PretrainDataset(data, tokenizer, 16, cache_dir, skip_bad_lines=True, show_progress=False))


# ======================================================================== D7: caches are complete or absent


def test_pretrain_tokens_without_their_summary_are_rebuilt(tokenizer, tmp_path, capsys):
    """A kill between the tokens' rename and the summary's used to break every later run."""
    data = write_lines(tmp_path / "corpus.jsonl", texts())
    first = PretrainDataset(data, tokenizer, 16, str(tmp_path / "cache"), show_progress=False)
    os.remove(first.cache_file + ".json")
    again = PretrainDataset(data, tokenizer, 16, str(tmp_path / "cache"), show_progress=False)
    assert "is incomplete" in capsys.readouterr().out
    assert np.array_equal(first.tokens, again.tokens)


@pytest.mark.parametrize("damage", ["summary", "tokens"])
def test_a_damaged_pretrain_cache_is_rebuilt_with_a_message(tokenizer, tmp_path, capsys, damage):
    data = write_lines(tmp_path / "corpus.jsonl", texts())
    first = PretrainDataset(data, tokenizer, 16, str(tmp_path / "cache"), show_progress=False)
    expected = np.array(first.tokens)
    path = first.cache_file + (".json" if damage == "summary" else "")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    again = PretrainDataset(data, tokenizer, 16, str(tmp_path / "cache"), show_progress=False)
    assert "is damaged" in capsys.readouterr().out
    assert np.array_equal(again.tokens, expected)


@pytest.mark.parametrize("damage", ["summary", "ids"])
def test_a_damaged_chat_cache_is_rebuilt_with_a_message(tokenizer, tmp_path, capsys, damage):
    data = write_lines(tmp_path / "chats.jsonl", [{"conversations": [user(f"q{i}"), assistant(f"a{i}")]}
                                                  for i in range(10)])
    first = SFTDataset(data, tokenizer, 64, show_progress=False, cache_dir=str(tmp_path / "cache"))
    expected = [first[i]["input_ids"].tolist() for i in range(len(first))]
    cache_file = token_cache_path(data, tokenizer, str(tmp_path / "cache"), suffix="sft")
    path = cache_file + (".json" if damage == "summary" else ".ids")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    again = SFTDataset(data, tokenizer, 64, show_progress=False, cache_dir=str(tmp_path / "cache"))
    assert "is damaged" in capsys.readouterr().out
    assert [again[i]["input_ids"].tolist() for i in range(len(again))] == expected


# ============================================================ D2: chat messages the template cannot render


BAD_MESSAGES = {
    "no content": {"role": "user"},
    "null content": {"role": "user", "content": None},
    "number content": {"role": "user", "content": 7},
    "assistant without content or tool calls": {"role": "assistant"},
    "tool calls as a string": {"role": "assistant", "content": "", "tool_calls": '[{"name": "f"}]'},
    "reasoning_content not a string": {"role": "assistant", "content": "a", "reasoning_content": ["x"]},
}


@pytest.mark.parametrize("name", sorted(BAD_MESSAGES))
def test_a_chat_message_the_template_cannot_render_is_a_bad_line(tokenizer, tmp_path, name):
    bad = BAD_MESSAGES[name]
    chat = [user("q"), bad] if bad["role"] == "assistant" else [bad, assistant("a")]
    good = [user("q"), assistant("a")]
    sft = write_lines(tmp_path / "sft.jsonl", [{"conversations": good}, {"conversations": chat}])
    pair = {"chosen": chat + [assistant("b")], "rejected": chat + [assistant("c")]}
    dpo = write_lines(tmp_path / "dpo.jsonl", [{"chosen": good, "rejected": good}, pair])
    for skip in (False, True):
        cache = str(tmp_path / f"cache{skip}")
        if not skip:
            with pytest.raises(BadInput, match=rf"{sft}:2: message"):
                SFTDataset(sft, tokenizer, 64, show_progress=False, cache_dir=cache)
            with pytest.raises(BadInput, match=rf"{dpo}:2: chosen: message"):
                DPODataset(dpo, tokenizer, 64, show_progress=False, cache_dir=cache)
        else:
            assert SFTDataset(sft, tokenizer, 64, True, show_progress=False, cache_dir=cache).stats["bad_lines"] == 1
            assert DPODataset(dpo, tokenizer, 64, True, show_progress=False, cache_dir=cache).stats["bad_lines"] == 1


def test_minimind_tool_calls_reasoning_and_functions_still_load(tokenizer, tmp_path):
    schema = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}
    chats = [
        [{"role": "system", "content": "Tools.", "functions": [schema]}, user("2+3?"),
         {"role": "assistant", "content": "", "tool_calls": [call]}, {"role": "tool", "content": "5"}, assistant("5")],
        [{"role": "system", "content": "Tools.", "functions": json.dumps([schema])}, user("2+3?"),
         {"role": "assistant", "content": None, "tool_calls": [call]}],  # OpenAI's null content beside tool calls
        [user("2+3?"), {"role": "assistant", "tool_calls": [{"name": "add", "arguments": '{"a": 2}'}]}],
        [user("why?"), {"role": "assistant", "content": "5", "reasoning_content": "2+3=5", "tool_calls": None}],
        [{"role": "system", "content": "s", "functions": None}, user("hi"), assistant("hello")],  # HF datasets' nulls
    ]
    data = write_lines(tmp_path / "sft.jsonl", [{"conversations": chat} for chat in chats])
    dataset = SFTDataset(data, tokenizer, 1024, show_progress=False, cache_dir=str(tmp_path / "cache"))
    assert len(dataset) == len(chats) and dataset.stats["bad_lines"] == 0
    assert "<tool_call>" in tokenizer.decode(dataset[2]["input_ids"])


# ======================================================================== D3: nothing usable is an error


@pytest.mark.parametrize("lines, skip, message", [
    (["", "  "], False, "no usable pairs: 0 lines, 0 skipped"),
    (["{broken", "[1, 2]", json.dumps({"chosen": []})], True, "no usable pairs: 3 lines, 3 skipped"),
])
def test_dpo_with_no_usable_pairs_names_the_file(tokenizer, tmp_path, lines, skip, message):
    data = write_lines(tmp_path / "dpo.jsonl", lines)
    with pytest.raises(BadInput, match=rf"{data}: {message}"):
        DPODataset(data, tokenizer, 64, skip, show_progress=False, cache_dir=str(tmp_path / "cache"))
    assert not os.listdir(tmp_path / "cache")


def test_a_single_pair_with_no_held_out_file_is_an_error_not_an_empty_training_set(tmp_path, one_thread):
    import train_dpo
    from tests import TOKENIZER
    pair = {"chosen": [user("q"), assistant("a")], "rejected": [user("q"), assistant("b")]}
    data = write_lines(tmp_path / "pairs.jsonl", [pair])
    with pytest.raises(SystemExit, match=rf"error: {data}: 1 usable pair: too few to hold any out"):
        train_dpo.main(["--data_path", data, "--tokenizer_path", TOKENIZER, "--save_dir", str(tmp_path / "out"),
                        "--from_weight", "none", "--preset", "nano", "--dtype", "float32", "--device", "cpu",
                        "--num_threads", "1", "--max_steps", "1"])


@pytest.mark.parametrize("kind", ["pretrain", "sft"])
def test_blank_or_all_bad_pretrain_and_sft_files_name_the_file_and_the_count(tokenizer, tmp_path, kind):
    data = write_lines(tmp_path / "data.jsonl", ["", "{broken", "\t"])
    what = "documents" if kind == "pretrain" else "conversations"
    with pytest.raises(BadInput, match=rf"{data}: no usable {what}: 1 lines, 1 skipped; the first bad line: "
                                       rf"{data}:2: not valid JSON"):
        if kind == "pretrain":
            PretrainDataset(data, tokenizer, 16, str(tmp_path / "cache"), skip_bad_lines=True, show_progress=False)
        else:
            SFTDataset(data, tokenizer, 64, True, show_progress=False, cache_dir=str(tmp_path / "cache"))
    assert not os.listdir(tmp_path / "cache")


# ======================================================================== D4: GRPO prompts, checked as chats


BAD_PROMPTS = {
    "a list of strings": ["What is 2+2?"],
    "null content": [{"role": "user", "content": None}],
    "no content": [{"role": "user"}],
    "number content": [{"role": "user", "content": 4}],
    "unknown role": [{"role": "human", "content": "What is 2+2?"}],
    "only an assistant turn": [assistant("4")],
    "ends with a system turn": [{"role": "system", "content": "Be brief."}],
}


@pytest.mark.parametrize("name", sorted(BAD_PROMPTS))
def test_a_bad_grpo_prompt_is_an_error_or_skipped_and_counted(tokenizer, tmp_path, name):
    data = write_lines(tmp_path / "prompts.jsonl", [{"conversations": [user("1+1?")], "answer": "2"},
                                                    {"conversations": BAD_PROMPTS[name], "answer": "4"}])
    with pytest.raises(BadInput, match=rf"{data}:2: "):
        PromptDataset(data, tokenizer, 64)
    prompts = PromptDataset(data, tokenizer, 64, skip_bad_lines=True)
    assert len(prompts) == 1 and prompts.stats["bad_lines"] == 1


def test_a_grpo_prompt_keeps_minimind_rlaif_and_tool_turns(tokenizer, tmp_path):
    rows = [{"conversations": [user("1+1?"), assistant("2")]},  # rlaif: the reference answer is dropped
            {"conversations": [user("2+3?"), {"role": "assistant", "content": None,
                                              "tool_calls": [{"name": "add", "arguments": {"a": 2, "b": 3}}]},
                               {"role": "tool", "content": "5"}]}]
    prompts = PromptDataset(write_lines(tmp_path / "prompts.jsonl", rows), tokenizer, 128)
    assert len(prompts) == 2 and prompts[0]["prompt"] == [user("1+1?")]
    assert tokenizer.decode(prompts[1]["prompt_ids"]).endswith("<|im_start|>tool\n5<|im_end|>\n<|im_start|>assistant\n")


# ============================================================================ lines no reader can decode


@pytest.mark.parametrize("raw", [pytest.param(b'{"text": "half a pair \\ud800"}', id="lone surrogate"),
                                 pytest.param(b"\xef\xbb\xbf{bad", id="BOM then bad JSON"),
                                 pytest.param(b"[" * 100_000, id="nested 100k deep")])
def test_undecodable_lines_are_bad_lines_not_tracebacks(tokenizer, tmp_path, raw):
    data = write_lines(tmp_path / "corpus.jsonl", texts() + [raw])
    with pytest.raises(BadInput, match=rf"{data}:21: not valid"):
        PretrainDataset(data, tokenizer, 16, str(tmp_path / "cache"), show_progress=False)


def test_a_utf8_bom_before_the_first_line_is_accepted(tokenizer, tmp_path):
    data = write_lines(tmp_path / "corpus.jsonl", [b"\xef\xbb\xbf" + json.dumps(texts(1)[0]).encode()] + texts())
    assert PretrainDataset(data, tokenizer, 16, str(tmp_path / "cache"), show_progress=False) \
        .summary["documents"] == 21
