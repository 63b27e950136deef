"""The knowledge base behind the synthetic `clinical` task.

This is a training environment for reasoning rewards, not medical advice. The findings
are simplified textbook associations chosen so that conditions can be told apart by
rule, and they are not meant to describe real patients.

Conditions come in confusable families (chest pain, fever with rash, ...). Each family
lists non-specific findings that are common to all of its conditions. Each condition
lists two kinds of findings:

- key findings, which tell it apart from its siblings. A key finding of a condition is
  never a finding (key or supporting) of another condition in its family, and never one
  of the family's non-specific findings.
- supporting findings, which fit the condition but may be shared with siblings.

Every phrase (condition names and findings) is lowercase words over ``[a-z0-9]``
separated by single spaces. No phrase uses the words of the reasoning grammar
("because", "favors", "absent", "rule out", ...), so a parser never mistakes one for the
other. `check_kb()` checks all of this, and the tests call it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Condition:
    name: str
    family: str
    key: tuple[str, ...]  # discriminating within the family
    supporting: tuple[str, ...]  # consistent with it, may be shared with siblings
    ages: tuple[int, int] = (18, 80)  # inclusive age range of generated patients
    sex: str | None = None  # "male" or "female" when the condition fixes it

    @property
    def findings(self) -> tuple[str, ...]:
        """All the condition's findings, key findings first."""
        return self.key + self.supporting


@dataclass(frozen=True)
class Family:
    name: str
    nonspecific: tuple[str, ...]
    conditions: tuple[Condition, ...]


# family -> (non-specific findings, [(name, key, supporting, ages, sex), ...])
_RAW: dict[str, tuple[list[str], list[tuple]]] = {
    "chest pain": (
        ["chest pain", "diaphoresis", "nausea", "tachycardia"],
        [
            (
                "myocardial infarction",
                ["st elevation", "elevated troponin", "pain radiating to left arm"],
                ["history of smoking", "hyperlipidemia", "exertional onset"],
                (40, 85),
                None,
            ),
            (
                "pulmonary embolism",
                ["unilateral leg swelling", "elevated d dimer", "recent long flight"],
                ["pleuritic chest pain", "hemoptysis", "hypoxia"],
                (25, 80),
                None,
            ),
            (
                "pericarditis",
                ["relief when leaning forward", "pericardial friction rub", "pr depression"],
                ["pleuritic chest pain", "recent viral illness"],
                (18, 60),
                None,
            ),
            (
                "aortic dissection",
                [
                    "tearing back pain",
                    "unequal arm blood pressures",
                    "widened mediastinum",
                ],
                ["history of hypertension", "sudden onset"],
                (45, 85),
                None,
            ),
            (
                "pneumothorax",
                ["unilateral decreased breath sounds", "hyperresonance to percussion"],
                ["tall thin habitus", "sudden onset", "history of smoking"],
                (18, 40),
                None,
            ),
            (
                "gerd",
                ["burning pain after meals", "sour taste in mouth", "relief with antacids"],
                ["worse when lying down", "obesity", "normal ecg"],
                (25, 75),
                None,
            ),
            (
                "costochondritis",
                ["chest wall tenderness", "recent heavy lifting"],
                ["normal ecg", "pain worse with movement"],
                (18, 60),
                None,
            ),
        ],
    ),
    "fever with rash": (
        ["fever", "malaise", "rash", "myalgia"],
        [
            (
                "measles",
                ["koplik spots", "rash spreading from face"],
                ["conjunctivitis", "cough", "runny nose", "unvaccinated"],
                (1, 15),
                None,
            ),
            (
                "varicella",
                ["vesicles in different stages", "itchy vesicular rash"],
                ["unvaccinated", "sick contact"],
                (1, 12),
                None,
            ),
            (
                "scarlet fever",
                ["sandpaper rash", "strawberry tongue", "circumoral pallor"],
                ["sore throat", "cervical lymphadenopathy"],
                (3, 12),
                None,
            ),
            (
                "kawasaki disease",
                ["prolonged fever", "cracked red lips", "swollen hands and feet"],
                ["conjunctivitis", "cervical lymphadenopathy"],
                (1, 5),
                None,
            ),
            (
                "rocky mountain spotted fever",
                ["rash starting at wrists", "palm and sole petechiae"],
                ["tick bite", "recent camping", "headache"],
                (10, 70),
                None,
            ),
            (
                "meningococcemia",
                ["rapidly spreading purpura", "neck stiffness"],
                ["hypotension", "vomiting"],
                (1, 25),
                None,
            ),
            (
                "lyme disease",
                ["target shaped rash", "facial palsy"],
                ["tick bite", "recent camping", "joint pain"],
                (10, 70),
                None,
            ),
        ],
    ),
    "dyspnea": (
        ["dyspnea", "tachypnea", "fatigue", "cough"],
        [
            (
                "heart failure",
                ["jugular venous distension", "s3 gallop", "orthopnea"],
                ["bilateral leg edema", "bibasilar crackles", "prior heart attack"],
                (50, 85),
                None,
            ),
            (
                "asthma",
                ["expiratory wheezing", "history of atopy"],
                ["nocturnal cough", "chest tightness"],
                (8, 40),
                None,
            ),
            (
                "copd",
                ["barrel chest", "pursed lip breathing"],
                ["history of smoking", "productive cough", "prolonged expiration"],
                (50, 85),
                None,
            ),
            (
                "pneumonia",
                ["focal crackles", "lobar consolidation", "rust colored sputum"],
                ["fever", "productive cough", "pleuritic chest pain"],
                (18, 85),
                None,
            ),
            (
                "anaphylaxis",
                ["hives", "lip swelling", "recent bee sting"],
                ["hypotension", "throat tightness"],
                (5, 60),
                None,
            ),
            (
                "iron deficiency anemia",
                ["pale conjunctiva", "low ferritin"],
                ["spoon shaped nails", "pica"],
                (18, 60),
                None,
            ),
        ],
    ),
    "abdominal pain": (
        ["abdominal pain", "nausea", "vomiting", "loss of appetite"],
        [
            (
                "appendicitis",
                ["right lower quadrant tenderness", "pain migrating from umbilicus"],
                ["low grade fever", "leukocytosis"],
                (8, 45),
                None,
            ),
            (
                "acute cholecystitis",
                ["right upper quadrant pain", "murphy sign"],
                ["pain after fatty meal", "history of gallstones", "leukocytosis"],
                (30, 75),
                None,
            ),
            (
                "acute pancreatitis",
                ["epigastric pain radiating back", "elevated lipase"],
                ["heavy alcohol use", "history of gallstones"],
                (25, 75),
                None,
            ),
            (
                "small bowel obstruction",
                ["abdominal distension", "high pitched bowel sounds"],
                ["prior abdominal surgery", "bilious vomiting"],
                (30, 85),
                None,
            ),
            (
                "ectopic pregnancy",
                ["positive pregnancy test", "missed period", "vaginal bleeding"],
                ["pelvic pain", "hypotension"],
                (18, 40),
                "female",
            ),
            (
                "diverticulitis",
                ["left lower quadrant tenderness", "sigmoid wall thickening"],
                ["constipation", "low grade fever", "leukocytosis"],
                (45, 85),
                None,
            ),
            (
                "perforated peptic ulcer",
                ["free air under diaphragm", "rigid abdomen"],
                ["nsaid use", "sudden onset"],
                (30, 80),
                None,
            ),
        ],
    ),
    "headache": (
        ["headache", "nausea", "photophobia", "vomiting"],
        [
            (
                "migraine",
                ["unilateral throbbing headache", "visual aura"],
                ["familial headaches", "relief with sleep"],
                (15, 50),
                None,
            ),
            (
                "tension headache",
                ["band like headache", "neck muscle tenderness"],
                ["stress", "poor sleep"],
                (18, 60),
                None,
            ),
            (
                "cluster headache",
                ["severe orbital pain", "tearing of one eye"],
                ["nightly attacks", "restlessness during attacks"],
                (20, 50),
                None,
            ),
            (
                "subarachnoid hemorrhage",
                ["thunderclap headache", "worst headache of life"],
                ["neck stiffness", "loss of consciousness"],
                (30, 70),
                None,
            ),
            (
                "bacterial meningitis",
                ["kernig sign", "high fever"],
                ["neck stiffness", "altered mental status"],
                (15, 70),
                None,
            ),
            (
                "pseudotumor cerebri",
                ["papilledema", "pulsatile tinnitus"],
                ["obesity", "transient visual loss"],
                (18, 40),
                "female",
            ),
            (
                "giant cell arteritis",
                ["jaw claudication", "scalp tenderness", "elevated esr"],
                ["vision loss", "shoulder stiffness"],
                (55, 85),
                None,
            ),
        ],
    ),
    "joint pain": (
        ["joint pain", "joint swelling", "reduced range of motion"],
        [
            (
                "gout",
                ["red swollen big toe", "needle shaped crystals"],
                ["heavy alcohol use", "diuretic use"],
                (30, 80),
                None,
            ),
            (
                "pseudogout",
                ["rhomboid crystals", "chondrocalcinosis"],
                ["knee involvement"],
                (60, 85),
                None,
            ),
            (
                "septic arthritis",
                ["purulent joint fluid", "inability to bear weight"],
                ["fever", "iv drug use", "knee involvement"],
                (18, 80),
                None,
            ),
            (
                "rheumatoid arthritis",
                [
                    "symmetric hand swelling",
                    "prolonged morning stiffness",
                    "positive rheumatoid factor",
                ],
                ["fatigue", "ulnar deviation"],
                (25, 70),
                None,
            ),
            (
                "osteoarthritis",
                ["pain worse with activity", "heberden nodes"],
                ["obesity", "crepitus"],
                (50, 85),
                None,
            ),
            (
                "reactive arthritis",
                ["urethritis", "recent diarrheal illness"],
                ["conjunctivitis", "heel pain"],
                (18, 45),
                None,
            ),
        ],
    ),
    "fatigue and weight change": (
        ["fatigue", "generalized weakness", "mood changes"],
        [
            (
                "hypothyroidism",
                ["cold intolerance", "elevated tsh"],
                ["weight gain", "constipation", "dry skin"],
                (25, 80),
                None,
            ),
            (
                "graves disease",
                ["heat intolerance", "exophthalmos", "low tsh"],
                ["weight loss", "tremor", "palpitations"],
                (20, 60),
                None,
            ),
            (
                "type 1 diabetes",
                ["elevated blood glucose", "ketones in urine"],
                ["weight loss", "polyuria", "increased thirst"],
                (6, 30),
                None,
            ),
            (
                "addison disease",
                ["skin hyperpigmentation", "salt craving", "hyperkalemia"],
                ["hypotension", "weight loss"],
                (20, 60),
                None,
            ),
            (
                "cushing syndrome",
                ["purple abdominal striae", "moon face"],
                ["weight gain", "easy bruising", "history of hypertension"],
                (25, 65),
                None,
            ),
            (
                "pheochromocytoma",
                ["paroxysmal hypertension", "elevated metanephrines"],
                ["palpitations", "tremor", "episodic sweating"],
                (20, 60),
                None,
            ),
        ],
    ),
    "diarrhea": (
        ["diarrhea", "abdominal cramps", "dehydration"],
        [
            (
                "c difficile colitis",
                ["recent antibiotic use", "pseudomembranes on colonoscopy"],
                ["recent hospital stay", "fever"],
                (40, 85),
                None,
            ),
            (
                "ulcerative colitis",
                ["bloody diarrhea", "continuous colonic inflammation"],
                ["tenesmus", "weight loss"],
                (15, 45),
                None,
            ),
            (
                "crohn disease",
                ["perianal fistula", "skip lesions"],
                ["weight loss", "right lower quadrant pain"],
                (15, 45),
                None,
            ),
            (
                "celiac disease",
                ["tissue transglutaminase antibodies", "symptoms after gluten"],
                ["iron deficiency", "bloating", "itchy blistering rash"],
                (10, 50),
                None,
            ),
            (
                "irritable bowel syndrome",
                ["pain relieved by defecation", "normal colonoscopy"],
                ["bloating", "stress"],
                (18, 50),
                None,
            ),
            (
                "lactose intolerance",
                ["symptoms after dairy", "positive breath test"],
                ["bloating", "flatulence"],
                (10, 60),
                None,
            ),
            (
                "giardiasis",
                ["greasy stools", "drinking stream water"],
                ["recent camping", "bloating"],
                (10, 60),
                None,
            ),
        ],
    ),
}

# Findings that belong to no family; with other families' findings, they are the pool
# that distractors are drawn from.
GENERIC_FINDINGS: tuple[str, ...] = (
    "seasonal allergies",
    "low back pain",
    "insomnia",
    "mild anxiety",
    "dental pain",
    "eczema",
)

SEXES: tuple[str, ...] = ("male", "female")

# Words and phrases that the reasoning grammar uses; no KB phrase may contain them.
RESERVED_WORDS = ("because", "favors", "absent", "rule", "patient", "diagnosis")


def _build() -> tuple[dict[str, Family], dict[str, Condition]]:
    families: dict[str, Family] = {}
    conditions: dict[str, Condition] = {}
    for fam_name, (nonspecific, raw) in _RAW.items():
        conds = tuple(
            Condition(name, fam_name, tuple(key), tuple(supp), tuple(ages), sex)
            for name, key, supp, ages, sex in raw
        )
        families[fam_name] = Family(fam_name, tuple(nonspecific), conds)
        for c in conds:
            if c.name in conditions:
                raise ValueError(f"clinical kb: condition {c.name!r} defined twice")
            conditions[c.name] = c
    return families, conditions


FAMILIES, CONDITIONS = _build()


def family_findings(family: str) -> set[str]:
    """Every finding that a family mentions: its non-specific ones and all its conditions'."""
    fam = FAMILIES[family]
    out = set(fam.nonspecific)
    for c in fam.conditions:
        out.update(c.findings)
    return out


def all_findings() -> list[str]:
    """Every finding phrase in the KB (generic ones included), sorted."""
    out = set(GENERIC_FINDINGS)
    for fam in FAMILIES:
        out |= family_findings(fam)
    return sorted(out)


_PHRASE = re.compile(r"[a-z0-9]+( [a-z0-9]+)*")


def check_kb() -> list[str]:
    """Problems with the KB (an empty list when it is consistent)."""
    problems: list[str] = []
    names = set(CONDITIONS)
    phrases = list(names) + all_findings() + list(FAMILIES)
    for p in phrases:
        if not _PHRASE.fullmatch(p):
            problems.append(f"{p!r} is not lowercase words over [a-z0-9]")
        words = p.split()
        for w in RESERVED_WORDS:
            if w in words:
                problems.append(f"{p!r} uses the reserved word {w!r}")
    for f in all_findings():
        if f in names:
            problems.append(f"finding {f!r} is also a condition name")
        for n in names:
            if f" {n} " in f" {f} ":
                problems.append(f"finding {f!r} contains the condition name {n!r}")
    for fam in FAMILIES.values():
        nonspecific = set(fam.nonspecific)
        for c in fam.conditions:
            if not c.key:
                problems.append(f"{c.name}: no key finding")
            if len(set(c.findings)) != len(c.findings):
                problems.append(f"{c.name}: a finding is listed twice")
            if set(c.findings) & nonspecific:
                problems.append(f"{c.name}: shares {set(c.findings) & nonspecific} with the family")
            lo, hi = c.ages
            if not 0 < lo <= hi <= 100:
                problems.append(f"{c.name}: bad age range {c.ages}")
            if c.sex not in (None, *SEXES):
                problems.append(f"{c.name}: bad sex {c.sex!r}")
            for other in fam.conditions:
                if other is not c and set(c.key) & set(other.findings):
                    shared = set(c.key) & set(other.findings)
                    problems.append(f"{c.name}: key findings {shared} also belong to {other.name}")
    return problems
