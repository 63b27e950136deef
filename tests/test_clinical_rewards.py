"""Clinical faithfulness/comprehensiveness rewards and their generic MCQ versions, on
hand-written completions."""

from __future__ import annotations

import pytest

from grouprl.data.benchmarks import render_mcq
from grouprl.registry import RegistryError
from grouprl.rewards import REWARDS, RewardSet
from grouprl.rewards.clinical import (
    clinical_comprehensiveness,
    clinical_faithfulness,
    mcq_comprehensiveness,
    mcq_faithfulness,
)

# ---------------------------------------------------------------- synthetic task rows

ROW = {
    "answer": "B",
    "options": {"A": "influenza", "B": "pneumonia", "C": "asthma", "D": "heart failure"},
    "findings": ["fever", "productive cough", "crackles", "fatigue", "headache"],
    "key_findings": ["productive cough", "crackles"],
    "condition_findings": {
        "influenza": ["fever", "myalgia", "headache"],
        "pneumonia": ["fever", "productive cough", "crackles"],
        "asthma": ["wheezing", "dyspnea"],
        "heart failure": ["edema", "dyspnea"],
    },
    "nonspecific_findings": ["fatigue"],
}
PERFECT = [
    "the patient has fever",
    "the patient has productive cough",
    "the patient has crackles",
    "rule out influenza because there is no myalgia",
    "rule out asthma because there is no wheezing",
    "rule out heart failure because there is no edema",
    "the most likely diagnosis is pneumonia",
]


def trace(sentences: list[str], box: str = "b", sep: str = " . ") -> str:
    """A completion in the synthetic grammar, spaced as a word-level decode writes it."""
    return f"<think> {sep.join(sentences)} . </think> <answer> \\boxed{{{box}}} </answer>"


def columns(n: int = 1, **override) -> dict:
    row = {**ROW, **override}
    return {k: [v] * n for k, v in row.items()}


def faith(completion, **kw) -> float | None:
    params = {k: kw.pop(k) for k in ("gate", "checks") if k in kw}
    return clinical_faithfulness(["p"], [completion], **columns(**kw), **params)[0]


def compr(completion, **kw) -> float | None:
    params = {k: kw.pop(k) for k in ("gate", "w_key", "w_rule", "zero_if_invented") if k in kw}
    return clinical_comprehensiveness(["p"], [completion], **columns(**kw), **params)[0]


def test_perfect_trace_scores_one_under_every_gate():
    for gate in ("none", "format", "correct"):
        assert faith(trace(PERFECT), gate=gate) == 1.0
        assert compr(trace(PERFECT), gate=gate) == 1.0


def test_invented_finding_lowers_check_a():
    # 4 distinct cited findings, 1 invented: a = 0 (all or nothing); b = 1; c = 3/3 over
    # present ones.
    comp = trace(["the patient has chest pain", *PERFECT])
    assert faith(comp) == pytest.approx((0 + 1 + 1) / 3)
    assert faith(comp, checks=["no_invented"]) == 0.0
    # Citing the same invented finding twice is no worse.
    comp = trace(["the patient has chest pain", "the patient has chest pain", *PERFECT])
    assert faith(comp) == pytest.approx((0 + 1 + 1) / 3)


def test_each_faithfulness_check_alone():
    # an invented finding (a = 0), the box names another option (b = 0), and a cited
    # present finding of influenza's, not pneumonia's (c = 3/4)
    comp = trace(["the patient has chest pain", "the patient has headache", *PERFECT], box="a")
    assert faith(comp, checks=["no_invented"]) == 0.0
    assert faith(trace(PERFECT), checks=["no_invented"]) == 1.0
    assert faith(comp, checks="matches_box") == 0.0
    assert faith(comp, checks=["consistent"]) == pytest.approx(3 / 4)
    assert faith(comp, checks=["no_invented", "consistent"]) == pytest.approx((0 + 3 / 4) / 2)
    assert faith(comp) == pytest.approx((0 + 0 + 3 / 4) / 3)
    for bad in ([], ["no_invention"]):
        with pytest.raises(ValueError, match="checks must be a non-empty subset"):
            faith(comp, checks=bad)


def test_comprehensiveness_can_require_faithful_citations():
    invented = trace(["the patient has chest pain", *PERFECT])
    assert compr(invented) == 1.0  # every key finding cited, every other option ruled out
    assert compr(invented, zero_if_invented=True) == 0.0
    assert compr(trace(PERFECT), zero_if_invented=True) == 1.0
    partial = trace(PERFECT[1:2] + PERFECT[3:])  # one of the two key findings, no invention
    assert compr(partial, zero_if_invented=True) == pytest.approx(0.5 * 0.5 + 0.5 * 1)
    # it needs the vignette's findings: a row without them cannot be scored
    assert compr(trace(PERFECT), zero_if_invented=True, findings=None) is None


def test_nothing_cited_gives_full_a_and_c_but_no_key_findings():
    comp = trace(PERFECT[3:])
    assert faith(comp) == 1.0  # a = 1 and c = 1 by rule when nothing is cited
    assert compr(comp) == pytest.approx(0.5 * 0 + 0.5 * 1)


@pytest.mark.parametrize(
    "sentences,box",
    [
        (PERFECT, "c"),  # the conclusion contradicts the box
        (PERFECT[:-1] + ["the most likely diagnosis is bronchitis"], "b"),  # not an option
        (PERFECT[:-1], "b"),  # no conclusion
        (PERFECT + ["the most likely diagnosis is pneumonia"], "b"),  # two conclusions
    ],
)
def test_conclusion_must_be_single_and_match_the_box(sentences, box):
    concluded_pneumonia = sentences.count("the most likely diagnosis is pneumonia") == 1
    # c: fever, productive cough, crackles are pneumonia findings; without a single
    # conclusion none of them is consistent (no nonspecific finding is cited).
    c = 1.0 if concluded_pneumonia else 0.0
    assert faith(trace(sentences, box=box)) == pytest.approx((1 + 0 + c) / 3)


def test_several_boxes_or_no_box_fail_check_b():
    several = trace(PERFECT).replace("</answer>", "or \\boxed{b} </answer>")
    assert faith(several) == pytest.approx(2 / 3)
    in_think = trace(PERFECT, box="b").replace("<think>", "<think> \\boxed{b} .")
    assert faith(in_think) == pytest.approx(2 / 3)
    no_box = trace(PERFECT).replace("\\boxed{b}", "b")
    assert faith(no_box) == pytest.approx(2 / 3)
    not_letter = trace(PERFECT, box="pneumonia")
    assert faith(not_letter) == pytest.approx(2 / 3)


def test_consistency_counts_concluded_and_nonspecific_findings():
    # fever (pneumonia) and fatigue (nonspecific) are consistent; headache (influenza) not.
    comp = trace(
        [
            "the patient has fever",
            "the patient has fatigue",
            "the patient has headache",
            "the most likely diagnosis is pneumonia",
        ]
    )
    assert faith(comp) == pytest.approx((1 + 1 + 2 / 3) / 3)
    # Invented findings are left out of c (they are a's business).
    comp = trace(["the patient has fever", "the patient has rash", PERFECT[-1]])
    assert faith(comp) == pytest.approx((0 + 1 + 1) / 3)
    # Without nonspecific_findings, fatigue is inconsistent with pneumonia.
    comp = trace(["the patient has fatigue", PERFECT[-1]])
    assert faith(comp) == 1.0
    assert faith(comp, nonspecific_findings=None) == pytest.approx(2 / 3)


def test_options_not_ruled_out_and_key_findings_not_cited():
    comp = trace(
        [
            "the patient has productive cough",
            "rule out influenza because there is no myalgia",
            "the most likely diagnosis is pneumonia",
        ]
    )
    # K = 1/2 key findings; R = 1/3 of the non-gold options ruled out.
    assert compr(comp) == pytest.approx(0.5 * 0.5 + 0.5 / 3)
    assert compr(comp, w_key=1.0, w_rule=0.0) == pytest.approx(0.5)
    assert compr(comp, w_key=0.0, w_rule=3.0) == pytest.approx(1 / 3)
    assert compr(comp, w_key=2.0, w_rule=2.0) == pytest.approx(0.5 * 0.5 + 0.5 / 3)
    # Ruling out the gold option does not count; "because" is optional.
    comp = trace(["rule out pneumonia", "rule out asthma", PERFECT[-1]])
    assert compr(comp) == pytest.approx(0.5 * 0 + 0.5 / 3)
    with pytest.raises(ValueError, match="w_key and w_rule"):
        compr(comp, w_key=-1.0, w_rule=2.0)
    with pytest.raises(ValueError, match="w_key and w_rule"):
        compr(comp, w_key=0.0, w_rule=0.0)


def test_missing_tags_score_zero():
    for comp in (
        trace(PERFECT).replace("<think>", ""),
        trace(PERFECT).replace("</answer>", ""),
        " . ".join(PERFECT) + " \\boxed{b}",
    ):
        for gate in ("none", "format"):
            assert faith(comp, gate=gate) == 0.0
            assert compr(comp, gate=gate) == 0.0


def test_gate_modes():
    extra = trace(PERFECT) + " thanks"  # text after </answer>: the format rule fails
    assert faith(extra, gate="none") == 1.0 and compr(extra, gate="none") == 1.0
    assert faith(extra, gate="format") == 0.0 and compr(extra, gate="format") == 0.0
    assert faith(extra, gate="correct") == 1.0
    wrong = trace(PERFECT[:-1] + ["the most likely diagnosis is asthma"], box="c")
    # Pays for a wrong answer (fever, cough and crackles are no asthma findings: c = 0).
    assert faith(wrong, gate="none") == pytest.approx(2 / 3)
    assert compr(wrong, gate="format") == 1.0
    assert faith(wrong, gate="correct") == 0.0 and compr(wrong, gate="correct") == 0.0
    # "correct" needs a letter gold; the other gates do not.
    assert faith(trace(PERFECT), gate="correct", answer=None) is None
    assert faith(trace(PERFECT), gate="format", answer=None) == 1.0
    with pytest.raises(ValueError, match="gate must be one of none, format, correct"):
        faith(trace(PERFECT), gate="always")


def test_a_row_without_the_needed_columns_gives_none():
    comp = trace(PERFECT)
    assert faith(comp, findings=None) is None
    assert faith(comp, options="A. flu") is None
    assert faith(comp, condition_findings=["fever"]) is None
    assert compr(comp, key_findings=None) is None
    assert compr(comp, answer="E") is None  # gold letter not among the options
    assert compr(comp, answer=None) is None
    assert compr(comp, answer=" b ") == 1.0
    # A column absent from the whole batch gives None for every row.
    assert clinical_faithfulness(["p", "p"], [comp, comp], answer=["B", "B"]) == [None, None]
    assert mcq_comprehensiveness(["p"], [comp]) == [None]


def test_parsing_is_robust_to_decoded_spacing_and_case():
    row = {
        "findings": ["ST-elevation", "temperature 38.5", "chest pain"],
        "key_findings": ["ST-elevation", "temperature 38.5"],
        "condition_findings": {"Myocardial Infarction": ["ST-elevation", "chest pain"]},
        "nonspecific_findings": ["temperature 38.5"],
        "options": {"A": "Myocardial Infarction", "B": "Pericarditis"},
        "answer": "A",
    }
    spaced = (
        "< think > the patient has st - elevation.the patient has temperature 38.5 ;"
        " rule out pericarditis because the patient has no friction rub\n"
        "the most likely diagnosis is myocardial infarction . < / think >"
        "< answer > \\ boxed { a } < / answer >"
    )
    assert faith(spaced, gate="none", **row) == 1.0
    assert compr(spaced, gate="none", **row) == 1.0
    # The strict format rule refuses the spaced tags.
    assert faith(spaced, gate="format", **row) == 0.0
    # "the patient has" inside a rule-out sentence is not a cited finding, but at the
    # start of a sentence "the patient has no friction rub" is an invented one.
    cited_no = spaced.replace("because the patient has no friction rub", ". the patient has no rub")
    assert faith(cited_no, gate="none", **row) == pytest.approx((0 + 1 + 1) / 3)


def test_registered_and_run_by_a_reward_set():
    for name in (
        "clinical_faithfulness",
        "clinical_comprehensiveness",
        "mcq_faithfulness",
        "mcq_comprehensiveness",
    ):
        assert name in REWARDS
    rs = RewardSet(
        [
            {"name": "clinical_faithfulness", "params": {"gate": "correct"}},
            {"name": "clinical_comprehensiveness", "params": {"w_key": 1.0, "w_rule": 0.0}},
        ]
    )
    conv = [{"role": "assistant", "content": trace(PERFECT)}]
    res = rs(["p", "p"], [conv, trace(PERFECT, box="c")], columns(2))
    assert res.rewards_NK.tolist() == [[1.0, 1.0], [0.0, 1.0]]
    with pytest.raises(RegistryError, match='did you mean "w_key"'):
        RewardSet([{"name": "clinical_comprehensiveness", "params": {"w_kye": 1.0}}])


# ---------------------------------------------------------------- generic MCQ versions

OPTIONS = {
    "A": "Metformin",
    "B": "Insulin glargine",
    "C": "Lifestyle modification alone",
    "D": "Glipizide",
}
PROMPT = render_mcq(
    "A 54-year-old man with HbA1c 11.2% and weight loss despite diet. Best next step?", OPTIONS
)


def mcq(think: str, box: str = "b") -> str:
    return f"<think>{think}</think>\n<answer>The answer is \\boxed{{{box}}}.</answer>"


def mf(completion, options=OPTIONS, prompt=PROMPT, **params) -> float | None:
    return mcq_faithfulness([prompt], [completion], options=[options], **params)[0]


def mc(completion, options=OPTIONS, **params) -> float | None:
    return mcq_comprehensiveness([PROMPT], [completion], options=[options], **params)[0]


GOOD = (
    'The stem says "HbA1c 11.2% and weight loss". Metformin alone is too weak here; '
    "glipizide has the same problem. Lifestyle modification alone is not enough. "
    "Insulin glargine treats catabolic hyperglycemia. So the answer is (B)."
)


def test_mcq_perfect():
    assert mf(mcq(GOOD)) == 1.0
    assert mc(mcq(GOOD)) == 1.0
    conv = [{"role": "assistant", "content": mcq(GOOD)}]
    chat_prompt = [{"role": "user", "content": PROMPT}]
    assert mcq_faithfulness([chat_prompt], [conv], options=[OPTIONS]) == [1.0]


@pytest.mark.parametrize(
    "conclusion,box,named",
    [
        ("So the answer is (B).", "b", 1.0),
        ("So the answer is b", "b", 1.0),
        ("The correct answer is option B, insulin", "b", 1.0),
        ("The best answer is: insulin glargine", "b", 1.0),
        ("The best answer is insulin glargine", "c", 0.0),  # names B, boxes C
        ("So the answer is (C).", "b", 0.0),
        ("So the answer is a basal insulin", "a", 0.0),  # "a" is an article here
        ("Nothing is concluded", "b", 0.0),
        ("The answer is (A). On reflection, the answer is (B)", "b", 1.0),  # the last wins
        ("The answer is (B). On reflection, the answer is (A)", "b", 0.0),
    ],
)
def test_mcq_conclusion_must_name_the_boxed_option(conclusion, box, named):
    assert mf(mcq(conclusion, box=box)) == pytest.approx((named + 1.0) / 2)


def test_mcq_longest_option_text_wins():
    options = {"A": "Anemia", "B": "Iron deficiency anemia", "C": "Thalassemia"}
    comp = mcq("The most likely diagnosis is iron deficiency anemia.", box="b")
    assert mf(comp, options=options) == 1.0
    assert mf(comp.replace("{b}", "{a}"), options=options) == 0.5


def test_mcq_quotes_must_come_from_the_prompt():
    invented = GOOD.replace('"HbA1c 11.2% and weight loss"', '"HbA1c 13% and ketosis"')
    assert mf(mcq(invented)) == 0.5
    spaced = GOOD.replace(
        '"HbA1c 11.2% and weight loss"', "\u201c hba1c 11 . 2 % and weight \u201d"
    )
    assert mf(mcq(spaced)) == 1.0  # curly quotes; compared as normalized words
    assert mf(mcq(spaced.replace("weight", "ketones"))) == 0.5
    assert mf(mcq(GOOD), prompt="another question") == 0.5


def test_mcq_comprehensiveness_counts_options_discussed():
    think = "Metformin is first line, but option c ignores the weight loss. The answer is (B)."
    assert mc(mcq(think)) == pytest.approx(3 / 4)  # A by text, C and B by letter
    assert mc(mcq("Not sure. The answer is b.")) == 0.0
    # Option texts match whole words only: "nystatin" does not discuss "Statin".
    options = {"A": "Statin", "B": "Nystatin"}
    assert mc(mcq("Nystatin is an antifungal. The answer is b."), options=options) == 0.5
    # Only the reasoning counts, not the answer block.
    comp = "<think>Hmm.</think><answer>Metformin, glipizide: \\boxed{b}</answer>"
    assert mc(comp) == 0.0


def test_mcq_tags_gate_and_missing_options():
    no_tags = GOOD + " \\boxed{b}"
    assert mf(no_tags, gate="none") == 0.0 and mc(no_tags, gate="none") == 0.0
    extra = mcq(GOOD) + " bye"
    assert mf(extra, gate="format") == 0.0 and mc(extra, gate="format") == 0.0
    assert mf(extra, gate="none") == 1.0 and mc(extra, gate="none") == 1.0
    assert mf(mcq(GOOD), gate="correct", answer=["B"]) == 1.0
    assert mf(mcq(GOOD), gate="correct", answer=["C"]) == 0.0
    assert mc(mcq(GOOD), gate="correct", answer=[None]) is None
    assert mf(mcq(GOOD), options=None) is None and mc(mcq(GOOD), options={}) is None
    with pytest.raises(ValueError, match="gate must be"):
        mc(mcq(GOOD), gate="Format")
