"""Prompt loading: every source format, chat templates, and bad rows named by place."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from grouprl.data import DataError, PromptDataset, load_prompts

ROWS = [
    {"prompt": "what is 2 + 3 ?", "answer": "5", "id": 1},
    {"prompt": "hello world", "answer": "x", "id": 2},
]
CHAT = [{"role": "user", "content": "what is 2 + 3 ?"}]
TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)


def make_tokenizer(chat_template: str | None = None):
    """A WordLevel tokenizer built locally (whitespace split), optionally with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "[UNK] [PAD] what is 2 + 3 ? hello world <user> <system> <assistant> be brief"
    vocab = {w: i for i, w in enumerate(words.split())}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]")
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def check_rows(ds: PromptDataset) -> None:
    assert len(ds) == 2 and ds.skipped == 0
    assert [ex.text for ex in ds] == ["what is 2 + 3 ?", "hello world"]
    assert ds[0].columns == {"answer": "5", "id": 1}
    assert [ex.row for ex in ds] == [1, 2]


# ---------------------------------------------------------------- formats


def test_jsonl(tmp_path):
    ds = load_prompts(write_jsonl(tmp_path / "d.jsonl", ROWS))
    check_rows(ds)
    assert ds.source.endswith("d.jsonl")


def test_json_list_and_json_lines_in_a_json_file(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    check_rows(load_prompts(tmp_path / "d.json"))
    check_rows(load_prompts(write_jsonl(tmp_path / "lines.json", ROWS)))


def test_json_not_a_list(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps({"prompt": "x"}))
    with pytest.raises(DataError, match=r"d\.json: expected a JSON list of objects, got dict"):
        load_prompts(tmp_path / "d.json")


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    check_rows(load_prompts(str(tmp_path / "d.parquet")))


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    check_rows(load_prompts(tmp_path / "ds"))

    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:1])}
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    check_rows(load_prompts(tmp_path / "dd"))
    assert len(load_prompts(tmp_path / "dd", split="test")) == 1
    with pytest.raises(DataError, match=r"no split 'validation'; available splits: test, train"):
        load_prompts(tmp_path / "dd", split="validation")


def test_directory_not_saved_by_datasets(tmp_path):
    with pytest.raises(DataError, match="save_to_disk"):
        load_prompts(tmp_path)


def test_in_memory_list():
    ds = load_prompts(ROWS)
    check_rows(ds)
    assert ds.source == "<memory>"


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file or directory"):
        load_prompts(tmp_path / "nope.jsonl")
    (tmp_path / "d.xml").write_text("<prompt>hi</prompt>\n")
    with pytest.raises(DataError, match=r"d\.xml: unsupported format '\.xml'.*\.jsonl.*\.csv"):
        load_prompts(tmp_path / "d.xml")


def test_invalid_json_file(tmp_path):
    (tmp_path / "d.json").write_text('[{"prompt": "a"},\n oops]')
    with pytest.raises(DataError, match=r"d\.json: invalid JSON at line 2"):
        load_prompts(tmp_path / "d.json")


def test_empty_file(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"e\.jsonl: no rows"):
        load_prompts(tmp_path / "e.jsonl")


def test_prompt_column_option():
    ds = load_prompts([{"question": "hello", "prompt": "kept"}], prompt_column="question")
    assert ds[0].text == "hello" and ds[0].columns == {"prompt": "kept"}


# ---------------------------------------------------------------- chat templates


def test_messages_with_chat_template_and_system_prompt():
    tok = make_tokenizer(TEMPLATE)
    ds = load_prompts(
        [{"prompt": CHAT}, {"prompt": "hello"}], tokenizer=tok, system_prompt="be brief"
    )
    assert ds[0].prompt == CHAT
    assert ds[0].text == "<system> be brief\n<user> what is 2 + 3 ?\n<assistant> "
    assert ds[1].text == "<system> be brief\n<user> hello\n<assistant> "


def test_messages_from_parquet_and_save_to_disk(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    tok = make_tokenizer(TEMPLATE)
    rows = [{"prompt": CHAT, "answer": "5"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "c"))
    for src in (tmp_path / "c.parquet", tmp_path / "c"):
        ex = load_prompts(src, tokenizer=tok)[0]
        assert ex.prompt == CHAT and ex.columns == {"answer": "5"}
        assert ex.text == "<user> what is 2 + 3 ?\n<assistant> "


def test_data_system_message_wins_over_system_prompt():
    tok = make_tokenizer(TEMPLATE)
    msgs = [{"role": "system", "content": "mine"}, *CHAT]
    ds = load_prompts([{"prompt": msgs}], tokenizer=tok, system_prompt="be brief")
    assert ds[0].text.startswith("<system> mine\n<user>")


def test_messages_without_template_is_an_error_even_when_skipping():
    for tok in (make_tokenizer(), None):
        with pytest.raises(
            DataError, match=r"<memory>: row 2: field 'prompt': .*no.* chat template"
        ):
            load_prompts([{"prompt": "hi"}, {"prompt": CHAT}], tokenizer=tok, on_bad_row="skip")


def test_string_without_template_is_used_as_is():
    ds = load_prompts([{"prompt": "hello world"}], tokenizer=make_tokenizer())
    assert ds[0].text == "hello world"


def test_never_mode_joins_messages():
    tok = make_tokenizer(TEMPLATE)
    ds = load_prompts([{"prompt": CHAT}, {"prompt": "hi"}], tokenizer=tok, chat_template="never")
    assert ds[0].text == "user: what is 2 + 3 ?\n"
    assert ds[1].text == "hi"


def test_bad_option_values():
    with pytest.raises(ValueError, match="on_bad_row"):
        load_prompts(ROWS, on_bad_row="ignore")
    with pytest.raises(ValueError, match="chat_template"):
        load_prompts(ROWS, chat_template="always")


# ---------------------------------------------------------------- bad rows

BAD_ROWS = [
    # (row, expected message tail)
    ({"question": "x"}, "field 'prompt': missing (columns: question)"),
    ({"prompt": "   "}, "field 'prompt': empty prompt"),
    ({"prompt": 7}, "field 'prompt': expected a string or a list of chat messages, got int"),
    ({"prompt": None}, "field 'prompt': is null"),
    ({"prompt": []}, "field 'prompt': empty list of chat messages"),
    ({"prompt": [{"role": "user"}]}, "field 'prompt': message 1: missing 'content'"),
    ({"prompt": ["hi"]}, "field 'prompt': message 1: expected a dict, got str"),
    (
        {"prompt": [{"role": "user", "content": 3}]},
        "field 'prompt': message 1: 'content' must be a string, got int",
    ),
]


@pytest.mark.parametrize("bad,tail", BAD_ROWS)
def test_each_bad_row_kind_names_its_place(tmp_path, bad, tail):
    path = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], bad, ROWS[1]])
    with pytest.raises(DataError) as err:
        load_prompts(path, chat_template="never")
    assert str(err.value) == f"{path}: row 2: {tail}"

    ds = load_prompts(path, chat_template="never", on_bad_row="skip")
    assert len(ds) == 2 and ds.skipped == 1
    assert ds.skipped_reasons == [f"{path}: row 2: {tail}"]
    assert [ex.row for ex in ds] == [1, 3]


def test_invalid_json_line_is_a_bad_row_with_its_line_number(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a"}\n\n{not json}\n{"prompt": "b"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl: row 3: invalid JSON"):
        load_prompts(path)
    ds = load_prompts(path, on_bad_row="skip")
    assert [ex.row for ex in ds] == [1, 4] and ds.skipped == 1


def test_row_numbers_in_memory_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    with pytest.raises(DataError, match=r"^<memory>: row 3: field 'prompt': empty prompt$"):
        load_prompts([*ROWS, {"prompt": ""}])
    pq.write_table(pa.Table.from_pylist([*ROWS, {"prompt": ""}]), tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"d\.parquet: row 3: field 'prompt': empty prompt$"):
        load_prompts(tmp_path / "d.parquet")


def test_skip_counts_several_and_all_bad_is_an_error():
    ds = load_prompts([{"prompt": ""}, ROWS[0], {"x": 1}, {"prompt": 3}], on_bad_row="skip")
    assert len(ds) == 1 and ds.skipped == 3 and len(ds.skipped_reasons) == 3
    assert ds[0].row == 2
    with pytest.raises(DataError, match=r"<memory>: every row was bad \(2 skipped\)"):
        load_prompts([{"prompt": ""}, {"x": 1}], on_bad_row="skip")


def test_too_long_prompt_with_tokenizer():
    tok = make_tokenizer()
    rows = [{"prompt": "what is 2 + 3 ?"}, {"prompt": "hello world"}]  # 6 and 2 tokens
    with pytest.raises(
        DataError,
        match=r"^<memory>: row 1: field 'prompt': prompt has 6 tokens, more than max_prompt_length=5$",
    ):
        load_prompts(rows, tokenizer=tok, max_prompt_length=5)
    ds = load_prompts(rows, tokenizer=tok, max_prompt_length=5, on_bad_row="skip")
    assert [ex.text for ex in ds] == ["hello world"] and ds.skipped == 1
    assert len(load_prompts(rows, tokenizer=tok, max_prompt_length=6)) == 2


def test_too_long_counts_the_templated_text():
    tok = make_tokenizer(TEMPLATE)
    # "<user> hello world\n<assistant> " is 4 tokens, the raw prompt only 2.
    with pytest.raises(DataError, match="prompt has 4 tokens"):
        load_prompts([{"prompt": "hello world"}], tokenizer=tok, max_prompt_length=3)


# ---------------------------------------------------------------- text that is not Unicode


def write_lines(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


GOOD = b'{"prompt": "hello world"}'


@pytest.mark.parametrize(
    "line, tail",
    [
        (
            b'{"prompt": "what \\ud800 is"}',
            "field 'prompt': not valid Unicode text: lone surrogate U+D800 at character 6",
        ),
        (
            b'{"prompt": [{"role": "user", "content": "hi \\udfff"}]}',
            "field 'prompt': item 1: 'content': not valid Unicode text: lone surrogate U+DFFF "
            "at character 4",
        ),
        (
            b'{"prompt": "ok", "answer": ["5", "\\ud83d"]}',
            "field 'answer': item 2: not valid Unicode text: lone surrogate U+D83D at character 1",
        ),
        (
            b'{"prompt": "ok", "meta": {"k\\udc80": 1}}',
            "field 'meta': key 'k\\udc80': not valid Unicode text: lone surrogate U+DC80 or "
            "the undecodable byte 0x80 at character 2",
        ),
        (b'{"prompt": "caf\xe9"}', "invalid UTF-8: byte 0xe9 at byte 16 of the line"),
        (b'{"prompt": "ok"}\xff', "invalid UTF-8: byte 0xff at byte 17 of the line"),
    ],
)
def test_bad_text_in_jsonl_is_a_bad_row_with_file_row_and_field(tmp_path, line, tail):
    path = write_lines(tmp_path / "d.jsonl", [GOOD, line, GOOD])
    with pytest.raises(DataError) as err:
        load_prompts(path)
    assert str(err.value).startswith(f"{path}: row 2: {tail}"), str(err.value)
    str(err.value).encode("utf-8")  # the message itself is printable
    ds = load_prompts(path, on_bad_row="skip")
    assert [ex.row for ex in ds] == [1, 3] and ds.skipped == 1 and ds.skipped_rows == [2]
    assert ds.skipped_reasons[0].startswith(f"{path}: row 2: {tail}")


def test_lone_surrogate_in_a_python_list():
    rows = [ROWS[0], {"prompt": "x\ud800"}, ROWS[1]]
    with pytest.raises(DataError) as err:
        load_prompts(rows)
    assert str(err.value) == (
        "<memory>: row 2: field 'prompt': not valid Unicode text: lone surrogate U+D800 at "
        "character 2"
    )
    ds = load_prompts(rows, on_bad_row="skip")
    assert [ex.row for ex in ds] == [1, 3] and ds.skipped_rows == [2]


def test_invalid_utf8_inside_a_json_list_is_that_row(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(b'[{"prompt": "a"}, {"prompt": "caf\xe9"}, {"prompt": "b"}]')
    with pytest.raises(DataError, match=r"d\.json: row 2: field 'prompt': not valid Unicode text"):
        load_prompts(path)
    ds = load_prompts(path, on_bad_row="skip")
    assert [ex.text for ex in ds] == ["a", "b"] and ds.skipped_rows == [2]


def test_invalid_utf8_in_a_parquet_string_column_is_that_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Arrow does not validate UTF-8 when a binary column is viewed as strings
    answers = pa.array([b"5", b"caf\xe9", b"7"], type=pa.binary()).view(pa.string())
    table = pa.table({"prompt": ["a", "b", "c"], "answer": answers})
    pq.write_table(table, tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"d\.parquet: row 2: field 'answer': invalid UTF-8"):
        load_prompts(tmp_path / "d.parquet")
    ds = load_prompts(tmp_path / "d.parquet", on_bad_row="skip")
    assert [ex.text for ex in ds] == ["a", "c"] and ds.skipped_rows == [2]
    assert [ex.columns["answer"] for ex in ds] == ["5", "7"]


def test_line_separators_inside_json_strings_do_not_split_rows(tmp_path):
    # U+2028, U+0085 and U+001C are line breaks for str.splitlines, not for JSON Lines
    text = "a\u2028b\x85c\x1cd"
    path = tmp_path / "d.jsonl"
    path.write_bytes(
        b"\xef\xbb\xbf"  # a byte-order mark
        + json.dumps({"prompt": text}, ensure_ascii=False).encode()
        + b"\r\n"
        + GOOD
    )
    ds = load_prompts(path)
    assert [ex.text for ex in ds] == [text, "hello world"] and [ex.row for ex in ds] == [1, 2]


def test_every_skipped_row_is_listed():
    rows = [{"prompt": ""}] * 7 + [ROWS[0]]
    ds = load_prompts(rows, on_bad_row="skip")
    assert ds.skipped == 7 and ds.skipped_rows == [1, 2, 3, 4, 5, 6, 7]
    assert len(ds.skipped_reasons) == 5  # only the first few messages are kept


def test_a_tokenizer_that_fails_is_a_bad_row():
    class Refuses:
        def __call__(self, text, add_special_tokens=False):
            if "bad" in text:
                raise RuntimeError("cannot encode")
            return {"input_ids": list(text)}

    rows = [{"prompt": "good"}, {"prompt": "bad"}]
    with pytest.raises(
        DataError,
        match=r"^<memory>: row 2: field 'prompt': tokenizer failed: RuntimeError: cannot encode$",
    ):
        load_prompts(rows, tokenizer=Refuses(), max_prompt_length=10)
    ds = load_prompts(rows, tokenizer=Refuses(), max_prompt_length=10, on_bad_row="skip")
    assert [ex.row for ex in ds] == [1] and ds.skipped_rows == [2]


def test_deeply_nested_json_line_is_a_bad_row(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [GOOD, b"[" * 100_000, GOOD])
    ds = load_prompts(path, on_bad_row="skip")
    assert ds.skipped_rows == [2]
    assert "row 2: invalid JSON" in ds.skipped_reasons[0]


def test_csv_tsv_data_folders_and_hub_ids_go_through_datasets(tmp_path, monkeypatch):
    """csv/tsv files and folders of data files are read by datasets.load_dataset; a hub id
    that cannot be reached says so (offline here); a missing .csv is a missing file, not a
    hub lookup; a bad row still names its place."""
    import datasets.config
    import huggingface_hub.constants

    from grouprl.data import DataError, load_prompts

    (tmp_path / "a.csv").write_text('prompt,answer\n1+1=,"2"\n2+2=,"4"\n')
    (tmp_path / "b.tsv").write_text("prompt\tanswer\n3+3=\tsix\n")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "train.csv").write_text("prompt,answer\n5+5=,ten\n")
    a = load_prompts(tmp_path / "a.csv")
    assert len(a) == 2 and a[1].text == "2+2=" and "answer" in a[1].columns
    b = load_prompts(str(tmp_path / "b.tsv"))
    assert b[0].text == "3+3=" and b[0].columns["answer"] == "six"
    f = load_prompts(str(tmp_path / "folder"))
    assert f[0].text == "5+5=" and f[0].columns["answer"] == "ten"
    with pytest.raises(DataError, match="nosuch.csv: no such file or directory"):
        load_prompts(str(tmp_path / "nosuch.csv"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="someorg/nosuchset: not a local file, folder or readable"):
        load_prompts("someorg/nosuchset")
    (tmp_path / "bad.csv").write_text("prompt,answer\n1+1=,2\n,3\n")
    with pytest.raises(DataError, match="bad.csv: row 2: field 'prompt'"):
        load_prompts(str(tmp_path / "bad.csv"))
