"""The shapes feedback arrives in, and how one input row becomes KTO examples (prompt text,
completion text, label) before tokenization.

The shapes are TRL's dataset types, told apart by their columns (or named in data.format):

    unpaired         prompt, completion, label
    paired           prompt, chosen, rejected   -> a desirable and an undesirable example
    implicit_paired  chosen, rejected           -> the same, with the shared start as the prompt
    messages         messages, label            -> the last turn (an assistant's) is the completion

A text field is conversational when it holds a list of {"role", "content"} messages. Such
examples are rendered here, once, with the tokenizer's chat template, as TRL does.
A row that cannot become an example gets a reason instead; it is never guessed at.
"""

from typing import Any, NamedTuple, Optional

import pyarrow as pa


class DataError(ValueError):
    """Input that cannot be trained on as a whole; the message names the file and column."""


JSON_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")
FEEDBACK_SUFFIXES = (".parquet", *JSON_SUFFIXES)

FORMAT_COLUMNS = {
    "unpaired": ("prompt", "completion", "label"),
    "paired": ("prompt", "chosen", "rejected"),
    "messages": ("messages", "label"),
    "implicit_paired": ("chosen", "rejected"),
}
FORMATS = ("auto", *FORMAT_COLUMNS)
PAIRED_FORMATS = ("paired", "implicit_paired")


def detect_format(columns: list[str], requested: str, source: str) -> str:
    """The format named in the config, or else the first whose columns the file has."""
    if requested != "auto":
        missing = [column for column in FORMAT_COLUMNS[requested] if column not in columns]
        if missing:
            raise DataError(f"{source}: required column(s) {missing} missing (columns: {columns}); data.format = "
                            f"{requested} needs {', '.join(FORMAT_COLUMNS[requested])}")
        return requested
    for name, needed in FORMAT_COLUMNS.items():
        if all(column in columns for column in needed):
            return name
    expected = "; ".join(f"{name}: {', '.join(needed)}" for name, needed in FORMAT_COLUMNS.items())
    raise DataError(f"{source}: the columns {columns} match no feedback format ({expected}); rename the columns, "
                    "or set data.format and add the missing ones")


def _type_kind(data_type: pa.DataType) -> str:
    if pa.types.is_string(data_type) or pa.types.is_large_string(data_type):
        return "text"
    if pa.types.is_binary(data_type) or pa.types.is_large_binary(data_type):
        return "bytes"  # decoded as UTF-8 row by row; a row that fails is quarantined
    if (pa.types.is_list(data_type) or pa.types.is_large_list(data_type)) and pa.types.is_struct(
            data_type.value_type) and {"role", "content"} <= {f.name for f in data_type.value_type}:
        return "messages"
    if pa.types.is_boolean(data_type):
        return "bool"
    if pa.types.is_integer(data_type):
        return "int"
    if pa.types.is_null(data_type):
        return "null"  # every value null (a JSON block can infer this); the rows are quarantined
    return str(data_type)


def check_types(schema: pa.Schema, fmt: str, label_map: dict, source: str) -> None:
    """Stop at start-up when a column's type cannot hold what the format needs."""
    text_kinds = {"text", "bytes", "messages", "null"}
    for column in FORMAT_COLUMNS[fmt]:
        kind = _type_kind(schema.field(column).type)
        if column == "label":
            if kind == "text" and not label_map:
                raise DataError(f"{source}: column 'label' holds strings, which are never guessed at; map each "
                                "value in the config, e.g. data.label_map: {thumbs_up: true, thumbs_down: false}")
            if kind not in {"bool", "int", "text", "null"}:
                raise DataError(f"{source}: column 'label' has type {schema.field(column).type}; expected bool, "
                                "0/1 integers, or strings mapped by data.label_map")
        elif column == "messages" and kind not in {"messages", "null"}:
            raise DataError(f"{source}: column 'messages' has type {schema.field(column).type}; expected a list "
                            "of {role, content} messages")
        elif kind not in text_kinds:
            raise DataError(f"{source}: column {column!r} has type {schema.field(column).type}; expected a string "
                            "or a list of {role, content} messages")


def parse_label(value: Any, label_map: dict) -> tuple[Optional[bool], str]:
    """(label, reason): bool, 0/1, or a value the config maps; anything else is a row error."""
    if value is None:
        return None, "null_label"
    if value in label_map and not isinstance(value, bool):
        return bool(label_map[value]), ""
    if isinstance(value, bool):
        return value, ""
    if isinstance(value, int) and value in (0, 1):
        return bool(value), ""
    return None, "unknown_label"


def split_shared_prompt(chosen: Any, rejected: Any, delimiter: str) -> tuple[Any, Any, Any, str]:
    """(prompt, chosen completion, rejected completion, reason) of an implicit-prompt pair.

    Text: the shared start up to and including the last `delimiter` in it (hh-rlhf transcripts:
    "\\n\\nAssistant:"), so the cut never falls inside a word. Messages: the shared leading turns.
    """
    if isinstance(chosen, str) and isinstance(rejected, str):
        shared = 0
        for a, b in zip(chosen, rejected):
            if a != b:
                break
            shared += 1
        cut = chosen.rfind(delimiter, 0, shared)
        if cut < 0:
            return None, None, None, "no_shared_prompt"
        end = cut + len(delimiter)
        return chosen[:end], chosen[end:], rejected[end:], ""
    if isinstance(chosen, list) and isinstance(rejected, list):
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        if shared == 0:
            return None, None, None, "no_shared_prompt"
        return chosen[:shared], chosen[shared:], rejected[shared:], ""
    return None, None, None, "malformed_pair"


def split_messages(messages: Any) -> tuple[Any, Any, str]:
    """(prompt turns, [last assistant turn], reason) of a `messages` row."""
    if not isinstance(messages, list) or not messages:
        return None, None, "empty_prompt"
    if not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant":
        return None, None, "last_message_not_assistant"
    return messages[:-1], messages[-1:], ""


class Example(NamedTuple):
    """One KTO example of an input row, before rendering and tokenization."""
    row: int  # the input row's index in its batch
    side: int  # 0: an unpaired row or the chosen half of a pair; 1: the rejected half
    prompt: Any  # text, or a list of {role, content} messages
    completion: Any
    label: Optional[bool]
    reason: str  # why the row cannot become an example ("" when it can)
    label_reason: str  # the label's own problem, kept apart so that the text's, found later, takes precedence


def too_long(value: Any, max_chars: int) -> bool:
    """Whether a text field (a string, UTF-8 bytes, or a list of messages) holds more than
    `max_chars` characters in one text (bytes are counted as they are: at least their characters)."""
    if isinstance(value, (str, bytes)):
        return len(value) > max_chars
    if isinstance(value, list):
        return any(isinstance(m, dict) and isinstance(m.get("content"), (str, bytes)) and len(m["content"]) > max_chars
                   for m in value)
    return False


def to_examples(columns: dict[str, list], fmt: str, label_map: dict, delimiter: str,
                max_chars: Optional[int] = None) -> list[Example]:
    """The examples of a batch of input rows: every input row yields one (two for paired
    formats), bad or not, so nothing is lost. A row with a text over `max_chars` characters is
    `text_too_long` before anything reads its text (a 10 GB field is never split or tokenized)."""
    out = []
    n = len(next(iter(columns.values())))
    texts = [c for c in FORMAT_COLUMNS[fmt] if c != "label"]
    for i in range(n):
        if max_chars is not None and any(too_long(columns[c][i], max_chars) for c in texts):
            out.extend(Example(i, side, None, None, None, "text_too_long", "")
                       for side in ((0, 1) if fmt in PAIRED_FORMATS else (0,)))
        elif fmt == "unpaired":
            label, label_reason = parse_label(columns["label"][i], label_map)
            out.append(Example(i, 0, columns["prompt"][i], columns["completion"][i], label, "", label_reason))
        elif fmt == "messages":
            label, label_reason = parse_label(columns["label"][i], label_map)
            prompt, completion, reason = split_messages(columns["messages"][i])
            out.append(Example(i, 0, prompt, completion, label, reason, label_reason))
        else:
            chosen, rejected = columns["chosen"][i], columns["rejected"][i]
            if fmt == "paired":
                prompt, reason = columns["prompt"][i], ""
            else:
                prompt, chosen, rejected, reason = split_shared_prompt(chosen, rejected, delimiter)
            out.append(Example(i, 0, prompt, chosen, True, reason, ""))
            out.append(Example(i, 1, prompt, rejected, False, reason, ""))
    return out


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)


def _as_text(value: Any) -> Optional[str]:
    if isinstance(value, bytes):
        return value.decode("utf-8")  # UnicodeDecodeError: the caller quarantines the row
    return value


class Rendered(NamedTuple):
    """An example's texts as the tokenizer will see them."""
    prompt: str
    completion: str
    templated: bool  # rendered by the chat template (which writes its own special tokens)
    reason: str  # why it cannot be rendered ("" when it can)


def render(prompt: Any, completion: Any, tokenizer, refused_tokens: tuple[str, ...] = (),
           max_chars: Optional[int] = None) -> Rendered:
    """An example's prompt and completion texts.

    Conversational examples go through the chat template: the prompt with the generation
    prompt, and the completion as what the full conversation adds after it. Feedback text that
    holds the literal string of one of `refused_tokens` (the tokenizer's control tokens) is
    refused: tokenized, it would become that token, a turn boundary planted by whoever wrote it.
    A rendered conversation over `max_chars` characters is `text_too_long`.
    """
    try:
        prompt, completion = _as_text(prompt), _as_text(completion)
    except UnicodeDecodeError:
        return Rendered("", "", False, "undecodable_text")
    if isinstance(prompt, list) or isinstance(completion, list):
        if not (_is_messages(prompt) and _is_messages(completion)):
            return Rendered("", "", True, "malformed_messages")
        if not any(m["content"].strip() for m in prompt):
            return Rendered("", "", True, "empty_prompt")
        if not any(m["content"].strip() for m in completion):
            return Rendered("", "", True, "empty_completion")
        if _holds_any([m["content"] for m in prompt + completion], refused_tokens):
            return Rendered("", "", True, "control_token_in_text")
        try:
            prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            full_text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
        except Exception:  # templates raise on what they do not support (e.g. turn order)
            return Rendered("", "", True, "chat_template_error")
        if not full_text.startswith(prompt_text):
            return Rendered("", "", True, "chat_template_error")
        if max_chars is not None and len(full_text) > max_chars:  # many turns under the cap can add up over it
            return Rendered("", "", True, "text_too_long")
        return Rendered(prompt_text, full_text[len(prompt_text):], True, "")
    if not isinstance(prompt, str) or not prompt.strip():
        return Rendered("", "", False, "empty_prompt")
    if not isinstance(completion, str) or not completion.strip():
        return Rendered("", "", False, "empty_completion")
    if _holds_any([prompt, completion], refused_tokens):
        return Rendered("", "", False, "control_token_in_text")
    return Rendered(prompt, completion, False, "")


def _holds_any(texts: list[str], tokens: tuple[str, ...]) -> bool:
    return any(token in text for text in texts for token in tokens)
