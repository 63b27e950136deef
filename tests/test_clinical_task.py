"""The synthetic `clinical` task: KB, vignettes, splits, reasoning grammar, SFT traces, tokenizer."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from grouprl.data.tasks import TASKS
from grouprl.data.tasks import clinical as cl  # registers "clinical"
from grouprl.data.tasks.clinical_kb import (
    CONDITIONS,
    FAMILIES,
    RESERVED_WORDS,
    check_kb,
    family_findings,
)
from grouprl.rewards import RewardSet

# ---------------------------------------------------------------- a tiny parser of the grammar

THINK = re.compile(r"^<think>(.*?)</think>\s*<answer>\\boxed\{([A-Z])\}</answer>$", re.DOTALL)
CITE = re.compile(r"^the patient has (.+)$")
ABSENT = re.compile(r"^rule out (.+?) because (.+) is absent$")
FAVORS = re.compile(r"^rule out (.+?) because (.+) favors (.+)$")
CONCLUDE = re.compile(r"^the most likely diagnosis is (.+)$")


def parse(text: str) -> dict:
    """Cited findings, rule-outs, conclusions and the boxed letter of a trace."""
    m = THINK.match(text.strip())
    assert m, f"not <think>...</think><answer>\\boxed{{X}}</answer>: {text!r}"
    body = re.sub(r"\s+", " ", m.group(1)).strip()
    out: dict = {"cited": [], "absent": [], "favors": [], "conclusions": [], "box": m.group(2)}
    out["sentences"] = [s.strip().rstrip(".") for s in re.split(r"\.\s+", body) if s.strip()]
    for s in out["sentences"]:
        if mm := CITE.match(s):
            out["cited"].append(mm.group(1))
        elif mm := ABSENT.match(s):
            out["absent"].append(mm.groups())
        elif mm := FAVORS.match(s):
            out["favors"].append(mm.groups())
        elif mm := CONCLUDE.match(s):
            out["conclusions"].append(mm.group(1))
        else:
            raise AssertionError(f"sentence outside the grammar: {s!r}")
    out["ruled_out"] = [c for c, *_ in out["absent"] + out["favors"]]
    return out


@pytest.fixture(scope="module")
def task():
    return cl.clinical()


@pytest.fixture(scope="module")
def sft(task):
    return cl.sft_rows("train", seed=0, rows=task.train_rows)


@pytest.fixture(scope="module")
def tok():
    return cl.clinical_tokenizer()


# ---------------------------------------------------------------- knowledge base


def test_kb_size_and_family_structure():
    assert len(CONDITIONS) >= 40
    for fam in ("chest pain", "fever with rash", "dyspnea", "abdominal pain", "headache"):
        assert fam in FAMILIES
    for fam in FAMILIES.values():
        assert len(fam.conditions) >= 5, fam.name  # enough siblings for 5 options
        assert len(fam.nonspecific) >= 3, fam.name
        for c in fam.conditions:
            assert c.family == fam.name and CONDITIONS[c.name] is c
            assert len(c.key) >= 1 and len(c.supporting) >= 1, c.name
    assert check_kb() == []


def test_no_key_finding_shared_within_a_family():
    for fam in FAMILIES.values():
        for c in fam.conditions:
            assert not set(c.key) & set(fam.nonspecific), c.name
            for other in fam.conditions:
                if other is not c:
                    assert not set(c.key) & set(other.findings), (c.name, other.name)


def test_kb_phrases_are_closed_lowercase_and_avoid_grammar_words():
    phrases = set(CONDITIONS)
    for fam in FAMILIES:
        phrases |= family_findings(fam)
    for p in phrases:
        assert re.fullmatch(r"[a-z0-9]+( [a-z0-9]+)*", p), p
        assert not set(p.split()) & set(RESERVED_WORDS), p


# ---------------------------------------------------------------- rows and splits


def test_registered_task_defaults(task):
    built = TASKS.build("clinical", num_train=30, num_eval=10)
    assert (len(built.train_rows), len(built.eval_rows)) == (30, 10)
    assert [r["name"] for r in task.rewards] == ["choice_accuracy", "format"]
    assert task.correct_reward == "choice_accuracy" and task.chars == ""
    assert (len(task.train_rows), len(task.eval_rows)) == (4000, 400)


def test_deterministic_under_the_split_seed():
    a = cl.clinical(num_train=200, num_eval=50, seed_split=7)
    b = cl.clinical(num_train=200, num_eval=50, seed_split=7)
    c = cl.clinical(num_train=200, num_eval=50, seed_split=8)
    assert a.train_rows == b.train_rows and a.eval_rows == b.eval_rows
    assert [r["prompt"] for r in a.train_rows] != [r["prompt"] for r in c.train_rows]
    # the held-out rows do not depend on how many training rows are asked for
    d = cl.clinical(num_train=20, num_eval=50, seed_split=7)
    assert d.eval_rows == a.eval_rows
    s1 = cl.sft_rows(rows=a.train_rows, seed=3)
    assert s1 == cl.sft_rows(rows=a.train_rows, seed=3)
    assert s1 != cl.sft_rows(rows=a.train_rows, seed=4)


def test_no_vignette_shared_between_train_and_heldout(task):
    train, held = task.train_rows, task.eval_rows
    prompts = [r["prompt"] for r in train + held]
    assert len(set(prompts)) == len(prompts)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    # stricter: not even the same findings with other options, order, age or sex
    sets = [frozenset(r["findings"]) for r in train + held]
    assert len(set(sets)) == len(sets)


def test_repeated_vignettes_are_dropped(monkeypatch):
    """The generator rarely repeats itself, so force it to: repeats must be skipped."""
    real = cl.clinical(num_train=3, num_eval=1, seed_split=5).train_rows
    calls = iter(range(10**6))

    def repeating(rng, cond, n_options, pools):
        row = dict(real[next(calls) % 3])
        row["prompt"] += " "  # a new prompt, the same vignette
        return row

    monkeypatch.setattr(cl, "_vignette", repeating)
    rows = cl.generate_rows(3, seed=0)
    assert len({frozenset(r["findings"]) for r in rows}) == 3
    with pytest.raises(RuntimeError):
        cl.generate_rows(4, seed=0)


def test_row_columns_are_consistent(task):
    female_only = {f for c in CONDITIONS.values() if c.sex == "female" for f in c.findings}
    female_only -= {f for c in CONDITIONS.values() if c.sex != "female" for f in c.findings}
    assert "missed period" in female_only
    for row in task.train_rows + task.eval_rows:
        cond = CONDITIONS[row["condition"]]
        fam = FAMILIES[cond.family]
        options = row["options"]
        assert list(options) == list(cl.LETTERS[: len(options)]) and len(options) == 5
        assert options[row["answer"]] == cond.name
        assert len(set(options.values())) == len(options)
        assert {CONDITIONS[n].family for n in options.values()} == {fam.name}
        findings = row["findings"]
        assert len(set(findings)) == len(findings)
        assert row["key_findings"] and set(row["key_findings"]) <= set(cond.key)
        assert row["key_findings"] == [f for f in findings if f in cond.key]
        assert row["condition_findings"] == {
            n: list(CONDITIONS[n].findings) for n in options.values()
        }
        assert row["condition_key_findings"] == {
            n: list(CONDITIONS[n].key) for n in options.values()
        }
        assert row["nonspecific_findings"] == list(fam.nonspecific)
        nonspecific = [f for f in findings if f in fam.nonspecific]
        distractors = [f for f in findings if f not in cond.findings and f not in fam.nonspecific]
        assert 1 <= len(nonspecific) <= 2 and 1 <= len(distractors) <= 2, row["prompt"]
        assert not set(distractors) & family_findings(fam.name)
        for f in findings:
            assert f in row["prompt"]
        for letter, name in options.items():
            assert f"\n{letter}. {name}\n" in row["prompt"]
        assert row["prompt"].endswith(cl.INSTRUCTION)
        if cond.sex is not None:
            assert f" {cond.sex} with " in row["prompt"]
        if " male with " in row["prompt"]:  # e.g. no "missed period" in a male patient
            assert not set(distractors) & female_only, row["prompt"]


def test_options_parameter_and_validation():
    t = cl.clinical(num_train=20, num_eval=5, options=4)
    assert all(list(r["options"]) == list("ABCD") for r in t.train_rows)
    assert Counter(
        r["answer"] for r in cl.clinical(num_train=400, num_eval=5).train_rows
    ).keys() == set("ABCDE")
    with pytest.raises(ValueError):
        cl.clinical(options=6)


def test_render_mcq_is_generic():
    text = cl.render_mcq("Which drug? ", {"A": "aspirin", "B": "heparin"})
    assert text.splitlines() == ["Which drug?", "A. aspirin", "B. heparin", cl.INSTRUCTION]
    assert "<think>" in cl.INSTRUCTION and "<answer>\\boxed{" in cl.INSTRUCTION


# ---------------------------------------------------------------- reference traces


def check_faithful_complete(row: dict, p: dict) -> None:
    cond = row["condition"]
    assert (
        p["conclusions"] == [cond] and p["sentences"][-1] == f"the most likely diagnosis is {cond}"
    )
    assert p["box"] == row["answer"]
    assert set(p["cited"]) <= set(row["findings"])
    assert set(row["key_findings"]) <= set(p["cited"])
    others = [n for n in row["options"].values() if n != cond]
    assert sorted(p["ruled_out"]) == sorted(others)
    for name, finding in p["absent"]:
        assert finding not in row["findings"] and finding in row["condition_key_findings"][name]
    for _name, finding, favored in p["favors"]:
        assert favored == cond and finding in row["key_findings"]


def test_reference_traces_follow_the_grammar(task):
    rewards = RewardSet.from_config(task.rewards)
    rows = task.train_rows + task.eval_rows
    forms = Counter()
    for row in rows:
        assert row["reference"].count(".") == len(parse(row["reference"])["sentences"]) - 1
        p = parse(row["reference"])
        check_faithful_complete(row, p)
        forms.update(absent=len(p["absent"]), favors=len(p["favors"]))
    assert 0.4 < forms["absent"] / (forms["absent"] + forms["favors"]) < 0.6
    sample = rows[:200]  # every column goes to the rewards, as in training
    columns = {k: [r[k] for r in sample] for k in sample[0] if k != "prompt"}
    result = rewards([r["prompt"] for r in sample], [r["reference"] for r in sample], columns)
    assert result.names == ["choice_accuracy", "format"]
    assert result.rewards_NK[:, 0].eq(1.0).all() and result.rewards_NK[:, 1].eq(1.0).all()


def test_the_parser_rejects_broken_traces(task):
    row = task.train_rows[0]
    for bad in (
        row["reference"].replace("rule out", "exclude", 1),
        row["reference"].replace("</think>", "", 1),
        row["reference"].replace("\\boxed{", "{", 1),
    ):
        with pytest.raises(AssertionError):
            parse(bad)


# ---------------------------------------------------------------- SFT traces


def test_imperfection_fractions(task, sft):
    rows = task.train_rows
    n = len(rows)
    assert [s["prompt"] for s in sft] == [r["prompt"] for r in rows]
    kinds = Counter(s["kind"] for s in sft)
    assert kinds[cl.COMPLETE] == n - round(0.4 * n)
    for kind, share in cl.IMPERFECTION_MIX.items():
        assert abs(kinds[kind] - 0.4 * share * n) <= 1, kind
    measured = Counter()
    for row, s in zip(rows, sft, strict=True):
        p = parse(s["completion"])
        kind = s["kind"]
        invented = set(p["cited"]) - set(row["findings"])
        skipped = set(row["key_findings"]) - set(p["cited"])
        wrong_box = p["box"] != row["answer"]
        mismatch = row["options"][p["box"]] != p["conclusions"][0]
        measured.update(
            invented=bool(invented),
            skipped=bool(skipped),
            no_rule_out=not p["ruled_out"],
            wrong_box=wrong_box,
            mismatch=mismatch,
        )
        assert len(p["conclusions"]) == 1
        if kind == cl.COMPLETE:
            assert s["completion"] == row["reference"]
            check_faithful_complete(row, p)
        elif kind == "skip_key":
            assert skipped and not invented and not wrong_box
            assert all(f not in s["completion"] for f in skipped)
        elif kind == "invented":
            assert len(invented) == 1 and not skipped and not wrong_box
        elif kind == "no_rule_out":
            assert not p["ruled_out"] and not wrong_box and not invented
        elif kind == "mismatch":
            assert wrong_box and mismatch and p["conclusions"] == [row["condition"]]
        elif kind == "wrong_answer":
            assert wrong_box and not mismatch and not invented
            assert row["condition"] in p["ruled_out"]
    # fractions measured from the text match the documented mix
    mix = cl.IMPERFECTION_MIX
    assert measured["wrong_box"] / n == pytest.approx(
        0.4 * (mix["mismatch"] + mix["wrong_answer"]), abs=0.002
    )
    assert measured["invented"] / n == pytest.approx(0.4 * mix["invented"], abs=0.002)
    assert measured["mismatch"] / n == pytest.approx(0.4 * mix["mismatch"], abs=0.002)
    assert measured["no_rule_out"] / n == pytest.approx(0.4 * mix["no_rule_out"], abs=0.002)
    assert 1 - measured["wrong_box"] / n == pytest.approx(0.86, abs=0.005)
    # skipped key findings: the skip_key traces, and wrong_answer ones (they cite no key finding)
    assert measured["skipped"] / n == pytest.approx(
        0.4 * (mix["skip_key"] + mix["wrong_answer"]), abs=0.002
    )


def test_sft_fraction_zero_and_one(task):
    rows = task.eval_rows[:100]
    clean = cl.sft_rows(rows=rows, imperfect_frac=0.0)
    assert all(
        s["kind"] == cl.COMPLETE and s["completion"] == r["reference"]
        for s, r in zip(clean, rows, strict=True)
    )
    dirty = cl.sft_rows(rows=rows, imperfect_frac=1.0)
    assert all(s["kind"] != cl.COMPLETE for s in dirty)
    with pytest.raises(ValueError):
        cl.sft_rows(rows=rows, mix={"typo": 1.0})


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_and_length(task, sft, tok):
    assert tok.padding_side == "left"
    assert {tok.pad_token, tok.eos_token, tok.bos_token, tok.unk_token} == {
        "<pad>",
        "<eos>",
        "<bos>",
        "<unk>",
    }
    for tag in ("<think>", "</think>", "<answer>", "</answer>", "\\boxed{"):
        assert len(tok(tag, add_special_tokens=False)["input_ids"]) == 1
    lengths = []
    by_prompt = {r["prompt"]: r for r in task.train_rows}
    for s in sft:
        p = tok(s["prompt"], add_special_tokens=False)["input_ids"]
        c = tok(s["completion"], add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in p + c
        assert tok.decode(p, skip_special_tokens=True) == s["prompt"]
        decoded = tok.decode(c + [tok.eos_token_id], skip_special_tokens=True)
        assert decoded == s["completion"]
        assert parse(decoded) == parse(s["completion"])
        lengths.append(len(p) + len(c) + 1)  # + eos
        assert by_prompt[s["prompt"]]
    assert max(lengths) <= 160
    assert sum(lengths) / len(lengths) <= 125


def test_tokenizer_unknown_words_and_reload(tok, tmp_path):
    ids = tok("the patient has zebra fever", add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id in ids
    assert tok.decode(ids, skip_special_tokens=True) == "the patient has fever"
    batch = tok(
        ["<think> the", "<think> the patient has fever"], padding=True, add_special_tokens=False
    )
    assert batch["input_ids"][0][0] == tok.pad_token_id  # left padding
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path)
    text = cl.clinical(num_train=1, num_eval=1).train_rows[0]["reference"]
    assert again.padding_side == "left"
    assert (
        again(text, add_special_tokens=False)["input_ids"]
        == tok(text, add_special_tokens=False)["input_ids"]
    )
    assert again.decode(again(text, add_special_tokens=False)["input_ids"]) == text


def test_saved_model_reloads_the_word_tokenizer_not_the_model_types(tok, tmp_path):
    # config.json says qwen2; AutoTokenizer alone would build a Qwen2Tokenizer whose
    # pre-tokenizer splits the closed vocabulary into <unk>s.
    from grouprl.config import ModelConfig
    from grouprl.models.loading import load_model_and_tokenizer
    from grouprl.models.tiny import build_tiny_model, save_model

    save_model(build_tiny_model(tok, hidden_size=32, num_layers=1), tok, tmp_path)
    _model, again, _ = load_model_and_tokenizer(
        ModelConfig(name_or_path=str(tmp_path), device="cpu")
    )
    text = cl.clinical(num_train=1, num_eval=1).eval_rows[0]["prompt"]
    ids = again(text, add_special_tokens=False)["input_ids"]
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert again.unk_token_id not in ids
    assert again.decode(ids) == text
    assert again.padding_side == "left"
