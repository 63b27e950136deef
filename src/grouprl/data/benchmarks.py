r"""Medical multiple-choice benchmarks from local files: MedQA, MedMCQA, MedXpertQA.

The user supplies the files (nothing is downloaded). Each loader reads .jsonl, .json,
.parquet or a `datasets.save_to_disk` folder (as `load_prompts` does) and returns rows

    {"prompt": render_mcq(stem, options), "answer": "B", "options": {"A": ..., ...},
     "source_id": "medqa:12", "question": <the question text as in the file>}

ready for `load_prompts` (a list of dicts is a source) and for the rewards
``choice_accuracy``, ``mcq_faithfulness`` and ``mcq_comprehensiveness``. Options are
letters A, B, C... without gaps (any count from 2; MedQA has 4 or 5, MedMCQA 4,
MedXpertQA's text subset 10). A bad row raises DataError naming its place,
``"<file>: row <n>: field '<name>': <what>"`` (rows are line numbers in .jsonl), or with
``on_bad_row="skip"`` is left out with a logged warning.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

from grouprl.data.datasets import DataError, _BadRow, _check_text, _InvalidJSON, _open, _place
from grouprl.registry import Registry

logger = logging.getLogger("grouprl.data")


ON_BAD_ROW = ("error", "skip")
MEDMCQA_OPTION_FIELDS = ("opa", "opb", "opc", "opd")

BENCHMARKS: Registry[Callable[..., list[dict]]] = Registry("benchmark")

_CHOICES_HEADER = re.compile(r"answer\s+choices\s*:", re.IGNORECASE)


def render_mcq(question: str, options: Mapping[str, str]) -> str:
    r"""The prompt of a multiple-choice question: the same template as the synthetic
    `clinical` task (`grouprl.data.tasks.clinical.render_mcq`), so a model trained there is
    evaluated on real benchmarks with the prompt it knows; option texts are
    whitespace-normalized first."""
    from grouprl.data.tasks.clinical import render_mcq as task_render

    return task_render(question, {k: " ".join(str(v).split()) for k, v in options.items()})


# ---------------------------------------------------------------- row checks


class _Bad(Exception):
    """Internal: one row is unusable; becomes a DataError naming file, row and field."""

    def __init__(self, what: str, field: str | None = None) -> None:
        super().__init__(what)
        self.what = what
        self.field = field


def _text(record: dict, field: str) -> str:
    """A required non-empty string field."""
    if field not in record:
        raise _Bad(f"missing (columns: {', '.join(map(str, record)) or 'none'})", field)
    value = record[field]
    if value is None:
        raise _Bad("is null", field)
    if not isinstance(value, str):
        raise _Bad(f"expected a string, got {type(value).__name__}", field)
    if not value.strip():
        raise _Bad("is empty", field)
    return value


def _letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


def _check_options(options: dict[str, Any], field: str) -> dict[str, str]:
    """Letters A.. without gaps, each with a non-empty string; sorted by letter."""
    for letter, text in options.items():
        if not isinstance(text, str):
            raise _Bad(f"option {letter}: expected a string, got {type(text).__name__}", field)
        if not text.strip():
            raise _Bad(f"option {letter} is empty", field)
    letters = sorted(options)
    if len(letters) < 2 or letters != _letters(len(letters)):
        raise _Bad(
            f"expected options lettered A, B, C... without gaps (at least 2), "
            f"got {', '.join(letters) or 'none'}",
            field,
        )
    return {k: options[k].strip() for k in letters}


def _options_field(record: dict, field: str = "options") -> dict[str, str]:
    """A mapping letter -> text, or a list of {"key", "value"} (a HF `datasets` layout).

    Keys are upper-cased; None values (parquet struct padding of shorter rows) are dropped.
    """
    if field not in record or record[field] is None:
        raise _Bad("missing" if field not in record else "is null", field)
    raw = record[field]
    if isinstance(raw, list) and all(isinstance(x, Mapping) for x in raw):
        try:
            raw = {x["key"]: x["value"] for x in raw}
        except KeyError:
            raise _Bad('a list of options needs "key" and "value" in each item', field) from None
    if not isinstance(raw, Mapping):
        raise _Bad(f"expected a mapping letter -> text, got {type(raw).__name__}", field)
    options: dict[str, Any] = {}
    for key, text in raw.items():
        if text is None:
            continue
        letter = str(key).strip().upper()
        if len(letter) != 1 or not "A" <= letter <= "Z":
            raise _Bad(f"option key {key!r} is not a letter", field)
        options[letter] = text
    return _check_options(options, field)


def _letter_field(record: dict, field: str, options: dict[str, str]) -> str:
    """A gold letter that names one of `options`."""
    value = record.get(field)
    if not isinstance(value, str):
        what = "is null" if value is None else f"expected a letter, got {type(value).__name__}"
        raise _Bad("missing" if field not in record else what, field)
    letter = value.strip().upper()
    if letter not in options:
        raise _Bad(f"{value!r} is not one of the options {', '.join(options)}", field)
    return letter


def _source_id(name: str, record: dict, row: int) -> str:
    rid = record.get("id")
    return f"{name}:{rid}" if isinstance(rid, (str, int)) and str(rid).strip() else f"{name}:{row}"


def _row(name: str, record: dict, row: int, stem: str, options: dict, answer: str) -> dict:
    return {
        "prompt": render_mcq(stem, options),
        "answer": answer,
        "options": options,
        "source_id": _source_id(name, record, row),
        "question": record["question"],
    }


def _read(
    name: str,
    path: str | os.PathLike,
    parse: Callable[[dict, int], dict],
    split: str,
    on_bad_row: str,
) -> tuple[str, list[tuple[int, dict]]]:
    """(source name, [(row number, parsed row)]); bad rows raise or are skipped."""
    if on_bad_row not in ON_BAD_ROW:
        raise ValueError(f"on_bad_row must be one of {ON_BAD_ROW}, got {on_bad_row!r}")
    source, records = _open(path, split)
    rows: list[tuple[int, dict]] = []
    bad: list[str] = []
    n = 0
    for row, record in records:
        n += 1
        try:
            if isinstance(record, _InvalidJSON):
                raise _Bad(str(record))
            if not isinstance(record, dict):
                raise _Bad(f"expected an object, got {type(record).__name__}")
            try:
                _check_text(record)
            except _BadRow as exc:  # a lone surrogate: not valid Unicode text
                raise _Bad(str(exc), exc.field) from None
            rows.append((row, parse(record, row)))
        except _Bad as e:
            msg = _place(source, row, e.field, e.what)
            if on_bad_row == "error":
                raise DataError(msg) from None
            bad.append(msg)
    if n == 0:
        raise DataError(f"{source}: no rows")
    if not rows:
        raise DataError(f"{source}: every row was bad ({len(bad)}); first: " + "; ".join(bad[:3]))
    if bad:
        logger.warning(
            "%s (%s): skipped %d bad rows; first: %s", source, name, len(bad), "; ".join(bad[:3])
        )
    return source, rows


# ---------------------------------------------------------------- MedQA


@BENCHMARKS.register("medqa")
def load_medqa(
    path: str | os.PathLike, *, split: str = "train", on_bad_row: str = "error"
) -> list[dict]:
    """MedQA (USMLE) rows: {"question", "options": {"A": ...}, "answer_idx": "B", ...}.

    4 or 5 options (any count from 2 is accepted); `options` may also be a list of
    {"key", "value"}. The gold is `answer_idx` (a letter); without it, `answer` must be
    the text of exactly one option (compared casefolded, whitespace collapsed). When
    both are given, `answer_idx` is used. `split` picks the split of a saved DatasetDict.
    """

    def parse(record: dict, row: int) -> dict:
        question = _text(record, "question")
        options = _options_field(record)
        if record.get("answer_idx") is not None or "answer" not in record:
            answer = _letter_field(record, "answer_idx", options)
        else:
            answer = _answer_from_text(record, options)
        return _row("medqa", record, row, question, options, answer)

    return [r for _, r in _read("medqa", path, parse, split, on_bad_row)[1]]


def _answer_from_text(record: dict, options: dict[str, str]) -> str:
    text = _text(record, "answer")
    key = " ".join(text.casefold().split())
    hits = [k for k, v in options.items() if " ".join(v.casefold().split()) == key]
    if len(hits) != 1:
        what = "matches no option text" if not hits else f"matches options {', '.join(hits)}"
        raise _Bad(f"{text!r} {what} (and there is no 'answer_idx')", "answer")
    return hits[0]


# ---------------------------------------------------------------- MedMCQA


@BENCHMARKS.register("medmcqa")
def load_medmcqa(
    path: str | os.PathLike,
    *,
    cop_base: int | None = None,
    split: str = "train",
    on_bad_row: str = "error",
) -> list[dict]:
    """MedMCQA rows: {"id", "question", "opa", "opb", "opc", "opd", "cop", ...}.

    `cop` (the correct option) is 0-3 in the Hugging Face release and 1-4 in the
    original GitHub jsonl. With cop_base=None (default) the file decides: a cop of 0
    means 0-3, a cop of 4 means 1-4; a file holding both is an error naming the first
    row that contradicts the convention set by an earlier row; a file holding only
    1, 2 and 3 is ambiguous and an error (pass cop_base=0 or 1). cop_base=0 or 1 fixes
    the convention, and a value outside it is a bad row. A cop of -1 or null (the
    unlabelled test split) is a bad row. `split` picks the split of a saved DatasetDict.
    """
    if cop_base not in (None, 0, 1):
        raise ValueError(f"cop_base must be None (detect), 0 or 1; got {cop_base!r}")
    low, high = (0, 4) if cop_base is None else (cop_base, cop_base + 3)

    def parse(record: dict, row: int) -> dict:
        question = _text(record, "question")
        options = {}
        for letter, field in zip(_letters(4), MEDMCQA_OPTION_FIELDS, strict=True):
            options[letter] = _text(record, field).strip()
        cop = _cop(record, low, high)
        return {"cop": cop, "row": _row("medmcqa", record, row, question, options, "")}

    source, parsed = _read("medmcqa", path, parse, split, on_bad_row)
    base = cop_base if cop_base is not None else _detect_cop_base(source, parsed)
    out = []
    for _, p in parsed:
        p["row"]["answer"] = _letters(4)[p["cop"] - base]
        out.append(p["row"])
    return out


def _cop(record: dict, low: int, high: int) -> int:
    if "cop" not in record:
        raise _Bad(f"missing (columns: {', '.join(map(str, record))})", "cop")
    value = record["cop"]
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        what = "is null" if value is None else f"expected an integer, got {value!r}"
        raise _Bad(what, "cop")
    if value == -1:
        raise _Bad("is -1: no gold answer (the unlabelled test split?)", "cop")
    if not low <= value <= high:
        raise _Bad(f"{value} is out of range {low}-{high}", "cop")
    return value


def _detect_cop_base(source: str, parsed: list[tuple[int, dict]]) -> int:
    first: tuple[int, int] | None = None  # (row, cop) of the first 0 or 4
    for row, p in parsed:
        cop = p["cop"]
        if cop not in (0, 4):
            continue
        if first is None:
            first = (row, cop)
        elif cop != first[1]:
            raise DataError(
                _place(
                    source,
                    row,
                    "cop",
                    f"{cop} means options numbered {_numbering(cop)}, but row {first[0]} has "
                    f"cop {first[1]} ({_numbering(first[1])}); a file must use one convention",
                )
            )
    if first is None:
        raise DataError(
            f"{source}: field 'cop': only values 1-3 seen, so it cannot tell 0-3 (Hugging "
            f"Face) from 1-4 (original jsonl) numbering; pass cop_base=0 or cop_base=1"
        )
    return 0 if first[1] == 0 else 1


def _numbering(cop: int) -> str:
    return "0-3" if cop == 0 else "1-4"


# ---------------------------------------------------------------- MedXpertQA


@BENCHMARKS.register("medxpertqa")
def load_medxpertqa(
    path: str | os.PathLike, *, split: str = "train", on_bad_row: str = "error"
) -> list[dict]:
    """MedXpertQA text-subset rows: {"id", "question", "options": {...}, "label": "C", ...}.

    The question may already end with "Answer Choices: (A) ... (B) ...". The prompt's
    stem is the question cut before its last "Answer Choices:" (case-insensitive), so
    the choices are not shown twice. Options come from the `options` mapping when
    present; otherwise they are parsed from the choices block: markers "(A)", "(B)"...
    in order from the start of the block, each option's text running to the next
    marker. The gold is `label`. `split` picks the split of a saved DatasetDict.
    """

    def parse(record: dict, row: int) -> dict:
        question = _text(record, "question")
        stem, parsed = parse_answer_choices(question)
        if record.get("options") is not None:
            options = _options_field(record)
        elif parsed is None:
            raise _Bad(
                "no 'options' field and no 'Answer Choices: (A) ... (B) ...' to parse",
                "question",
            )
        else:
            options = _check_options(parsed, "question")
        answer = _letter_field(record, "label", options)
        return _row("medxpertqa", record, row, stem, options, answer)

    return [r for _, r in _read("medxpertqa", path, parse, split, on_bad_row)[1]]


def parse_answer_choices(question: str) -> tuple[str, dict[str, str] | None]:
    """(stem, options) of a question ending with "Answer Choices: (A) ... (B) ...".

    The stem is the text before the last "Answer Choices:" header (the whole question
    when there is none). Options are None when there is no header, when the block does
    not start with "(A)", or when fewer than two markers follow in order.
    """
    headers = list(_CHOICES_HEADER.finditer(question))
    if not headers:
        return question.strip(), None
    header = headers[-1]
    stem, block = question[: header.start()].strip(), question[header.end() :]
    marks: list[tuple[str, int, int]] = []
    pos = 0
    for letter in _letters(26):
        m = re.compile(rf"\(\s*{letter}\s*\)").search(block, pos)
        if m is None:
            break
        marks.append((letter, m.start(), m.end()))
        pos = m.end()
    if len(marks) < 2 or block[: marks[0][1]].strip():
        return stem, None
    ends = [start for _, start, _ in marks[1:]] + [len(block)]
    options = {
        letter: block[end:next_start].strip()
        for (letter, _, end), next_start in zip(marks, ends, strict=True)
    }
    return stem, options


# ---------------------------------------------------------------- dispatch


def load_benchmark(name: str, path: str | os.PathLike, **params: Any) -> list[dict]:
    """Rows of benchmark `name` ("medqa", "medmcqa" or "medxpertqa") read from `path`.

    `params` go to the loader (split, on_bad_row, and cop_base for medmcqa); an unknown
    name or parameter is a RegistryError with a suggestion.
    """
    BENCHMARKS.check_params(name, params, where=f"benchmark {name}")
    return BENCHMARKS.get(name)(path, **params)
