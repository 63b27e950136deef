"""Property tests of prompt loading: random rows, bad text, every bad row named by its place.

Datasets mix rows known to be good, rows known to be bad (a lone surrogate somewhere in the
row, or invalid UTF-8 bytes in its line) and random rows (random keys and values: control
characters, huge strings, nested lists and mappings, None, numbers, chat messages with
random roles). They are loaded from .jsonl, .json and Python lists. With on_bad_row="skip"
the load returns every good row and skips every known-bad one, reporting each skipped row
by number, or raises only the "no rows" / "every row was bad" DataError; with "error" the
only exception is a DataError naming the source and a row no later than the first bad one.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grouprl.data import DataError, load_prompts
from grouprl.models.tiny import build_char_tokenizer

FUZZ = settings(
    max_examples=int(os.environ.get("GROUPRL_FUZZ_EXAMPLES", 300)),
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=not os.environ.get("GROUPRL_FUZZ_EXAMPLES"),  # set it to explore more
    database=None,
)
TOKENIZER = build_char_tokenizer("0123456789+-=abc ")
MAX_LEN = 400  # prompts longer than this (in characters, one token each) are bad rows
MARK = "@@BYTES@@"  # replaced by invalid UTF-8 bytes in the file

ODD = ["\ud800", "\udcff", "\x00", "\x85", "\u2028", "\r", "\n", "\t", "é", "😀", "a" * 5000]
text = st.one_of(
    st.text(max_size=10),
    st.sampled_from(ODD),
    st.lists(st.sampled_from(ODD + ["x", " "]), max_size=4).map("".join),
)
scalars = st.one_of(
    text, st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False)
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(text, inner, max_size=3)),
    max_leaves=6,
)
message = st.one_of(
    st.fixed_dictionaries(
        {"role": st.one_of(st.sampled_from(["user", "system", "assistant"]), text), "content": text}
    ),
    values,
)
prompt = st.one_of(text, st.lists(message, max_size=3), values)
columns = st.dictionaries(text, values, max_size=3)
random_row = st.one_of(
    st.builds(lambda cols, p: {**cols, "prompt": p}, columns, prompt),
    columns,  # most likely without a prompt column
    values,  # most likely not an object
)
GOOD = [{"prompt": "1+2=", "answer": "3"}, {"prompt": "abc", "meta": {"k": [1, None]}}]
surrogate_row = st.sampled_from(
    [
        {"prompt": "1+\ud800"},
        {"prompt": "ok", "answer": "\udcff"},
        {"prompt": [{"role": "user", "content": "hi \udfff"}]},
        {"prompt": "ok", "meta": {"deep": ["x", {"k\ud801": 1}]}},
    ]
)
# (kind, row): kind "good" must load, "bad" must be skipped, "random" may go either way.
rows = st.lists(
    st.one_of(
        st.tuples(st.just("good"), st.sampled_from(GOOD)),
        st.tuples(st.just("bad"), surrogate_row),
        st.tuples(st.just("bytes"), st.just({"prompt": f"1+2 {MARK}"})),
        st.tuples(st.just("random"), random_row),
    ),
    min_size=1,
    max_size=8,
)
BAD_BYTES = [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xe2\x82", b"\x80abc"]


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data-fuzz")


def _write(
    folder: Path, kind: str, items: list, data: st.DataObject
) -> tuple[object, list[int], dict]:
    """The source, its row numbers (1-based, in order) and each row's kind by number."""
    path = folder / f"rows.{kind}"
    numbers = list(range(1, len(items) + 1))
    kinds = dict(zip(numbers, [k for k, _ in items], strict=True))
    if kind == "json":
        raw = json.dumps([r for _, r in items]).encode()
        raw = raw.replace(MARK.encode(), data.draw(st.sampled_from(BAD_BYTES)))
    else:
        lines = []
        for k, r in items:
            line = json.dumps(r).encode()
            if k == "bytes":
                line = line.replace(MARK.encode(), data.draw(st.sampled_from(BAD_BYTES)))
            lines.append(line)
        raw = b"\n".join(lines) + b"\n"
    path.write_bytes(raw)
    return path, numbers, kinds


def _load(source: object, on_bad_row: str, mode: str):
    return load_prompts(
        source,
        tokenizer=TOKENIZER,
        max_prompt_length=MAX_LEN,
        on_bad_row=on_bad_row,
        chat_template=mode,
    )


def _row_of(msg: str, name: str) -> int:
    msg.encode("utf-8")  # printable: lone surrogates are escaped
    m = re.match(rf"^{re.escape(name)}: row (\d+): ", msg)
    assert m, msg
    return int(m.group(1))


def _check_skip(source: object, name: str, numbers: list[int], kinds: dict, mode: str) -> None:
    try:
        ds = _load(source, "skip", mode)
    except DataError as exc:
        msg = str(exc)
        msg.encode("utf-8")
        if "chat messages need a chat template" in msg:  # a setup error, even with skip
            assert mode == "auto" and _row_of(msg, name) in numbers
            return
        assert msg.startswith(f"{name}: every row was bad ("), msg
        assert "good" not in kinds.values()
        return
    loaded = [ex.row for ex in ds]
    assert sorted(loaded + ds.skipped_rows) == numbers  # every row: loaded or skipped
    assert ds.skipped == len(ds.skipped_rows)
    assert [_row_of(r, name) for r in ds.skipped_reasons] == ds.skipped_rows[
        : len(ds.skipped_reasons)
    ]
    for n, k in kinds.items():
        if k == "good":
            assert n in loaded
        elif k in ("bad", "bytes"):
            assert n in ds.skipped_rows
    for ex in ds:
        ex.text.encode("utf-8")  # every loaded text is valid Unicode


def _check_error(source: object, name: str, numbers: list[int], kinds: dict, mode: str) -> None:
    known_bad = [n for n, k in kinds.items() if k in ("bad", "bytes")]
    try:
        _load(source, "error", mode)
    except DataError as exc:
        row = _row_of(str(exc), name)
        assert row in numbers and row <= min(known_bad, default=row)
        assert kinds[row] != "good"
        return
    assert not known_bad


@FUZZ
@given(rows, st.sampled_from(["jsonl", "json"]), st.sampled_from(["never", "auto"]), st.data())
def test_files_load_or_name_the_bad_row(fuzz_dir, items, kind, mode, data) -> None:
    path, numbers, kinds = _write(fuzz_dir, kind, items, data)
    _check_skip(path, str(path), numbers, kinds, mode)
    _check_error(path, str(path), numbers, kinds, mode)


@FUZZ
@given(rows, st.sampled_from(["never", "auto"]))
def test_python_lists_load_or_name_the_bad_row(items, mode) -> None:
    # no bytes in a Python list: such a row holds a lone surrogate instead
    items = [("bad", {"prompt": "1+2 \udcfe"}) if k == "bytes" else (k, r) for k, r in items]
    records = [r for _, r in items]
    numbers = list(range(1, len(records) + 1))
    kinds = dict(zip(numbers, [k for k, _ in items], strict=True))
    _check_skip(records, "<memory>", numbers, kinds, mode)
    _check_error(records, "<memory>", numbers, kinds, mode)


@pytest.mark.parametrize("bad", BAD_BYTES)
def test_invalid_bytes_anywhere_in_a_jsonl_line_are_that_row(tmp_path, bad) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(
        b'{"prompt": "1+1="}\n' + b'{"prompt": "2+2="' + bad + b"}\n" + b'{"prompt": "3"}\n'
    )
    ds = _load(path, "skip", "never")
    assert [ex.row for ex in ds] == [1, 3] and ds.skipped_rows == [2]
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: row 2: invalid UTF-8"):
        _load(path, "error", "never")
