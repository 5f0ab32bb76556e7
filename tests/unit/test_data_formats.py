"""Data formats (issue 19, point 4): every stage reads OpenAI/TRL messages, ShareGPT, Alpaca, TRL's prompt and
preference columns, JSON arrays, parquet files and datasets folders as it reads MiniMind's jsonl: each gives the
same cached tokens and masks as its MiniMind twin. A file in a layout the stage does not read is one error naming
the file and what was expected; caches follow the data (and the converters' version)."""
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import model.data.formats as formats
from model.data.chat import SFTDataset, encode_chat, iter_conversations
from model.data.jsonl import BadInput, token_cache_path
from model.data.preference import DPODataset
from model.data.pretrain import PretrainDataset
from model.data.prompts import PromptDataset


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text, **fields):
    return {"role": "system", "content": text, **fields}


def write_jsonl(path, records) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return str(path)


def write_json(path, records) -> str:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(records, f, ensure_ascii=False, indent=1)
    return str(path)


def columns(records: list[dict]) -> list[dict]:
    """Every record with every field (null where it had none): pyarrow and datasets take a table's columns from its
    first row alone."""
    fields = list(dict.fromkeys(field for record in records for field in record))
    return [{field: record.get(field) for field in fields} for record in records]


def write_parquet(path, records) -> str:
    pq.write_table(pa.Table.from_pylist(columns(records)), str(path))
    return str(path)


def write_folder(path, records) -> str:
    from datasets import Dataset
    Dataset.from_list(columns(records)).save_to_disk(str(path))
    return str(path)


WRITERS = {"jsonl": write_jsonl, "json": write_json, "parquet": write_parquet, "datasets": write_folder}
EXTENSIONS = {"jsonl": ".jsonl", "json": ".json", "parquet": ".parquet", "datasets": ""}


def write(tmp_path, name, container, records) -> str:
    return WRITERS[container](tmp_path / f"{name}{EXTENSIONS[container]}", records)


def cached(dataset) -> tuple:
    """What a chat cache holds: every token, every mask bit and every sequence's length."""
    cache = dataset.cache
    return np.asarray(cache.ids).tolist(), np.asarray(cache.masks).tolist(), cache.lengths.tolist()


def sft(path, tokenizer, tmp_path, **kwargs) -> SFTDataset:
    return SFTDataset(path, tokenizer, 1024, show_progress=False, cache_dir=str(tmp_path / "cache"), **kwargs)


# ============================================================================================ SFT: the layouts


TOOL = {"type": "function", "function": {"name": "add", "description": "Add two numbers",
                                         "parameters": {"type": "object", "properties": {"a": {"type": "number"}}}}}
CALL = {"name": "add", "arguments": {"a": 2, "b": 3}}

# (MiniMind's conversations, the same as ShareGPT): system prompts, several turns, and a tool call and its result
CHATS = [
    ([user("What is the capital of France?"), assistant("Paris.")],
     {"conversations": [{"from": "human", "value": "What is the capital of France?"},
                        {"from": "gpt", "value": "Paris."}]}),
    ([system("Be brief."), user("hi"), assistant("hello"), user("2+2?"), assistant("4")],
     {"system": "Be brief.", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"},
                                               {"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]}),
    ([system("Use tools.", functions=[TOOL]), user("2+3?"), {"role": "assistant", "content": "", "tool_calls": [CALL]},
      {"role": "tool", "content": "5"}, assistant("It is 5.")],
     {"system": "Use tools.", "tools": json.dumps([TOOL]),
      "conversations": [{"from": "human", "value": "2+3?"}, {"from": "function_call", "value": json.dumps(CALL)},
                        {"from": "observation", "value": "5"}, {"from": "gpt", "value": "It is 5."}]}),
]


def minimind(tmp_path) -> str:
    return write_jsonl(tmp_path / "minimind.jsonl", [{"conversations": chat} for chat, _ in CHATS])


def openai(chat: list[dict]) -> dict:
    """OpenAI/TRL's form of a MiniMind chat: {"messages": [...]}, the tool schemas in a record-level "tools"."""
    messages = [{k: v for k, v in m.items() if k != "functions"} for m in chat]
    tools = chat[0].get("functions")
    return {"messages": messages, **({"tools": tools} if tools else {})}


@pytest.mark.parametrize("container", ["jsonl", "json", "parquet", "datasets"])
@pytest.mark.parametrize("layout", ["minimind", "messages", "sharegpt"])
def test_each_chat_layout_and_container_caches_the_tokens_of_its_minimind_twin(tokenizer, tmp_path, layout,
                                                                                  container):
    records = {"minimind": [{"conversations": chat} for chat, _ in CHATS],
               "messages": [openai(chat) for chat, _ in CHATS],
               "sharegpt": [sharegpt for _, sharegpt in CHATS]}[layout]
    data = write(tmp_path, layout, container, records)
    assert cached(sft(data, tokenizer, tmp_path)) == cached(sft(minimind(tmp_path), tokenizer, tmp_path))


def test_parquet_of_messages_and_minimind_conversations_caches_the_same_tokens(tokenizer, tmp_path):
    """Parquet (like datasets) gives every message every field, null where a message had none."""
    chats = [chat for chat, _ in CHATS[:2]]
    expected = cached(sft(write_jsonl(tmp_path / "twin.jsonl", [{"conversations": c} for c in chats]), tokenizer,
                          tmp_path))
    for name, records in {"minimind": [{"conversations": c} for c in chats],
                          "messages": [openai(c) for c in chats]}.items():
        assert cached(sft(write_parquet(tmp_path / f"{name}.parquet", records), tokenizer, tmp_path)) == expected


def test_alpaca_and_trl_prompt_completion_cache_the_tokens_of_their_minimind_twins(tokenizer, tmp_path):
    alpaca = [{"instruction": "Translate to French.", "input": "cat", "output": "chat"},
              {"instruction": "Say hi.", "input": "", "output": "hi", "system": "Be brief.",
               "history": [["Who are you?", "A bot."]]}]
    twins = [[user("Translate to French.\ncat"), assistant("chat")],
             [system("Be brief."), user("Who are you?"), assistant("A bot."), user("Say hi."), assistant("hi")]]
    expected = cached(sft(write_jsonl(tmp_path / "twin.jsonl", [{"conversations": c} for c in twins]), tokenizer,
                          tmp_path))
    assert cached(sft(write_json(tmp_path / "alpaca.json", alpaca), tokenizer, tmp_path)) == expected
    completions = [{"prompt": [user("Translate to French.\ncat")], "completion": [assistant("chat")]},
                   {"prompt": twins[1][:-1], "completion": "hi"}]  # conversational, and a plain-string completion
    assert cached(sft(write_jsonl(tmp_path / "trl.jsonl", completions), tokenizer, tmp_path)) == expected


def test_tools_without_a_system_prompt_render_as_the_template_renders_tools_alone(tokenizer, tmp_path):
    """OpenAI's record-level tools with no system message: kept in a content-less system message that is not
    rendered, so the tokens are those of apply_chat_template(messages, tools=tools), as the server renders them."""
    messages = [user("2+3?"), {"role": "assistant", "content": None, "tool_calls": [{"type": "function",
                                                                                       "function": CALL}]},
                {"role": "tool", "content": "5"}, assistant("5")]
    data = write_jsonl(tmp_path / "tools.jsonl", [{"messages": messages, "tools": [TOOL]}])
    ids, mask = encode_chat(tokenizer, messages, tools=[TOOL])
    assert cached(sft(data, tokenizer, tmp_path)) == (ids, mask, [len(ids)])
    assert tokenizer.decode(ids).startswith("<|im_start|>system\n# Tools")
    assert next(iter_conversations(data))[0] == user("2+3?")  # held-out prompts do not see that message either


def test_openai_text_content_parts_are_joined(tokenizer, tmp_path):
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                          assistant("c")]}
    twin = write_jsonl(tmp_path / "twin.jsonl", [{"conversations": [user("a\nb"), assistant("c")]}])
    assert cached(sft(write_jsonl(tmp_path / "parts.jsonl", [parts]), tokenizer, tmp_path)) == \
        cached(sft(twin, tokenizer, tmp_path))


def test_a_held_out_split_of_a_parquet_file_finds_its_records_again(tokenizer, tmp_path):
    chats = [[user(f"q{i}"), assistant(f"a{i}")] for i in range(20)]
    data = write_parquet(tmp_path / "chats.parquet", [openai(c) for c in chats])
    train = sft(data, tokenizer, tmp_path)
    held_out = train.split_held_out(0.25, seed=1)
    found = list(iter_conversations(data, set(held_out.line_numbers.tolist())))
    assert sorted(chats.index(c) for c in found) == sorted(held_out.line_numbers.tolist())  # record numbers, from 0


# ============================================================================================ bad records and files


def test_a_bad_record_of_a_parquet_file_is_named_by_its_index(tokenizer, tmp_path):
    records = [openai([user("q"), assistant("a")]) for _ in range(3)]
    records[1] = {"messages": [user("q"), {"role": "robot", "content": "a"}]}
    data = write_parquet(tmp_path / "chats.parquet", records)
    with pytest.raises(BadInput, match=rf"^{data}: record 1: message 1 has role 'robot'.*--skip_bad_lines 1"):
        sft(data, tokenizer, tmp_path)
    assert sft(data, tokenizer, tmp_path / "skip", skip_bad_lines=True).stats["bad_lines"] == 1


def test_a_bad_sharegpt_speaker_is_a_bad_line(tokenizer, tmp_path):
    records = [CHATS[0][1], {"conversations": [{"from": "narrator", "value": "once"}, {"from": "gpt", "value": "a"}]}]
    data = write_jsonl(tmp_path / "sharegpt.jsonl", records)
    with pytest.raises(BadInput, match=rf"^{data}:2: message 0 has \"from\": 'narrator'"):
        sft(data, tokenizer, tmp_path)


def one_line_error(call) -> str:
    with pytest.raises(BadInput) as error:
        call()
    message = str(error.value)
    assert "\n" not in message and "--skip_bad_lines" not in message, message
    return message


def test_a_file_of_another_stage_is_one_error_naming_it_and_what_was_expected(tokenizer, tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"chosen": [user("q"), assistant("a")],
                                                    "rejected": [user("q"), assistant("b")]}] * 3)
    chats, texts = minimind(tmp_path), write_jsonl(tmp_path / "text.jsonl", [{"text": "a document"}] * 3)
    message = one_line_error(lambda: sft(pairs, tokenizer, tmp_path))
    assert message.startswith(f"{pairs}: not chat (SFT) data: its first line has the fields ['chosen', 'rejected'] "
                              "(it looks like preference (DPO) data); expected")
    assert all(name in message for name in ('"conversations"', '"messages"', "ShareGPT", "Alpaca"))
    assert "looks like chat (SFT) data" in one_line_error(lambda: DPODataset(chats, tokenizer, 64, show_progress=False,
                                                                             cache_dir=str(tmp_path / "c")))
    assert '{"text": "..."}' in one_line_error(lambda: PretrainDataset(chats, tokenizer, 16, str(tmp_path / "c"),
                                                                       show_progress=False))
    assert "looks like pretraining text" in one_line_error(lambda: PromptDataset(texts, tokenizer, 64))
    # not even a layout to try: a .txt file, a csv, one pretty-printed object, a DatasetDict
    txt = tmp_path / "chats.txt"
    txt.write_text("hello\n")
    assert "only pretraining reads" in one_line_error(lambda: sft(str(txt), tokenizer, tmp_path))
    (tmp_path / "chats.csv").write_text("prompt,answer\nq,a\n")
    assert ".csv files are not read" in one_line_error(lambda: sft(str(tmp_path / "chats.csv"), tokenizer, tmp_path))
    single = tmp_path / "one.json"
    single.write_text(json.dumps({"conversations": [user("q"), assistant("a")]}, indent=2))
    assert "one JSON object" in one_line_error(lambda: sft(str(single), tokenizer, tmp_path))
    from datasets import Dataset, DatasetDict
    DatasetDict(train=Dataset.from_list([openai([user("q"), assistant("a")])])).save_to_disk(str(tmp_path / "dd"))
    assert f"pass one split's folder, e.g. {tmp_path / 'dd' / 'train'}" in \
        one_line_error(lambda: sft(str(tmp_path / "dd"), tokenizer, tmp_path))


def test_with_skip_bad_lines_a_stray_first_line_does_not_decide_the_layout(tokenizer, tmp_path):
    data = write_jsonl(tmp_path / "chats.jsonl", [{"note": "exported by tool X"}] + [openai(c) for c, _ in CHATS])
    one_line_error(lambda: sft(data, tokenizer, tmp_path))
    dataset = sft(data, tokenizer, tmp_path, skip_bad_lines=True)
    assert dataset.stats["bad_lines"] == 1 and len(dataset) == len(CHATS)


def test_a_broken_json_array_is_one_error(tokenizer, tmp_path):
    data = tmp_path / "alpaca.json"
    data.write_text('[{"instruction": "q", "output": "a"},\n{"instruction": ')
    assert one_line_error(lambda: sft(str(data), tokenizer, tmp_path)).startswith(f"{data}: not a valid JSON array")


# ============================================================================================ pretraining text


@pytest.mark.parametrize("container", ["json", "parquet", "datasets", "txt"])
def test_pretraining_text_in_each_container_caches_the_tokens_of_its_jsonl_twin(tokenizer, tmp_path, container):
    documents = [f"document {i}: the moon over the river, the wind in the pines." for i in range(30)]
    twin = PretrainDataset(write_jsonl(tmp_path / "twin.jsonl", [{"text": d} for d in documents]), tokenizer, 16,
                           str(tmp_path / "cache"), show_progress=False)
    if container == "txt":
        data = tmp_path / "corpus.txt"
        data.write_text("\n\n".join(documents) + "\n", encoding="utf-8")  # blank lines are not documents
        data = str(data)
    else:
        data = write(tmp_path, "corpus", container, [{"text": d, "source": "web"} for d in documents])
    dataset = PretrainDataset(data, tokenizer, 16, str(tmp_path / "cache"), show_progress=False)
    assert np.array_equal(dataset.tokens, twin.tokens) and dataset.summary["lengths"] == twin.summary["lengths"]


# ============================================================================================ DPO pairs


PROMPT = [system("Answer briefly."), user("Capital of France?")]


def test_trl_and_sharegpt_preference_formats_give_the_pairs_of_minimind(tokenizer, tmp_path):
    minimind_pair = {"chosen": PROMPT + [assistant("Paris.")], "rejected": PROMPT + [assistant("Lyon.")]}
    forms = {
        "trl_implicit": minimind_pair,
        "trl_explicit": {"prompt": PROMPT, "chosen": [assistant("Paris.")], "rejected": [assistant("Lyon.")]},
        "trl_plain": {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon.",
                      "system": "Answer briefly."},
        "ultrafeedback": {"prompt": "Capital of France?", **minimind_pair},  # the prompt again, as a string
        "sharegpt": {"conversations": [{"from": "system", "value": "Answer briefly."},
                                       {"from": "human", "value": "Capital of France?"}],
                     "chosen": {"from": "gpt", "value": "Paris."}, "rejected": {"from": "gpt", "value": "Lyon."}},
    }

    def pairs(path):
        return cached(DPODataset(path, tokenizer, 128, show_progress=False, cache_dir=str(tmp_path / "cache")))

    expected = pairs(write_jsonl(tmp_path / "minimind.jsonl", [minimind_pair] * 2))
    for name, record in forms.items():
        assert pairs(write_jsonl(tmp_path / f"{name}.jsonl", [record] * 2)) == expected, name
    plain = [{"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."}] * 2
    twin = [{"chosen": [user("Capital of France?"), assistant("Paris.")],
             "rejected": [user("Capital of France?"), assistant("Lyon.")]}] * 2
    assert pairs(write_parquet(tmp_path / "plain.parquet", plain)) == pairs(write_jsonl(tmp_path / "twin.jsonl", twin))


def test_plain_text_pairs_without_a_prompt_are_refused_with_the_reason(tokenizer, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"chosen": "Q: 2+2? A: 4", "rejected": "Q: 2+2? A: 5"}])
    with pytest.raises(BadInput, match=rf'^{data}:1: plain-text "chosen" and "rejected" need a "prompt" field'):
        DPODataset(data, tokenizer, 64, show_progress=False, cache_dir=str(tmp_path / "cache"))


# ============================================================================================ GRPO prompts


def test_grpo_reads_trl_prompts_messages_and_sharegpt_as_minimind_conversations(tokenizer, tmp_path):
    expected = PromptDataset(write_jsonl(tmp_path / "minimind.jsonl", [
        {"conversations": [user("1+1?"), assistant("2")], "answer": "2"},
        {"conversations": [system("Be brief."), user("2+2?")], "answer": "4"}]), tokenizer, 64)
    forms = {
        "trl": [{"prompt": "1+1?", "answer": "2"}, {"prompt": [system("Be brief."), user("2+2?")], "answer": "4"}],
        "trl_parquet": [{"prompt": [user("1+1?")], "answer": "2"},
                        {"prompt": [system("Be brief."), user("2+2?")], "answer": "4"}],
        "messages": [{"messages": [user("1+1?")], "answer": "2"},
                     {"messages": [system("Be brief."), user("2+2?")], "answer": "4"}],
        "sharegpt": [{"conversations": [{"from": "human", "value": "1+1?"}], "answer": "2"},
                     {"conversations": [{"from": "human", "value": "2+2?"}], "system": "Be brief.", "answer": "4"}],
    }
    for name, records in forms.items():
        prompts = PromptDataset(write(tmp_path, name, "parquet" if "parquet" in name else "jsonl", records),
                                tokenizer, 64)
        assert [(p["prompt"], p["prompt_ids"], p["columns"]) for p in prompts] == \
            [(p["prompt"], p["prompt_ids"], p["columns"]) for p in expected], name


def test_a_string_where_a_conversation_belongs_is_still_a_bad_line(tokenizer, tmp_path):
    """Plain strings become turns only where a layout defines them (TRL's prompt and answers), never a whole
    conversation."""
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"messages": [user("1+1?")]}, {"messages": "2+2?"}])
    with pytest.raises(BadInput, match=rf"^{data}:2: a conversation must be a non-empty list of messages, got a str"):
        PromptDataset(data, tokenizer, 64)


# ============================================================================================ caches


def test_caches_of_parquet_files_and_datasets_folders_follow_their_data(tokenizer, tmp_path, monkeypatch):
    import model.data.chat as chat_module
    build, builds = chat_module.build_chat_cache, []

    def counting_build(data_path, *args, **kwargs):
        builds.append(data_path)
        return build(data_path, *args, **kwargs)

    monkeypatch.setattr(chat_module, "build_chat_cache", counting_build)
    second = [openai([user("q"), assistant("second reply")])]
    twin = cached(sft(write_jsonl(tmp_path / "twin.jsonl", [{"conversations": [user("q"), assistant("second reply")]}]),
                      tokenizer, tmp_path))
    for container in ("parquet", "datasets"):
        data = write(tmp_path, "chats", container, [openai([user("q"), assistant("first")])])
        before = cached(sft(data, tokenizer, tmp_path))
        assert cached(sft(data, tokenizer, tmp_path)) == before and builds.count(data) == 1  # reused
        if container == "datasets":  # a shard rewritten in place: the folder's own mtime does not change
            new = write(tmp_path, "new", container, second)
            for name in os.listdir(new):
                shutil.copyfile(os.path.join(new, name), os.path.join(data, name))
        else:
            write(tmp_path, "chats", container, second)
        assert cached(sft(data, tokenizer, tmp_path)) == twin and builds.count(data) == 2


def test_a_parquet_file_tokenized_by_two_processes_gives_the_same_cache(tokenizer, tmp_path):
    data = write_parquet(tmp_path / "chats.parquet", [openai([user(f"q{i}"), assistant(f"a{i}")]) for i in range(600)])
    one = cached(sft(data, tokenizer, tmp_path / "one", num_proc=1))
    assert cached(sft(data, tokenizer, tmp_path / "two", num_proc=2)) == one


def test_a_datasets_sequence_column_of_messages_is_read_as_a_list(tokenizer, tmp_path):
    """datasets' Sequence({"role": ..., "content": ...}) feature gives a dict of lists, not a list of dicts."""
    columnwise = {"messages": {"role": ["user", "assistant"], "content": ["q", "a"]}}
    twin = write_jsonl(tmp_path / "twin.jsonl", [{"conversations": [user("q"), assistant("a")]}])
    assert cached(sft(write_jsonl(tmp_path / "columns.jsonl", [columnwise]), tokenizer, tmp_path)) == \
        cached(sft(twin, tokenizer, tmp_path))


def test_a_new_converter_version_is_a_new_cache(tokenizer, tmp_path, monkeypatch):
    data = minimind(tmp_path)
    path = token_cache_path(data, tokenizer, str(tmp_path / "cache"), suffix="sft")
    monkeypatch.setattr(formats, "FORMATS_VERSION", formats.FORMATS_VERSION + 1)
    assert token_cache_path(data, tokenizer, str(tmp_path / "cache"), suffix="sft") != path


def test_a_folder_given_with_a_trailing_slash_is_the_same_cache(tokenizer, tmp_path):
    data = write_folder(tmp_path / "chats", [openai([user("q"), assistant("a")])])
    assert token_cache_path(data + os.sep, tokenizer) == token_cache_path(data, tokenizer)
    assert os.path.basename(token_cache_path(data + os.sep, tokenizer)).startswith("chats.")


# ============================================================================================ a stage, end to end


@pytest.mark.parametrize("container", ["jsonl", "parquet"])
def test_sft_trains_end_to_end_on_openai_messages(tmp_path, capsys, one_thread, container):
    """jsonl: the held-out set is drawn from the file itself; parquet: it is the chats_val.parquet beside it."""
    import train_full_sft
    from tests import TOKENIZER
    chats = [openai([user(f"What color is thing {i}?"), assistant(f"Thing {i} is blue.")]) for i in range(40)]
    data = write(tmp_path, "chats", container, chats)
    extra = ["--val_fraction", "0.1"]
    if container == "parquet":
        write(tmp_path, "chats_val", container, chats[:6])
        extra = []
    results = train_full_sft.main(["--data_path", data, "--tokenizer_path", TOKENIZER, "--save_dir",
                                   str(tmp_path / "out"), "--from_weight", "none", "--preset", "nano",
                                   "--max_steps", "2", "--batch_size", "4", "--max_seq_len", "64",
                                   "--log_interval", "1", "--eval_interval", "0", "--eval_prompts", "3",
                                   "--max_new_tokens", "4", "--dtype", "float32", "--num_threads", "1",
                                   "--device", "cpu", *extra])
    output = capsys.readouterr().out
    assert f"train: {data}: 40 conversations" in output
    assert ("4 of its conversations chosen at random" if container == "jsonl" else
            f"held-out: {tmp_path / 'chats_val.parquet'}: 6 conversations") in output
    assert "end_of_turn_rate" in results["after"]  # held-out prompts were found in the file and answered
    assert (tmp_path / "out" / "full_sft_64.pth").exists()
