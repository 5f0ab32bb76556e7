"""model/tools.py and model/agent.py: the local tools (calculator exactness and refusal of unsafe input, unit
conversions, the capital lookup, schema checks), parsing tool calls out of model output (good and malformed), and
the multi-turn episode loop driven by a scripted policy, so its token sequence and LOSS MASK are checked exactly
against the chat template: the policy's own tokens are trained on, prompts and tool results never."""
import json

import pytest
import torch
from transformers import AutoTokenizer

from model import TinyMindConfig, TinyMindForCausalLM
from model.agent import (build_agent_rewards, episodes_to_rollout, extract_final_answer, rollout_logprobs,
                         run_episodes, score_episodes, tool_turn_suffix)
from model.data.chat import encode_chat, encode_prompt, template_inputs
from model.tools import (TOOL_SCHEMAS, ToolError, calculate, check_call, convert_units, lookup_capital,
                         parse_tool_calls, result_value, run_tool, same_call)
from tests import TOKENIZER


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER)


# ================================================================================================ tools


@pytest.mark.parametrize("expression, value", [
    ("17 * 23", "391"), ("(2 + 3) * 4", "20"), ("7 / 2", "3.5"), ("1 / 3", "0.3333"), ("-5 + 2", "-3"),
    ("2 ** 10", "1024"), ("2 ^ 3", "8"), ("0.1 + 0.2", "0.3"), ("17 // 5", "3"), ("17 % 5", "2"), ("6 × 7", "42"),
    ("2 ** -2", "0.25"), ("1e3 + 1", "1001"), ("--4", "4")])
def test_calculator_is_exact(expression, value):
    assert calculate(expression) == value  # exact fractions: 0.1 + 0.2 is 0.3, not 0.30000000000000004


@pytest.mark.parametrize("expression", [
    "__import__('os').system('echo hi')", "open('/etc/passwd').read()", "x + 1", "(1).__class__", "[1, 2][0]",
    "'a' * 3", "lambda: 1", "1 if 1 else 2", "2 < 3", "9 ** 9 ** 9", "2 ** 1000", "2 ** 0.5", "1 / 0", "5 % 0",
    "0 ** -1", "", "1 +", "10 ** 40", "1" * 300, "True + 1"])
def test_calculator_refuses_unsafe_or_unbounded_input(expression):
    with pytest.raises(ToolError):
        calculate(expression)


def test_calculator_never_evaluates_code(monkeypatch):
    import builtins
    monkeypatch.setattr(builtins, "eval", lambda *a, **k: pytest.fail("eval() called"))
    assert calculate("3 * (4 + 5)") == "27"
    assert run_tool("calculator", {"expression": "__import__('os')"}).startswith("error: unsupported expression")


@pytest.mark.parametrize("value, source, target, expected", [
    (3.5, "km", "m", "3500 m"), (100, "C", "F", "212 F"), (32, "F", "C", "0 C"), (0, "K", "C", "-273.15 C"),
    (1, "lb", "kg", "0.45 kg"), (12, "in", "cm", "30.48 cm"), (1, "mi", "km", "1.61 km"), (10, "kg", "lb", "22.05 lb"),
    (1, "oz", "g", "28.35 g"), ("2.5", "kilometers", "meters", "2500 m"), (250, "g", "kg", "0.25 kg"),
    (-40, "F", "C", "-40 C")])
def test_unit_conversions(value, source, target, expected):
    assert convert_units(value, source, target) == expected


@pytest.mark.parametrize("args, message", [
    ((1, "km", "kg"), "different kinds"), ((1, "km", "parsec"), "unknown unit"), ((-300, "C", "K"), "absolute zero"),
    (("ten", "m", "cm"), "not a number"), ((True, "m", "cm"), "must be a number")])
def test_unit_conversion_errors(args, message):
    with pytest.raises(ToolError, match=message):
        convert_units(*args)


def test_capital_lookup():
    assert lookup_capital("France") == "Paris"
    assert lookup_capital("  south   KOREA ") == "Seoul"
    with pytest.raises(ToolError, match="no capital known"):
        lookup_capital("Atlantis")


def test_run_tool_checks_the_schema_and_reports_errors_as_text():
    assert run_tool("lookup_capital", {"country": "Japan"}) == "result: Tokyo"
    assert run_tool("convert_units", {"value": 1, "from_unit": "m", "to_unit": "cm"}) == "result: 100 cm"
    assert run_tool("weather", {}).startswith("error: unknown tool 'weather'")
    assert run_tool("calculator", {}) == "error: calculator: missing argument(s) expression"
    assert run_tool("calculator", {"expression": "1", "x": 2}) == "error: calculator: unexpected argument(s) x"
    assert run_tool("convert_units", {"value": "3", "from_unit": "m", "to_unit": "cm"}) == \
        "error: convert_units: argument value must be a number"
    assert check_call("convert_units", {"value": True, "from_unit": "m", "to_unit": "cm"}) is not None  # not 1
    assert run_tool("calculator", {"expression": "1/0"}) == "error: division by zero"
    assert [s["name"] for s in TOOL_SCHEMAS] == ["calculator", "convert_units", "lookup_capital"]


@pytest.mark.parametrize("name,arguments", [("calculator", {"expression": "17 * 23"}),
                                            ("convert_units", {"value": 3.5, "from_unit": "km", "to_unit": "m"}),
                                            ("lookup_capital", {"country": "France"})])
def test_a_tool_message_spells_its_result_with_the_answers_tokens(tokenizer, name, arguments):
    """The reply "The answer is 391." writes ` 3` `9` `1`; a message "391" would hold `3` `9` `1`, so the model
    would have to map one spelling onto the other instead of copying (docs/agent.md)."""
    message = run_tool(name, arguments)
    value = result_value(message)
    assert message == "result: " + value and result_value("error: no capital") == "error: no capital"
    value_ids = tokenizer.encode(" " + value, add_special_tokens=False)
    answer_ids = tokenizer.encode(f"The answer is {value}.", add_special_tokens=False)
    message_ids = tokenizer.encode(f"<|im_start|>tool\n{message}<|im_end|>", add_special_tokens=False)
    assert answer_ids[-len(value_ids) - 1:-1] == value_ids == message_ids[-len(value_ids) - 1:-1]


def test_same_call_compares_like_a_grader():
    reference = {"name": "convert_units", "arguments": {"value": 3.5, "from_unit": "km", "to_unit": "m"}}
    assert same_call("convert_units", {"value": 3.50, "from_unit": "KM", "to_unit": "m"}, reference)
    assert same_call("convert_units", {"value": "3.5", "from_unit": "km", "to_unit": "m"}, reference)
    assert not same_call("convert_units", {"value": 3.5, "from_unit": "km", "to_unit": "cm"}, reference)
    assert not same_call("convert_units", {"value": 3.5, "from_unit": "km"}, reference)
    assert not same_call("calculator", {"value": 3.5, "from_unit": "km", "to_unit": "m"}, reference)
    assert same_call("calculator", {"expression": "17*23"}, {"name": "calculator",
                                                             "arguments": {"expression": "17 * 23"}})


# ================================================================================================ parsing


def block(call) -> str:
    return "<tool_call>\n" + (call if isinstance(call, str) else json.dumps(call)) + "\n</tool_call>"


def test_parse_good_calls():
    content, calls = parse_tool_calls(block({"name": "calculator", "arguments": {"expression": "2 + 2"}}))
    assert content == "" and len(calls) == 1 and calls[0].ok
    assert (calls[0].name, calls[0].arguments) == ("calculator", {"expression": "2 + 2"})
    text = "Let me check.\n" + block({"name": "lookup_capital", "arguments": {"country": "Peru"}}) + "\n" + \
        block({"name": "calculator", "arguments": '{"expression": "1 + 1"}'})  # OpenAI's string form
    content, calls = parse_tool_calls(text)
    assert content == "Let me check."
    assert [(c.name, c.arguments, c.ok) for c in calls] == [("lookup_capital", {"country": "Peru"}, True),
                                                            ("calculator", {"expression": "1 + 1"}, True)]
    assert parse_tool_calls("The answer is 4.") == ("The answer is 4.", [])


@pytest.mark.parametrize("text, error", [
    (block('{"name": "calculator", "arguments": {"expression": "2 + 2"}'), "not valid JSON"),  # a brace short
    (block('{"arguments": {"expression": "2"}}'), 'not an object with a "name" string'),
    (block('["calculator"]'), 'not an object with a "name" string'),
    (block('{"name": "calculator", "arguments": [1]}'), "arguments are not an object"),
    (block('{"name": "calculator", "arguments": "{oops"}'), "arguments are not valid JSON"),
    ('<tool_call>\n{"name": "calculator", "arguments": {"expression": "2"}}', "no closing </tool_call>"),
])
def test_parse_malformed_calls(text, error):
    _, calls = parse_tool_calls(text)
    assert len(calls) == 1 and not calls[0].ok and calls[0].error == error


def test_the_parser_reads_what_the_chat_template_writes(tokenizer):
    """An assistant turn with tool_calls, rendered by the template, parses back into the same call."""
    call = {"name": "convert_units", "arguments": {"value": 2, "from_unit": "ft", "to_unit": "m"}}
    text = tokenizer.apply_chat_template([{"role": "user", "content": "?"},
                                          {"role": "assistant", "content": "", "tool_calls": [call]}], tokenize=False)
    reply = text.split("<|im_start|>assistant\n", 1)[1].split("<|im_end|>")[0]
    _, calls = parse_tool_calls(reply)
    assert [(c.name, c.arguments, c.ok) for c in calls] == [(call["name"], call["arguments"], True)]


def test_final_answer_extraction():
    assert extract_final_answer("The answer is 391.") == "391"
    assert extract_final_answer("Hmm. The answer is 2 m. So the answer is 3500 m.") == "3500 m"
    assert extract_final_answer("<answer>Paris</answer>") == "Paris"
    assert extract_final_answer("Paris.") == "Paris"
    assert extract_final_answer("The answer is:\n-13") == "-13"  # a colon, the answer on its own line
    assert extract_final_answer("The answer is: Mexico City.") == "Mexico City"
    assert extract_final_answer(None) is None


# ================================================================================================ the episode loop


def prompt_item(tokenizer, question="What is 17 * 23?", answer="391",
                call=({"name": "calculator", "arguments": {"expression": "17 * 23"}})):
    messages = [{"role": "system", "content": None, "functions": TOOL_SCHEMAS}, {"role": "user", "content": question}]
    return {"prompt": messages, "prompt_ids": encode_prompt(tokenizer, messages),
            "columns": {"answer": answer, "call": dict(call)}}


def run_scripted(tokenizer, items, scripts, max_turns=3, end=True):
    """run_episodes (G = 1) with a scripted policy: episode i plays scripts[i], one text per turn (+ <|im_end|>,
    or cut off without it when `end` is False). The policy is shown only the contexts of running episodes; it
    tells them apart as a server would, by the context: a row's next context extends the last one it answered.
    Returns the episodes and the contexts of every policy call."""
    turn, last, calls = [0] * len(scripts), [None] * len(scripts), []

    def policy(contexts):
        calls.append([list(c) for c in contexts])
        out, taken = [], set()
        for position, context in enumerate(contexts):
            if len(calls) == 1:
                row = position
            else:
                row = next(r for r in range(len(scripts)) if r not in taken and last[r] is not None and
                           context[:len(last[r])] == last[r])
            taken.add(row)
            ids = tokenizer.encode(scripts[row][turn[row]] + ("<|im_end|>" if end else ""), add_special_tokens=False)
            turn[row] += 1
            last[row] = list(context) + ids
            out.append(ids)
        return out

    return run_episodes(policy, tokenizer, items, 1, max_turns), calls


def canonical_call(call) -> str:
    """A call exactly as the chat template renders it."""
    return "<tool_call>\n" + json.dumps({"name": call["name"], "arguments": call["arguments"]},
                                        ensure_ascii=False) + "\n</tool_call>"


def test_episode_tokens_and_loss_mask_equal_the_chat_template(tokenizer):
    """Call, tool result, final answer: the episode's ids are exactly the template's rendering of the whole
    conversation, and its mask is exactly the template's assistant mask (generated turns and their <|im_end|>)."""
    item = prompt_item(tokenizer)
    call = item["columns"]["call"]
    episodes, calls = run_scripted(tokenizer, [item], [[canonical_call(call), "The answer is 391."]])
    episode = episodes[0]
    assert len(calls) == 2 and episode.done and episode.tool_results == [["result: 391"]]
    conversation = item["prompt"] + [{"role": "assistant", "content": "", "tool_calls": [call]},
                                     {"role": "tool", "content": "result: 391"},
                                     {"role": "assistant", "content": "The answer is 391."}]
    messages, tools = template_inputs(conversation)
    ids, mask = encode_chat(tokenizer, messages, tools=tools)
    assert ids[-1] == tokenizer.encode("\n", add_special_tokens=False)[0]  # the template ends with a newline
    assert episode.ids == ids[:-1]
    assert episode.mask == mask[:-1]
    # the second turn was generated from exactly the prompt + first turn + the tool message + assistant header
    assert calls[1][0] == episode.ids[:len(calls[1][0])]
    assert tokenizer.decode(calls[1][0][len(item["prompt_ids"]):]) == \
        canonical_call(call) + "<|im_end|>" + tool_turn_suffix(["result: 391"])


def test_loss_mask_covers_only_the_policys_tokens(tokenizer):
    item = prompt_item(tokenizer)
    turns = [canonical_call(item["columns"]["call"]), "The answer is 391."]
    episode = run_scripted(tokenizer, [item], [turns])[0][0]
    rollout = episodes_to_rollout([episode], tokenizer.pad_token_id, "cpu")
    tail = rollout.completion_ids[0].tolist()
    trained = [t for t, m in zip(tail, rollout.completion_mask[0].tolist()) if m]
    not_trained = [t for t, m, a in zip(tail, rollout.completion_mask[0].tolist(), rollout.attention_mask[0].tolist())
                   if a and not m]
    assert tokenizer.decode(trained) == turns[0] + "<|im_end|>" + turns[1] + "<|im_end|>"
    # the tool result and the glue: attended only
    assert tokenizer.decode(not_trained) == tool_turn_suffix(["result: 391"])
    assert rollout.prompt_mask.sum().item() == len(item["prompt_ids"])
    assert rollout.attention_mask.sum().item() == len(episode.ids) - len(item["prompt_ids"])


def test_batched_episodes_end_at_their_own_turns(tokenizer):
    """Three episodes in one batch: a direct answer (1 turn), a call then an answer (2), a call every turn (turn
    limit: the last call is not run, no final answer). Only running episodes reach the policy."""
    calc, capital = prompt_item(tokenizer), prompt_item(tokenizer, "What is the capital of Peru?", "Lima",
                                                        {"name": "lookup_capital", "arguments": {"country": "Peru"}})
    again = prompt_item(tokenizer, "What is 2 + 2?", "4", {"name": "calculator", "arguments": {"expression": "2 + 2"}})
    loop = canonical_call(again["columns"]["call"])
    scripts = [["The answer is 391."], [canonical_call(capital["columns"]["call"]), "The answer is Lima."],
               [loop, loop, loop]]
    episodes, calls = run_scripted(tokenizer, [calc, capital, again], scripts, max_turns=3)
    assert [len(c) for c in calls] == [3, 2, 1]
    assert [len(e.turns) for e in episodes] == [1, 2, 3]
    assert episodes[2].hit_turn_limit and episodes[2].final_text is None and len(episodes[2].tool_results) == 2
    assert episodes[1].tool_results == [["result: Lima"]]
    rewards, names, weights = build_agent_rewards(["tool_format", "tool_args", "final_answer"], None)
    table = score_episodes(episodes, rewards)
    # no call: format 0, args 0; right call + answer: all 1; looping right call: format 1, args 1, no answer
    assert table.tolist() == [[0.0, 0.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]
    assert weights == [0.5, 0.5, 1.0]


def test_malformed_and_wrong_calls_are_answered_and_scored(tokenizer):
    item = prompt_item(tokenizer, "Convert 2 km to m.", "2000 m",
                       {"name": "convert_units", "arguments": {"value": 2, "from_unit": "km", "to_unit": "m"}})
    bad_json = '<tool_call>\n{"name": "convert_units", "arguments": {"value": 2\n</tool_call>'
    wrong_args = canonical_call({"name": "convert_units", "arguments": {"value": 2, "from_unit": "km",
                                                                        "to_unit": "cm"}})
    wrong_tool = canonical_call({"name": "calculator", "arguments": {"expression": "2 * 1000"}})
    scripts = [[bad_json, "The answer is 2000 m."], [wrong_args, "The answer is 200000 cm."],
               [wrong_tool, "The answer is 2000 m."]]
    episodes, _ = run_scripted(tokenizer, [item, item, item], scripts)
    assert episodes[0].tool_results == [["error: malformed tool call (not valid JSON)"]]
    assert episodes[1].tool_results == [["result: 200000 cm"]] and episodes[2].tool_results == [["result: 2000"]]
    rewards, _, _ = build_agent_rewards(["tool_format", "tool_args", "final_answer"], None)
    assert score_episodes(episodes, rewards).tolist() == [[0.0, 0.0, 1.0], [1.0, 0.5, 0.0], [1.0, 0.0, 1.0]]


def test_a_turn_cut_off_ends_the_episode_without_an_answer(tokenizer):
    item = prompt_item(tokenizer)
    episodes, calls = run_scripted(tokenizer, [item], [["The answer is 391."]], end=False)
    assert len(calls) == 1 and episodes[0].truncated and episodes[0].final_text is None
    rewards, _, _ = build_agent_rewards(["final_answer"], None)
    assert score_episodes(episodes, rewards).tolist() == [[0.0]]
    assert sum(episodes[0].mask) == len(tokenizer.encode("The answer is 391.", add_special_tokens=False))


def test_rollout_logprobs_attend_to_tool_results_and_match_unpadded_forwards(tokenizer):
    """Left-padded prompts, right-padded multi-turn tails of different lengths: each row's log-probs equal a
    forward of that episode alone (so padding is invisible and tool results are attended to)."""
    torch.manual_seed(0)
    model = TinyMindForCausalLM(TinyMindConfig(vocab_size=6400, hidden_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2)).eval()
    long_item = prompt_item(tokenizer, "What is the capital of New Zealand, please?", "Wellington",
                            {"name": "lookup_capital", "arguments": {"country": "New Zealand"}})
    items = [prompt_item(tokenizer), long_item]
    scripts = [[canonical_call(items[0]["columns"]["call"]), "The answer is 391."], ["The answer is Wellington."]]
    episodes, _ = run_scripted(tokenizer, items, scripts)
    rollout = episodes_to_rollout(episodes, tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        logps, _ = rollout_logprobs(model, rollout, temperature=1.0)
        for row, episode in enumerate(episodes):
            ids = torch.tensor([episode.ids])
            alone = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
            expected = alone[torch.arange(len(episode.ids) - 1), ids[0, 1:]][episode.prompt_len - 1:]
            tail = len(episode.ids) - episode.prompt_len
            torch.testing.assert_close(logps[row, :tail], expected, atol=1e-4, rtol=1e-4)
            assert rollout.completion_mask[row, tail:].sum() == 0
