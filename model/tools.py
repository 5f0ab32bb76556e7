"""Deterministic local tools for tool-calling chats and agent RL (train_agent.py, scripts/eval_toolcall.py), and
the parser that reads tool calls out of model output. No network, no randomness, no eval(): the same call always
gives the same result, so a reward can check it.

    calculator       {"expression": "17 * 23"}                            -> "391"
    convert_units    {"value": 3.5, "from_unit": "km", "to_unit": "m"}    -> "3500 m"
    lookup_capital   {"country": "France"}                                -> "Paris"

The `tool` message that carries a result reads "result: 391" (`run_tool`), and a refused call "error: why".

A call the model writes is the block the chat template teaches (model/tokenizer_config.json; the same form
scripts/serve_openai_api.py returns as OpenAI `tool_calls`):

    <tool_call>
    {"name": "calculator", "arguments": {"expression": "17 * 23"}}
    </tool_call>

`parse_tool_calls` finds every such block and says which are malformed (bad JSON, no name, arguments not an object,
no closing tag); `check_call` validates a parsed call against the tool's JSON schema; `run_tool` executes it and
returns the text of the `tool` message (an "error: ..." text for a bad call, so the model can read what went
wrong). `TOOL_SCHEMAS` are the descriptions the chat template lists in the system prompt (MiniMind's `functions`)."""
import ast
import json
import operator
import re
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction

# ================================================================================================ calculator

MAX_EXPRESSION_CHARS = 200
MAX_EXPONENT = 64  # 10 ** 64 is fine; 9 ** 9 ** 9 would take the machine down
MAX_MAGNITUDE = Fraction(10) ** 30  # intermediate results stay printable and cheap

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class ToolError(ValueError):
    """A call the tool refuses: its message becomes the tool's reply ("error: ...")."""


def _evaluate(node) -> Fraction:
    """Exact arithmetic over the parsed expression: numbers, + - * / // % **, unary signs, parentheses. Every other
    node (names, calls, attributes, subscripts, strings, comparisons...) is refused: nothing is looked up or run."""
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return Fraction(Decimal(repr(node.value))) if isinstance(node.value, float) else Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            if right.denominator != 1 or abs(right) > MAX_EXPONENT:
                raise ToolError(f"exponents must be whole numbers up to {MAX_EXPONENT}")
            if left == 0 and right < 0:
                raise ToolError("division by zero")
            value = left ** int(right)
        elif isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and right == 0:
            raise ToolError("division by zero")
        else:
            value = _BINARY[type(node.op)](left, right)
        value = Fraction(value)
        if abs(value) > MAX_MAGNITUDE:
            raise ToolError("the result is too large")
        return value
    raise ToolError(f"unsupported expression element: {type(node).__name__}")


def format_number(value: Fraction, places: int = 4) -> str:
    """An exact result as text: an integer as it is, anything else rounded to `places` decimals, no trailing zeros
    ("1/3" -> "0.3333", "7/2" -> "3.5", "-0.00001" -> "0")."""
    if value.denominator == 1:
        return str(value.numerator)
    text = f"{round(Decimal(value.numerator) / Decimal(value.denominator), places):f}"
    text = text.rstrip("0").rstrip(".") if "." in text else text
    return "0" if text in ("-0", "") else text


def calculate(expression: str) -> str:
    """The value of an arithmetic expression (exact, then rounded to 4 decimals). Python's `ast` parses it; only
    numbers and arithmetic operators are evaluated, so `__import__('os')` or `2 ** 10 ** 10` is refused, never run."""
    if not isinstance(expression, str):
        raise ToolError("expression must be a string")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ToolError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    text = expression.replace("×", "*").replace("÷", "/").replace("^", "**").strip()
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError):
        raise ToolError(f"cannot parse {expression!r}") from None
    return format_number(_evaluate(tree))


# ================================================================================================ units

LENGTH = {"mm": Fraction(1, 1000), "cm": Fraction(1, 100), "m": Fraction(1), "km": Fraction(1000),
          "in": Fraction(254, 10000), "ft": Fraction(3048, 10000), "mi": Fraction(1609344, 1000)}  # in metres
MASS = {"g": Fraction(1, 1000), "kg": Fraction(1), "lb": Fraction(45359237, 10 ** 8),
        "oz": Fraction(45359237, 16 * 10 ** 8)}  # in kilograms (international pound and ounce)
TEMPERATURE = ("C", "F", "K")
UNIT_ALIASES = {"celsius": "C", "fahrenheit": "F", "kelvin": "K", "°c": "C", "°f": "F", "c": "C", "f": "F", "k": "K",
                "meter": "m", "meters": "m", "metre": "m", "metres": "m", "kilometer": "km", "kilometers": "km",
                "centimeter": "cm", "centimeters": "cm", "millimeter": "mm", "millimeters": "mm", "inch": "in",
                "inches": "in", "foot": "ft", "feet": "ft", "mile": "mi", "miles": "mi", "gram": "g", "grams": "g",
                "kilogram": "kg", "kilograms": "kg", "pound": "lb", "pounds": "lb", "lbs": "lb", "ounce": "oz",
                "ounces": "oz"}


def unit_symbol(unit: str) -> str:
    if not isinstance(unit, str):
        raise ToolError("units must be strings")
    key = unit.strip()
    if key in LENGTH or key in MASS or key in TEMPERATURE:
        return key
    symbol = UNIT_ALIASES.get(key.lower())
    if symbol is None:
        raise ToolError(f"unknown unit {unit!r}; known: {', '.join([*LENGTH, *MASS, *TEMPERATURE])}")
    return symbol


def _to_kelvin(value: Fraction, unit: str) -> Fraction:
    return {"C": value + Fraction(27315, 100), "K": value, "F": (value - 32) * Fraction(5, 9) + Fraction(27315, 100)}[
        unit]


def _from_kelvin(value: Fraction, unit: str) -> Fraction:
    return {"C": value - Fraction(27315, 100), "K": value, "F": (value - Fraction(27315, 100)) * Fraction(9, 5) + 32}[
        unit]


def convert_units(value, from_unit: str, to_unit: str) -> str:
    """`value` in `from_unit` expressed in `to_unit`, rounded to 2 decimals, with the unit: "3500 m". Length (mm, cm,
    m, km, in, ft, mi), mass (g, kg, lb, oz) and temperature (C, F, K); converting across kinds is an error."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ToolError("value must be a number")
    try:
        amount = Fraction(Decimal(str(value).strip()))
    except ArithmeticError:
        raise ToolError(f"value {value!r} is not a number") from None
    source, target = unit_symbol(from_unit), unit_symbol(to_unit)
    for table in (LENGTH, MASS):
        if source in table and target in table:
            return f"{format_number(amount * table[source] / table[target], 2)} {target}"
    if source in TEMPERATURE and target in TEMPERATURE:
        kelvin = _to_kelvin(amount, source)
        if kelvin < 0:
            raise ToolError("below absolute zero")
        return f"{format_number(_from_kelvin(kelvin, target), 2)} {target}"
    raise ToolError(f"cannot convert {source} to {target}: different kinds of quantity")


# ================================================================================================ lookup

CAPITALS = {
    "Argentina": "Buenos Aires", "Australia": "Canberra", "Austria": "Vienna", "Belgium": "Brussels",
    "Brazil": "Brasilia", "Bulgaria": "Sofia", "Canada": "Ottawa", "Chile": "Santiago", "China": "Beijing",
    "Colombia": "Bogota", "Croatia": "Zagreb", "Cuba": "Havana", "Czechia": "Prague", "Denmark": "Copenhagen",
    "Egypt": "Cairo", "Estonia": "Tallinn", "Ethiopia": "Addis Ababa", "Finland": "Helsinki", "France": "Paris",
    "Germany": "Berlin", "Ghana": "Accra", "Greece": "Athens", "Hungary": "Budapest", "Iceland": "Reykjavik",
    "India": "New Delhi", "Indonesia": "Jakarta", "Iran": "Tehran", "Iraq": "Baghdad", "Ireland": "Dublin",
    "Israel": "Jerusalem", "Italy": "Rome", "Japan": "Tokyo", "Kenya": "Nairobi", "Latvia": "Riga",
    "Lithuania": "Vilnius", "Malaysia": "Kuala Lumpur", "Mexico": "Mexico City", "Mongolia": "Ulaanbaatar",
    "Morocco": "Rabat", "Nepal": "Kathmandu", "Netherlands": "Amsterdam", "New Zealand": "Wellington",
    "Nigeria": "Abuja", "Norway": "Oslo", "Pakistan": "Islamabad", "Peru": "Lima", "Philippines": "Manila",
    "Poland": "Warsaw", "Portugal": "Lisbon", "Romania": "Bucharest", "Russia": "Moscow", "Saudi Arabia": "Riyadh",
    "Serbia": "Belgrade", "Singapore": "Singapore", "Slovakia": "Bratislava", "South Africa": "Pretoria",
    "South Korea": "Seoul", "Spain": "Madrid", "Sweden": "Stockholm", "Switzerland": "Bern", "Thailand": "Bangkok",
    "Turkey": "Ankara", "Ukraine": "Kyiv", "United Kingdom": "London", "United States": "Washington",
    "Uruguay": "Montevideo", "Venezuela": "Caracas", "Vietnam": "Hanoi",
}
_CAPITALS_FOLDED = {" ".join(k.split()).casefold(): v for k, v in CAPITALS.items()}


def lookup_capital(country: str) -> str:
    """The capital of a country from a fixed table (case and spacing ignored); unknown countries are an error."""
    if not isinstance(country, str):
        raise ToolError("country must be a string")
    capital = _CAPITALS_FOLDED.get(" ".join(country.split()).casefold())
    if capital is None:
        raise ToolError(f"no capital known for {country!r}")
    return capital


# ================================================================================================ registry


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict  # JSON schema of the arguments object
    function: object

    @property
    def schema(self) -> dict:
        """What the chat template lists: OpenAI's function form (name, description, parameters)."""
        return {"name": self.name, "description": self.description, "parameters": self.parameters}


def _object(properties: dict, required: list) -> dict:
    return {"type": "object", "properties": properties, "required": required}


TOOLS = {tool.name: tool for tool in [
    Tool("calculator", "Evaluate an arithmetic expression.",
         _object({"expression": {"type": "string"}}, ["expression"]), calculate),
    Tool("convert_units", "Convert a length, mass or temperature.",
         _object({"value": {"type": "number"}, "from_unit": {"type": "string"}, "to_unit": {"type": "string"}},
                 ["value", "from_unit", "to_unit"]), convert_units),
    Tool("lookup_capital", "Find the capital city of a country.",
         _object({"country": {"type": "string"}}, ["country"]), lookup_capital),
]}
TOOL_SCHEMAS = [tool.schema for tool in TOOLS.values()]

_JSON_TYPES = {"string": (str,), "number": (int, float), "integer": (int,), "boolean": (bool,), "object": (dict,),
               "array": (list,)}


def check_call(name: str, arguments: dict, tools: dict | None = None) -> str | None:
    """Why a parsed call does not fit its tool's schema (unknown tool, missing or unexpected argument, wrong JSON
    type), or None when it does."""
    tools = TOOLS if tools is None else tools
    tool = tools.get(name)
    if tool is None:
        return f"unknown tool {name!r}; available: {', '.join(tools)}"
    properties, required = tool.parameters["properties"], tool.parameters.get("required", [])
    missing = [key for key in required if key not in arguments]
    if missing:
        return f"{name}: missing argument(s) {', '.join(missing)}"
    extra = [key for key in arguments if key not in properties]
    if extra:
        return f"{name}: unexpected argument(s) {', '.join(extra)}"
    for key, value in arguments.items():
        expected = properties[key].get("type")
        bad_bool = isinstance(value, bool) and expected in ("number", "integer")
        if expected in _JSON_TYPES and (bad_bool or not isinstance(value, _JSON_TYPES[expected])):
            return f"{name}: argument {key} must be a {expected}"
    return None


# A number at the start of a message is spelled with other tokens than after a space ("391" is `3` `9` `1`, "is 391"
# is ` 3` `9` `1`): behind "result: " the tool message holds the very tokens the reply "The answer is 391." copies.
RESULT_PREFIX = "result: "


def run_tool(name: str, arguments: dict, tools: dict | None = None) -> str:
    """The text of the `tool` message answering a call: "result: <the result>", or "error: why" for a call that does
    not fit the schema or that the tool refuses."""
    reason = check_call(name, arguments, tools)
    if reason is not None:
        return f"error: {reason}"
    try:
        return RESULT_PREFIX + (TOOLS if tools is None else tools)[name].function(**arguments)
    except ToolError as error:
        return f"error: {error}"


def result_value(message: str) -> str:
    """The result a `tool` message carries ("result: 391" -> "391"); any other text is returned as it is."""
    return message.removeprefix(RESULT_PREFIX)


# ================================================================================================ parsing model output

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"(.*?)(?:" + re.escape(CLOSE) + r"|$)", re.DOTALL)


@dataclass
class ParsedCall:
    """One <tool_call> block: the call if its JSON is {"name": str, "arguments": {...}}, else why not."""
    raw: str
    name: str | None = None
    arguments: dict = field(default_factory=dict)
    error: str | None = None  # None: well-formed JSON with a name and an arguments object

    @property
    def ok(self) -> bool:
        return self.error is None


def parse_call_body(body: str) -> tuple[str | None, dict, str | None]:
    """(name, arguments, None) for a block's JSON, or (name or None, {}, why it is malformed). Arguments written as
    a JSON string holding an object (OpenAI's wire form) are accepted too."""
    try:
        call = json.loads(body)
    except (ValueError, RecursionError):
        return None, {}, "not valid JSON"
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
        return None, {}, 'not an object with a "name" string'
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except (ValueError, RecursionError):
            return call["name"], {}, "arguments are not valid JSON"
    if not isinstance(arguments, dict):
        return call["name"], {}, "arguments are not an object"
    return call["name"], arguments, None


def parse_tool_calls(text: str) -> tuple[str, list[ParsedCall]]:
    """(the text outside tool-call blocks, stripped; every <tool_call> block in order). A block without its closing
    tag (cut off, or never closed) counts as a malformed call: the model tried to call and failed."""
    calls = []
    for match in _BLOCK.finditer(text):
        closed = match.group(0).endswith(CLOSE)
        name, arguments, error = parse_call_body(match.group(1).strip())
        if not closed:
            error = "no closing </tool_call>"
        calls.append(ParsedCall(match.group(0), name, arguments, error))
    content = _BLOCK.sub("", text).strip()
    return content, calls


def call_message(content: str, calls: list[ParsedCall]) -> dict:
    """The assistant message for a turn with well-formed calls, in MiniMind's / OpenAI's form (for logs and for
    rendering the conversation with the chat template)."""
    return {"role": "assistant", "content": content,
            "tool_calls": [{"type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                           for c in calls if c.ok]}


# ================================================================================================ comparing calls


def _same_value(a, b) -> bool:
    """Arguments compared as a grader would: numbers by value (3.5 == 3.50, "3.5" == 3.5), strings case-folded with
    all whitespace removed ("17*23" == "17 * 23")."""
    def number(x):
        if isinstance(x, bool):
            return None
        try:
            return Fraction(Decimal(str(x).strip())) if isinstance(x, (int, float, str)) else None
        except ArithmeticError:
            return None
    na, nb = number(a), number(b)
    if na is not None and nb is not None:
        return na == nb
    if isinstance(a, str) and isinstance(b, str):
        return "".join(a.split()).casefold() == "".join(b.split()).casefold()
    return a == b


def same_call(name: str | None, arguments: dict, reference: dict) -> bool:
    """Whether a call names the reference's tool with equivalent arguments (see _same_value), no more, no fewer."""
    ref_args = reference.get("arguments", {})
    return (name == reference.get("name") and set(arguments) == set(ref_args)
            and all(_same_value(arguments[k], ref_args[k]) for k in ref_args))
