"""Medical MCQ benchmark loaders on small fixture files: formats, conventions, bad rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from grouprl.data import DataError, load_prompts
from grouprl.data.benchmarks import (
    BENCHMARKS,
    load_benchmark,
    load_medmcqa,
    load_medqa,
    load_medxpertqa,
    parse_answer_choices,
    render_mcq,
)
from grouprl.registry import RegistryError
from grouprl.rewards import choice_accuracy
from grouprl.rewards.clinical import mcq_comprehensiveness, mcq_faithfulness

# the shared template of the synthetic clinical task (written out, so a change shows here)
INSTRUCTION = "answer as <think> reasoning </think><answer>\\boxed{letter}</answer>"


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows),
        encoding="utf-8",
    )
    return path


def test_render_mcq():
    assert render_mcq("  Which drug?\n", {"A": "Aspirin", "B": "Insulin  glargine"}) == (
        "Which drug?\nA. Aspirin\nB. Insulin glargine\n" + INSTRUCTION
    )


# ---------------------------------------------------------------- MedQA

MEDQA_4 = {
    "question": "A 23-year-old woman has dysuria. Best treatment?",
    "answer": "Nitrofurantoin",
    "options": {"A": "Ampicillin", "B": "Ceftriaxone", "C": "Doxycycline", "D": "Nitrofurantoin"},
    "meta_info": "step2&3",
    "answer_idx": "D",
}
MEDQA_5 = {
    "question": "A 3-month-old has a murmur. Next step?",
    "options": {"A": "Echo", "B": "ECG", "C": "X-ray", "D": "Reassure", "E": "Refer"},
    "answer_idx": "a",
}


def test_medqa_4_and_5_options(tmp_path):
    rows = load_medqa(write_jsonl(tmp_path / "medqa.jsonl", [MEDQA_4, "", MEDQA_5]))
    assert [r["answer"] for r in rows] == ["D", "A"]
    assert [len(r["options"]) for r in rows] == [4, 5]
    assert [r["source_id"] for r in rows] == ["medqa:1", "medqa:3"]  # line numbers
    assert rows[0]["question"] == MEDQA_4["question"]
    assert rows[0]["prompt"] == render_mcq(MEDQA_4["question"], MEDQA_4["options"])
    assert rows[1]["prompt"].splitlines()[1:7] == [
        "A. Echo",
        "B. ECG",
        "C. X-ray",
        "D. Reassure",
        "E. Refer",
        INSTRUCTION,
    ]
    assert set(rows[0]) == {"prompt", "answer", "options", "source_id", "question"}


def test_medqa_parquet_pads_shorter_options_with_null(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # A struct column unifies the keys: the 4-option row gets "E": None.
    pq.write_table(pa.Table.from_pylist([MEDQA_4, MEDQA_5]), tmp_path / "medqa.parquet")
    rows = load_medqa(tmp_path / "medqa.parquet")
    assert [list(r["options"]) for r in rows] == [list("ABCD"), list("ABCDE")]
    assert [r["answer"] for r in rows] == ["D", "A"]


def test_medqa_answer_as_text_and_key_value_options(tmp_path):
    text_only = {k: v for k, v in MEDQA_4.items() if k != "answer_idx"}
    text_only["answer"] = "  nitrofurantoin "
    kv = {
        **MEDQA_5,
        "id": "q7",
        "options": [{"key": "B", "value": "ECG"}, {"key": "A", "value": "Echo"}],
    }
    kv["answer_idx"] = "B"
    rows = load_medqa(write_jsonl(tmp_path / "m.jsonl", [text_only, kv]))
    assert [r["answer"] for r in rows] == ["D", "B"]
    assert list(rows[1]["options"]) == ["A", "B"] and rows[1]["source_id"] == "medqa:q7"


@pytest.mark.parametrize(
    "bad,message",
    [
        (
            {**MEDQA_4, "answer_idx": "E"},
            r"row 2: field 'answer_idx': 'E' is not one of the options A, B, C, D",
        ),
        (
            {**MEDQA_4, "answer_idx": None, "answer": "Penicillin"},
            r"row 2: field 'answer': 'Penicillin' matches no option",
        ),
        (
            {k: v for k, v in MEDQA_4.items() if k not in ("answer", "answer_idx")},
            r"row 2: field 'answer_idx': missing",
        ),
        (
            {**MEDQA_4, "answer_idx": None, "options": {"A": "x", "B": "X "}, "answer": "x"},
            r"row 2: field 'answer': 'x' matches options A, B",
        ),
        ({**MEDQA_4, "question": " "}, r"row 2: field 'question': is empty"),
        (
            {**MEDQA_4, "options": {"A": "x", "B": "y", "D": "z"}},
            r"row 2: field 'options': .*got A, B, D",
        ),
        ({**MEDQA_4, "options": {"A": "x", "B": ""}}, r"row 2: field 'options': option B is empty"),
        ({**MEDQA_4, "options": ["x", "y"]}, r"row 2: field 'options': expected a mapping"),
        ("{not json", r"row 2: invalid JSON"),
    ],
)
def test_medqa_bad_rows_name_file_row_and_field(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "medqa.jsonl", [MEDQA_4, bad, MEDQA_5])
    with pytest.raises(DataError, match=r"medqa\.jsonl: " + message):
        load_medqa(path)
    rows = load_medqa(path, on_bad_row="skip")
    assert [r["source_id"] for r in rows] == ["medqa:1", "medqa:3"]


# ---------------------------------------------------------------- MedMCQA


def mcqa(cop, i: int = 0, **extra) -> dict:
    return {
        "id": f"id{i}",
        "question": f"Question {i}?",
        "opa": "alpha",
        "opb": "beta",
        "opc": "gamma",
        "opd": "delta",
        "cop": cop,
        "choice_type": "single",
        **extra,
    }


def test_medmcqa_detects_zero_based_cop(tmp_path):
    rows = load_medmcqa(write_jsonl(tmp_path / "hf.jsonl", [mcqa(2, 0), mcqa(0, 1), mcqa(3, 2)]))
    assert [r["answer"] for r in rows] == ["C", "A", "D"]
    assert rows[0]["options"] == {"A": "alpha", "B": "beta", "C": "gamma", "D": "delta"}
    assert rows[0]["source_id"] == "medmcqa:id0" and rows[0]["question"] == "Question 0?"


def test_medmcqa_detects_one_based_cop_in_json_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = [mcqa(2, 0), mcqa(4, 1), mcqa("1", 2)]
    (tmp_path / "orig.json").write_text(json.dumps(data))
    assert [r["answer"] for r in load_medmcqa(tmp_path / "orig.json")] == ["B", "D", "A"]
    data[2]["cop"] = 1
    pq.write_table(pa.Table.from_pylist(data), tmp_path / "orig.parquet")
    assert [r["answer"] for r in load_medmcqa(str(tmp_path / "orig.parquet"))] == ["B", "D", "A"]


def test_medmcqa_mixed_conventions_is_an_error_with_the_row(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [mcqa(1), mcqa(4), mcqa(2), mcqa(0)])
    with pytest.raises(
        DataError,
        match=r"mixed\.jsonl: row 4: field 'cop': 0 means options numbered 0-3, "
        r"but row 2 has cop 4 \(1-4\); a file must use one convention",
    ):
        load_medmcqa(path)
    # A mixed file is a file error, even when bad rows are skipped.
    with pytest.raises(DataError, match="row 4: field 'cop'"):
        load_medmcqa(path, on_bad_row="skip")


def test_medmcqa_ambiguous_cop_needs_cop_base(tmp_path):
    path = write_jsonl(tmp_path / "amb.jsonl", [mcqa(1), mcqa(3)])
    with pytest.raises(DataError, match=r"amb\.jsonl: field 'cop': only values 1-3.*cop_base"):
        load_medmcqa(path)
    assert [r["answer"] for r in load_medmcqa(path, cop_base=0)] == ["B", "D"]
    assert [r["answer"] for r in load_medmcqa(path, cop_base=1)] == ["A", "C"]
    with pytest.raises(DataError, match=r"row 2: field 'cop': 4 is out of range 0-3"):
        load_medmcqa(write_jsonl(tmp_path / "b.jsonl", [mcqa(1), mcqa(4)]), cop_base=0)
    with pytest.raises(ValueError, match="cop_base"):
        load_medmcqa(path, cop_base=2)


@pytest.mark.parametrize(
    "bad,message",
    [
        (mcqa(-1), r"row 2: field 'cop': is -1: no gold answer"),
        (mcqa(None), r"row 2: field 'cop': is null"),
        (mcqa(5), r"row 2: field 'cop': 5 is out of range 0-4"),
        (mcqa(1.5), r"row 2: field 'cop': expected an integer"),
        ({**mcqa(1), "opc": None}, r"row 2: field 'opc': is null"),
        ({k: v for k, v in mcqa(1).items() if k != "opd"}, r"row 2: field 'opd': missing"),
        ({**mcqa(1), "question": 3}, r"row 2: field 'question': expected a string"),
        ([1, 2], r"row 2: expected an object, got list"),
    ],
)
def test_medmcqa_bad_rows(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "medmcqa.jsonl", [mcqa(0), bad, mcqa(2)])
    with pytest.raises(DataError, match=r"medmcqa\.jsonl: " + message):
        load_medmcqa(path)
    assert len(load_medmcqa(path, on_bad_row="skip")) == 2


# ---------------------------------------------------------------- MedXpertQA

XPERT_Q = (
    "A 60-year-old man has crushing chest pain. What is the diagnosis?\n"
    "Answer Choices: (A) Pericarditis (B) Myocardial infarction (C) Aortic dissection "
    "(D) Pulmonary embolism (E) Costochondritis"
)
XPERT_OPTIONS = {
    "A": "Pericarditis",
    "B": "Myocardial infarction",
    "C": "Aortic dissection",
    "D": "Pulmonary embolism",
    "E": "Costochondritis",
}


def test_medxpertqa_with_and_without_options_dict(tmp_path):
    with_dict = {"id": "Text-0", "question": XPERT_Q, "options": XPERT_OPTIONS, "label": "B"}
    parsed = {"id": "Text-1", "question": XPERT_Q, "label": "c"}
    plain = {
        "question": "Which is a beta blocker?",
        "options": {"A": "Atenolol", "B": "Amlodipine", "C": "Losartan", "D": "Lisinopril"},
        "label": "A",
    }
    rows = load_medxpertqa(write_jsonl(tmp_path / "x.jsonl", [with_dict, parsed, plain]))
    assert [r["answer"] for r in rows] == ["B", "C", "A"]
    assert rows[0]["options"] == rows[1]["options"] == XPERT_OPTIONS
    assert rows[0]["prompt"] == rows[1]["prompt"]
    assert rows[0]["prompt"].count("Pericarditis") == 1  # the choices are not shown twice
    assert "Answer Choices" not in rows[0]["prompt"]
    assert rows[0]["prompt"].startswith("A 60-year-old man has crushing chest pain. What is")
    assert rows[0]["question"] == XPERT_Q  # the original text is kept
    assert [r["source_id"] for r in rows] == [
        "medxpertqa:Text-0",
        "medxpertqa:Text-1",
        "medxpertqa:3",
    ]
    assert len(rows[2]["options"]) == 4


def test_parse_answer_choices():
    stem, options = parse_answer_choices("Q?\nanswer choices:\n(A)one\n( B ) two (C) three")
    assert stem == "Q?" and options == {"A": "one", "B": "two", "C": "three"}
    assert parse_answer_choices("Q? no choices") == ("Q? no choices", None)
    assert parse_answer_choices("Q? Answer Choices: (B) x (C) y")[1] is None  # no (A)
    assert parse_answer_choices("Q? Answer Choices: intro (A) x (B) y")[1] is None
    twice = "Q? (see answer choices: below) Answer Choices: (A) x (B) y"
    assert parse_answer_choices(twice) == ("Q? (see answer choices: below)", {"A": "x", "B": "y"})


@pytest.mark.parametrize(
    "bad,message",
    [
        (
            {"question": "Q? no choices here", "label": "A"},
            r"row 2: field 'question': no 'options' field",
        ),
        (
            {"question": "Q? Answer Choices: (A) x (B) ", "label": "A"},
            r"row 2: field 'question': option B is empty",
        ),
        (
            {"question": XPERT_Q, "label": "F"},
            r"row 2: field 'label': 'F' is not one of the options A, B, C, D, E",
        ),
        ({"question": XPERT_Q}, r"row 2: field 'label': missing"),
        (
            {"question": XPERT_Q, "options": {"A": "x"}, "label": "A"},
            r"row 2: field 'options': .*at least 2",
        ),
    ],
)
def test_medxpertqa_bad_rows(tmp_path, bad, message):
    good = {"question": XPERT_Q, "label": "B"}
    with pytest.raises(DataError, match=r"x\.jsonl: " + message):
        load_medxpertqa(write_jsonl(tmp_path / "x.jsonl", [good, bad]))


# ---------------------------------------------------------------- dispatch and use


def test_load_benchmark_dispatch_and_errors(tmp_path):
    assert BENCHMARKS.names() == ["medmcqa", "medqa", "medxpertqa"]
    path = write_jsonl(tmp_path / "medqa.jsonl", [MEDQA_4])
    assert load_benchmark("medqa", path) == load_medqa(path)
    amb = write_jsonl(tmp_path / "amb.jsonl", [mcqa(1)])
    assert load_benchmark("medmcqa", amb, cop_base=1)[0]["answer"] == "A"
    with pytest.raises(
        RegistryError, match='unknown benchmark .medqa_usmle. \\(did you mean "medqa"'
    ):
        load_benchmark("medqa_usmle", path)
    with pytest.raises(RegistryError, match="has no parameter 'cop_base'"):
        load_benchmark("medqa", path, cop_base=0)
    with pytest.raises(DataError, match="no such file"):
        load_medqa(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="no rows"):
        load_medqa(write_jsonl(tmp_path / "empty.jsonl", []))
    with pytest.raises(DataError, match="every row was bad"):
        load_medqa(write_jsonl(tmp_path / "bad.jsonl", ["{"]), on_bad_row="skip")


def test_rows_feed_load_prompts_and_the_rewards(tmp_path):
    rows = load_medqa(write_jsonl(tmp_path / "medqa.jsonl", [MEDQA_4]))
    ds = load_prompts(rows)
    assert ds[0].text == rows[0]["prompt"] and ds[0].columns["answer"] == "D"
    completion = (
        "<think>Ampicillin and doxycycline are poor choices; ceftriaxone is too broad. "
        'The woman has "dysuria", so the answer is D.</think><answer>\\boxed{D}</answer>'
    )
    cols = {k: [v] for k, v in ds[0].columns.items()}
    assert choice_accuracy([ds[0].prompt], [completion], **cols) == [1.0]
    assert mcq_faithfulness([ds[0].prompt], [completion], **cols) == [1.0]
    assert mcq_comprehensiveness([ds[0].prompt], [completion], **cols) == [0.75]


# ---------------------------------------------------------------- benchmark files in eval and train


def test_eval_command_on_a_benchmark_file(capsys, tmp_path, tiny_model_dir):
    from grouprl.cli import main

    path = write_jsonl(tmp_path / "medqa.jsonl", [MEDQA_4, MEDQA_5])
    out = tmp_path / "res.json"
    code = main(
        ["eval", "--model", str(tiny_model_dir), "--data", str(path), "--benchmark", "medqa"]
        + ["-n", "2", "--max-new-tokens", "4", "--output", str(out)]
    )
    assert code == 0, capsys.readouterr().err
    res = json.loads(out.read_text())
    assert res["num_problems"] == 2
    for name in ("choice_accuracy", "format", "mcq_faithfulness", "mcq_comprehensiveness"):
        mean = res[f"rewards/{name}/mean"]
        assert res[f"rewards/{name}/ci_low"] <= mean <= res[f"rewards/{name}/ci_high"]
    # a bad row is one line naming the file, the row and the field
    bad = write_jsonl(tmp_path / "bad.jsonl", [MEDQA_4, {**MEDQA_4, "answer_idx": "Z"}])
    code = main(
        ["eval", "--model", str(tiny_model_dir), "--data", str(bad), "--benchmark", "medqa"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "bad.jsonl" in err[0] and "row 2" in err[0] and "answer_idx" in err[0]
    # an unknown benchmark name is the registry's one-line error, with a suggestion
    code = main(
        ["eval", "--model", str(tiny_model_dir), "--data", str(path), "--benchmark", "medq"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and 'did you mean "medqa"' in err[0]


def test_training_config_reads_a_benchmark_file(tmp_path, tiny_model_dir):
    from conftest import base_config

    from grouprl.components import load_config
    from grouprl.config import ConfigError
    from grouprl.training.trainer import Trainer

    path = write_jsonl(tmp_path / "medmcqa.jsonl", [mcqa(0), mcqa(2, 1)])
    cfg = base_config(tmp_path / "out", tiny_model_dir, max_steps=1, prompts_per_step=2)
    cfg["data"] = {"path": str(path), "benchmark": "medmcqa", "benchmark_params": {"cop_base": 0}}
    cfg["rewards"] = ["choice_accuracy", "mcq_faithfulness", "mcq_comprehensiveness"]
    trainer = Trainer(load_config(cfg))
    assert [ex.columns["answer"] for ex in trainer.dataset] == ["A", "C"]
    result = trainer.train()
    assert "rewards/mcq_comprehensiveness/mean" in result.history[-1]
    cfg["data"]["benchmark"] = "medmcq"
    cfg["train"]["output_dir"] = str(tmp_path / "out2")
    with pytest.raises(ConfigError, match='data.benchmark: .*did you mean "medmcqa"'):
        Trainer(load_config(cfg))


def test_a_lone_surrogate_in_a_benchmark_row_names_that_row(tmp_path):
    from grouprl.data.benchmarks import load_benchmark
    from grouprl.data.datasets import DataError

    rows = [mcqa(0), mcqa(2, 1)]
    rows[1]["question"] = "bad \ud800 text"
    path = tmp_path / "medmcqa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError, match=r"row 2: field 'question': .*lone surrogate U\+D800"):
        load_benchmark("medmcqa", path, cop_base=0)
    kept = load_benchmark("medmcqa", path, cop_base=0, on_bad_row="skip")
    assert len(kept) == 1
