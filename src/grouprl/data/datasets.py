"""Load prompt datasets: jsonl, json, parquet, csv/tsv, `datasets.save_to_disk` folders,
any folder or hub id `datasets.load_dataset` reads, or lists.

jsonl, json and parquet are read here, so a broken line is named by its number; csv/tsv,
data folders and hub ids go through `datasets.load_dataset` (cached as it caches).

Every row needs a prompt column holding a string or chat messages (a list of
``{"role", "content"}`` dicts); every other column is kept for the reward functions.
A bad row is reported with its place, ``"<file>: row <n>: field '<name>': <what>"``,
and either stops the load (``on_bad_row="error"``) or is skipped and counted
(``on_bad_row="skip"``). Text that is not valid Unicode is a bad row like any other: a line
of a .jsonl file with invalid UTF-8 bytes, a string of a .parquet file with them, or a
lone surrogate anywhere in a row (a ``"\ud800"`` JSON escape without its pair, or such a
Python string), which no tokenizer can encode.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MEMORY = "<memory>"
SUPPORTED_FORMATS = (
    ".jsonl",
    ".json",
    ".parquet",
    ".csv",
    ".tsv",
    "a directory written by datasets' save_to_disk",
    "a data directory or hub id that datasets.load_dataset reads",
    "a list of dicts",
)
ON_BAD_ROW = ("error", "skip")
CHAT_TEMPLATE_MODES = ("auto", "never")
MAX_REASONS = 5  # how many skip messages a PromptDataset keeps


class DataError(ValueError):
    """A dataset that cannot be used; the message names the file, row and field."""


@dataclass
class PromptExample:
    """One usable row.

    prompt:  the prompt as in the data (a string or a list of chat messages).
    text:    the string fed to the model (chat template applied when there is one).
    columns: every other column of the row (gold answers, metadata...).
    row:     1-based row number in the source (the line number for .jsonl).
    """

    prompt: str | list[dict]
    text: str
    columns: dict[str, Any]
    row: int


@dataclass
class PromptDataset(Sequence):
    """The usable rows of a source, plus what was skipped and why."""

    source: str
    examples: list[PromptExample] = field(default_factory=list)
    skipped: int = 0
    skipped_reasons: list[str] = field(default_factory=list)  # the first MAX_REASONS
    skipped_rows: list[int] = field(default_factory=list)  # 1-based row number of every skip

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i):  # int -> PromptExample, slice -> list
        return self.examples[i]


class _BadRow(Exception):
    """Internal: one row is unusable; `field` and `what` build the DataError message."""

    def __init__(self, what: str, field: str | None = None) -> None:
        super().__init__(what)
        self.what = what
        self.field = field


class _NoTemplate(_BadRow):
    """Internal: chat messages but no chat template; a setup error, never skipped."""


class _Unreadable(str):
    """Internal marker for a row that could not be read (bad JSON, bad UTF-8); its text is
    the reason, with the field first when one is known (as `benchmarks.py` reads it)."""

    def __new__(cls, what: str, field: str | None = None) -> _Unreadable:
        marker = super().__new__(cls, what if field is None else f"field '{field}': {what}")
        marker.what, marker.field = what, field
        return marker


_InvalidJSON = _Unreadable  # the name `benchmarks.py` imports


def _printable(text: str) -> str:
    """`text` with lone surrogates escaped, so a message about them can be printed."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _place(source: str, row: int, field: str | None, what: str) -> str:
    where = f"{source}: row {row}: "
    return _printable(where + (f"field '{field}': {what}" if field is not None else what))


def load_prompts(
    source: str | os.PathLike | list[dict],
    *,
    tokenizer: Any = None,
    prompt_column: str = "prompt",
    max_prompt_length: int | None = None,
    on_bad_row: str = "error",
    chat_template: str = "auto",
    split: str = "train",
    system_prompt: str | None = None,
    completion_from_messages: str | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> PromptDataset:
    """Read `source` into a PromptDataset, validating every row.

    `tools` (JSON schemas, an environment's tools) go to the chat template
    (`apply_chat_template(tools=...)`), which describes them to the model; without a
    template they are not shown (a model trained to call them knows them).

    `completion_from_messages` (SFT on TRL's conversational format, e.g. a `messages`
    prompt column): a chat prompt that ends with an assistant message is cut there; that
    message's content becomes the column of this name and the prompt is what precedes it.

    chat_template="auto" renders prompts with the tokenizer's chat template when it has
    one (a string prompt becomes one user message, after `system_prompt` if given);
    without a template, strings are used as they are and chat messages are an error.
    chat_template="never" uses strings as they are and joins messages as
    "role: content" lines. `system_prompt` goes first as a system message unless the
    row already starts with one; a plain string rendered without a template gets it
    prepended, followed by a blank line. `max_prompt_length` (tokens of `text`, no
    special tokens added) is checked only when a tokenizer is given.

    Raises DataError for a source that cannot be read, a bad row (with
    on_bad_row="error"), chat messages without a chat template (even with "skip": it
    is a setup error), or no usable row; ValueError for an unknown option value.
    """
    if on_bad_row not in ON_BAD_ROW:
        raise ValueError(f"on_bad_row must be one of {ON_BAD_ROW}, got {on_bad_row!r}")
    if chat_template not in CHAT_TEMPLATE_MODES:
        raise ValueError(
            f"chat_template must be one of {CHAT_TEMPLATE_MODES}, got {chat_template!r}"
        )
    name, rows = _open(source, split)
    reader = _RowReader(
        tokenizer=tokenizer,
        prompt_column=prompt_column,
        max_prompt_length=max_prompt_length,
        use_template=chat_template == "auto" and bool(getattr(tokenizer, "chat_template", None)),
        mode=chat_template,
        system_prompt=system_prompt,
        completion_from_messages=completion_from_messages,
        tools=tools,
    )
    out = PromptDataset(source=name)
    n_rows = 0
    for row, record in rows:
        n_rows += 1
        try:
            example = reader.example(record, row)
        except _BadRow as bad:
            msg = _place(name, row, bad.field, bad.what)
            if on_bad_row == "error" or isinstance(bad, _NoTemplate):
                raise DataError(msg) from None
            out.skipped += 1
            out.skipped_rows.append(row)
            if len(out.skipped_reasons) < MAX_REASONS:
                out.skipped_reasons.append(msg)
            continue
        out.examples.append(example)
    if n_rows == 0:
        raise DataError(f"{name}: no rows")
    if not out.examples:
        raise DataError(
            f"{name}: every row was bad ({out.skipped} skipped); first: "
            + "; ".join(out.skipped_reasons[:3])
        )
    return out


def prompt_renderer(
    tokenizer: Any,
    *,
    chat_template: str = "auto",
    system_prompt: str | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> Callable[[str | list[dict]], str]:
    """The function `load_prompts` turns a prompt (string or messages) into model text with,
    for code that writes new prompts during training (rollout strategies adding a hint)."""
    reader = _RowReader(
        tokenizer=tokenizer,
        prompt_column="prompt",
        max_prompt_length=None,
        use_template=chat_template == "auto" and bool(getattr(tokenizer, "chat_template", None)),
        mode=chat_template,
        system_prompt=system_prompt,
        completion_from_messages=None,
        tools=tools,
    )
    return reader.render


# ---------------------------------------------------------------- reading sources


def _open(source: Any, split: str) -> tuple[str, Iterator[tuple[int, Any]]]:
    """Name of the source and an iterator of (1-based row number, record)."""
    if isinstance(source, list):
        return MEMORY, enumerate(source, start=1)
    if not isinstance(source, (str, os.PathLike)):
        raise DataError(
            f"unsupported source type {type(source).__name__}; "
            f"supported: {', '.join(SUPPORTED_FORMATS)}"
        )
    name = os.fspath(source)
    path = Path(name).expanduser()
    try:
        found = path.exists()
    except (OSError, ValueError):  # a name too long, or with a NUL byte
        found = False
    if not found:
        suffix = path.suffix.lower()
        if _HUB_ID.fullmatch(name) and suffix not in _FILE_SUFFIXES:
            return name, _read_with_datasets(name, name, split)
        raise DataError(f"{name}: no such file or directory")
    if path.is_dir():
        if any((path / f).is_file() for f in ("dataset_info.json", "dataset_dict.json")):
            return name, _read_saved(path, name, split)
        return name, _read_with_datasets(
            str(path),
            name,
            split,
            what="a directory must be written by datasets' save_to_disk or hold data files "
            "that datasets.load_dataset reads",
        )
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        sep = {"delimiter": "\t"} if suffix == ".tsv" else {}
        return name, _read_with_datasets("csv", name, "train", data_files=str(path), **sep)
    if suffix == ".jsonl":
        return name, _read_jsonl(path, name)
    if suffix == ".json":
        return name, _read_json(path, name)
    if suffix == ".parquet":
        return name, _read_parquet(path, name)
    raise DataError(
        f"{name}: unsupported format {suffix or '(no extension)'!r}; "
        f"supported: {', '.join(SUPPORTED_FORMATS)}"
    )


# a hub dataset id ("gsm8k", "openai/gsm8k"): tried when no local path has the name
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".tsv", ".txt", ".arrow")


def _read_with_datasets(
    target: str,
    name: str,
    split: str,
    what: str = "not a local file, folder or readable dataset",
    **kwargs: Any,
) -> Iterator[tuple[int, Any]]:
    """Rows through `datasets.load_dataset(target, split=split, **kwargs)`: csv/tsv files,
    data folders, hub ids. Its error, first line, names the source."""
    import datasets

    try:
        ds = datasets.load_dataset(target, split=split, **kwargs)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{name}: {what} ({type(e).__name__}: {first})") from e
    return _arrow_rows(ds.with_format("arrow")[:])


def _read_bytes(path: Path, name: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{name}: cannot read: {e}") from e
    return data.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark


def _parse_json(text: str) -> Any:
    """json.loads; very deep nesting (RecursionError) is reported as invalid JSON too."""
    try:
        return json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", text, 0) from None


def _read_jsonl(path: Path, name: str) -> Iterator[tuple[int, Any]]:
    """Rows numbered by line so the number matches an editor; blank lines are ignored.

    Lines are split on b"\\n" and decoded one by one, so one line with invalid UTF-8 is one
    bad row, and a U+2028 or U+0085 inside a JSON string does not split a row.
    """
    for lineno, raw in enumerate(_read_bytes(path, name).split(b"\n"), start=1):
        raw = raw.removesuffix(b"\r")
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield (
                lineno,
                _Unreadable(
                    f"invalid UTF-8: byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line"
                ),
            )
            continue
        try:
            yield lineno, _parse_json(line)
        except json.JSONDecodeError as e:
            # A bad line is a bad row: _RowReader.example turns the marker into a _BadRow.
            yield lineno, _Unreadable(f"invalid JSON: {e.msg} (column {e.colno})")


def _read_json(path: Path, name: str) -> Iterator[tuple[int, Any]]:
    # Invalid UTF-8 bytes inside strings become lone surrogates (U+DC80..U+DCFF) here, so the
    # row holding them is the bad row (`_check_text`), not the whole file.
    text = _read_bytes(path, name).decode("utf-8", errors="surrogateescape")
    try:
        data = _parse_json(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # many ".json" files are really JSON Lines
            return _read_jsonl(path, name)
        raise DataError(f"{name}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    if not isinstance(data, list):
        raise DataError(f"{name}: expected a JSON list of objects, got {type(data).__name__}")
    return enumerate(data, start=1)


def _read_parquet(path: Path, name: str) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several error types for bad files
        raise DataError(f"{name}: cannot read parquet: {e}") from e
    return _arrow_rows(table)


def _arrow_rows(table: Any) -> Iterator[tuple[int, Any]]:
    """Rows of a pyarrow Table. Arrow does not check that a string column is valid UTF-8, so
    when converting the whole table fails, rows are converted one by one and a row that
    fails is a bad row naming its column."""
    try:
        return enumerate(table.to_pylist(), start=1)
    except UnicodeDecodeError:
        return _arrow_rows_one_by_one(table)


def _arrow_rows_one_by_one(table: Any) -> Iterator[tuple[int, Any]]:
    for i in range(table.num_rows):
        one = table.slice(i, 1)
        try:
            yield i + 1, one.to_pylist()[0]
        except UnicodeDecodeError as e:
            bad = None
            for col in one.column_names:
                try:
                    one.column(col).to_pylist()
                except UnicodeDecodeError:
                    bad = col
                    break
            yield (
                i + 1,
                _Unreadable(f"invalid UTF-8: {e.reason} (byte 0x{e.object[e.start]:02x})", bad),
            )


def _read_saved(path: Path, name: str, split: str) -> Iterator[tuple[int, Any]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # not a saved dataset, or a corrupt one
        raise DataError(
            f"{name}: a directory must be written by datasets' save_to_disk: {e}"
        ) from e
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(
                f"{name}: no split {split!r}; available splits: {', '.join(sorted(ds))}"
            )
        ds = ds[split]
    return _arrow_rows(ds.with_format("arrow")[:])


# ---------------------------------------------------------------- rows


@dataclass
class _RowReader:
    """Validates one record and renders its prompt text (settings of one load)."""

    tokenizer: Any
    prompt_column: str
    max_prompt_length: int | None
    use_template: bool  # auto mode and the tokenizer has a chat template
    mode: str  # "auto" or "never"
    system_prompt: str | None
    completion_from_messages: str | None = None  # SFT: cut a final assistant message
    tools: list[dict[str, Any]] | None = None  # JSON schemas for the chat template

    def example(self, record: Any, row: int) -> PromptExample:
        col = self.prompt_column
        if isinstance(record, _Unreadable):
            raise _BadRow(record.what, record.field)
        if not isinstance(record, dict):
            raise _BadRow(f"expected an object with a {col!r} field, got {type(record).__name__}")
        _check_text(record)
        if col not in record:
            raise _BadRow(f"missing (columns: {', '.join(map(str, record)) or 'none'})", col)
        prompt = record[col]
        _check_prompt(prompt, col)
        target = self.completion_from_messages
        answer = None
        if target and isinstance(prompt, list) and prompt[-1].get("role") == "assistant":
            if len(prompt) == 1:
                raise _BadRow("the conversation has no message before the assistant's", col)
            answer, prompt = prompt[-1].get("content"), prompt[:-1]
        text = self.render(prompt)
        if self.tokenizer is not None and self.max_prompt_length is not None:
            try:
                n_tokens = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            except Exception as e:  # a tokenizer may refuse some text
                raise _BadRow(f"tokenizer failed: {type(e).__name__}: {e}", col) from e
            if n_tokens > self.max_prompt_length:
                raise _BadRow(
                    f"prompt has {n_tokens} tokens, more than "
                    f"max_prompt_length={self.max_prompt_length}",
                    col,
                )
        columns = {k: v for k, v in record.items() if k != col}
        if answer is not None and target:
            columns[target] = answer
        return PromptExample(prompt=prompt, text=text, columns=columns, row=row)

    def render(self, prompt: str | list[dict]) -> str:
        """The text the model sees: chat template, plain string, or "role: content" lines."""
        sp = self.system_prompt
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        # The data's own system message wins over the configured one.
        if sp and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": sp}, *messages]
        if self.use_template:
            try:
                return self.tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=True, tools=self.tools
                )
            except Exception as e:  # a template may reject some roles or orderings
                raise _BadRow(
                    f"chat template failed: {type(e).__name__}: {e}", self.prompt_column
                ) from e
        if isinstance(prompt, str):
            return f"{sp}\n\n{prompt}" if sp else prompt
        if self.mode == "auto":
            raise _NoTemplate(
                "chat messages need a chat template, but "
                + ("no tokenizer was given" if self.tokenizer is None else "the tokenizer has none")
                + "; use a tokenizer with a chat template, or chat_template='never' to "
                "join messages as 'role: content' lines",
                self.prompt_column,
            )
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_text(record: dict) -> None:
    """Raise _BadRow at the first string of the row (keys included, at any depth) that holds
    a lone surrogate: it is not valid Unicode, and tokenizers and UTF-8 writers refuse it."""
    stack: list[tuple[Any, str, str]] = [(k, str(k), "") for k in record]
    stack += [(v, str(k), "") for k, v in record.items()]
    stack.reverse()
    while stack:
        value, field, where = stack.pop()
        if isinstance(value, str):
            bad = _SURROGATE.search(value)
            if bad:
                code = ord(bad.group())
                byte = (
                    f" or the undecodable byte 0x{code - 0xDC00:02x}"
                    if 0xDC80 <= code <= 0xDCFF
                    else ""
                )
                raise _BadRow(
                    f"{where}not valid Unicode text: lone surrogate U+{code:04X}{byte} at "
                    f"character {bad.start() + 1}",
                    field,
                )
        elif isinstance(value, dict):
            items = [(k, f"{where}key {k!r}: ") for k in value]
            items += [(v, f"{where}{k!r}: ") for k, v in value.items()]
            stack.extend((v, field, w) for v, w in reversed(items))
        elif isinstance(value, (list, tuple)):
            stack.extend(
                (v, field, f"{where}item {i + 1}: ") for i, v in reversed(list(enumerate(value)))
            )


def _check_prompt(prompt: Any, col: str) -> None:
    """Raise _BadRow unless `prompt` is a non-empty string or well-formed chat messages."""
    if prompt is None:
        raise _BadRow("is null", col)
    if isinstance(prompt, str):
        if not prompt.strip():
            raise _BadRow("empty prompt", col)
        return
    if not isinstance(prompt, list):
        raise _BadRow(
            f"expected a string or a list of chat messages, got {type(prompt).__name__}", col
        )
    if not prompt:
        raise _BadRow("empty list of chat messages", col)
    for i, msg in enumerate(prompt, start=1):
        if not isinstance(msg, dict):
            raise _BadRow(f"message {i}: expected a dict, got {type(msg).__name__}", col)
        for key in ("role", "content"):
            if key not in msg:
                raise _BadRow(f"message {i}: missing {key!r}", col)
            if not isinstance(msg[key], str):
                raise _BadRow(
                    f"message {i}: {key!r} must be a string, got {type(msg[key]).__name__}", col
                )
        if not msg["role"].strip():
            raise _BadRow(f"message {i}: empty role", col)
    if not any(m["content"].strip() for m in prompt):
        raise _BadRow("every chat message is empty", col)
