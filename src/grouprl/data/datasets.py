"""Load prompt datasets: jsonl, json, parquet, `datasets.save_to_disk` folders, or lists.

Every row needs a prompt column holding a string or chat messages (a list of
``{"role", "content"}`` dicts); every other column is kept for the reward functions.
A bad row is reported with its place, ``"<file>: row <n>: field '<name>': <what>"``,
and either stops the load (``on_bad_row="error"``) or is skipped and counted
(``on_bad_row="skip"``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MEMORY = "<memory>"
SUPPORTED_FORMATS = (
    ".jsonl",
    ".json",
    ".parquet",
    "a directory written by datasets' save_to_disk",
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
    skipped_reasons: list[str] = field(default_factory=list)

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


class _InvalidJSON(str):
    """Internal marker for a .jsonl line that does not parse (its text is the error)."""


def _place(source: str, row: int, field: str | None, what: str) -> str:
    where = f"{source}: row {row}: "
    return where + (f"field '{field}': {what}" if field else what)


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
) -> PromptDataset:
    """Read `source` into a PromptDataset, validating every row.

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
    if not path.exists():
        raise DataError(f"{name}: no such file or directory")
    if path.is_dir():
        return name, enumerate(_read_saved(path, name, split), start=1)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return name, _read_jsonl(path, name)
    if suffix == ".json":
        return name, _read_json(path, name)
    if suffix == ".parquet":
        return name, enumerate(_read_parquet(path, name), start=1)
    raise DataError(
        f"{name}: unsupported format {suffix or '(no extension)'!r}; "
        f"supported: {', '.join(SUPPORTED_FORMATS)}"
    )


def _read_text(path: Path, name: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{name}: cannot read: {e}") from e


def _read_jsonl(path: Path, name: str) -> Iterator[tuple[int, Any]]:
    """Rows numbered by line so the number matches an editor; blank lines are ignored."""
    for lineno, line in enumerate(_read_text(path, name).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            # A bad line is a bad row: _RowReader.example turns the marker into a _BadRow.
            yield lineno, _InvalidJSON(f"invalid JSON: {e.msg} (column {e.colno})")


def _read_json(path: Path, name: str) -> Iterator[tuple[int, Any]]:
    text = _read_text(path, name)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # many ".json" files are really JSON Lines
            return _read_jsonl(path, name)
        raise DataError(f"{name}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    if not isinstance(data, list):
        raise DataError(f"{name}: expected a JSON list of objects, got {type(data).__name__}")
    return enumerate(data, start=1)


def _read_parquet(path: Path, name: str) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several error types for bad files
        raise DataError(f"{name}: cannot read parquet: {e}") from e


def _read_saved(path: Path, name: str, split: str) -> list[dict]:
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
    return ds.to_list()


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

    def example(self, record: Any, row: int) -> PromptExample:
        col = self.prompt_column
        if isinstance(record, _InvalidJSON):
            raise _BadRow(str(record))
        if not isinstance(record, dict):
            raise _BadRow(f"expected an object with a {col!r} field, got {type(record).__name__}")
        if col not in record:
            raise _BadRow(f"missing (columns: {', '.join(map(str, record)) or 'none'})", col)
        prompt = record[col]
        _check_prompt(prompt, col)
        text = self.render(prompt)
        if self.tokenizer is not None and self.max_prompt_length is not None:
            n_tokens = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            if n_tokens > self.max_prompt_length:
                raise _BadRow(
                    f"prompt has {n_tokens} tokens, more than "
                    f"max_prompt_length={self.max_prompt_length}",
                    col,
                )
        columns = {k: v for k, v in record.items() if k != col}
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
                    messages, tokenize=False, add_generation_prompt=True
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
