"""The embedded demo's synthetic benchmark: a multi-parallel world in the FLORES-101 layout.

No FLORES text or pretrained MT weights can be downloaded for the demo, so it builds its own. Sentences are semantic
frames (subject, verb, object, adjectives, place, tense, number) sampled from a seeded grammar; every language
renders a frame with its own lexicon, word order, adjective placement, adpositions, articles and inflection.
Languages come in families: members share a proto-lexicon and grammar and differ by regular sound changes and a few
fresh stems, so the Occitan-like very-low-resource language is close to two high-resource ones, as Occitan is to
French and Italian (§6.4).

Output (`make_benchmark`):
    <root>/dev/<code>.dev          997 lines   (FLORES-101 dev, paper §5: the fine-tuning data)
    <root>/devtest/<code>.devtest  1012 lines  (FLORES-101 devtest, the test data)
    <root>/bitext/<a>-<b>.<a>, <root>/bitext/<a>-<b>.<b>   line-aligned pretraining bitext (a < b in table order)
    <root>/languages.tsv           the demo language table (same columns as config/languages.tsv)
Line i of every dev/devtest file is the same frame in every language (multi-parallel).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from lslo.errors import LsloError
from lslo.io import atomic_write, write_tsv

DEV_LINES, DEVTEST_LINES = 997, 1012  # FLORES-101 split sizes
N_NOUNS, N_VERBS, N_ADJS, N_ADPS = 24, 12, 8, 3  # 47 concepts: learnable by a tiny model in minutes on a CPU
STEM_SYLLABLES = (1, 2)  # short stems: most word forms are one or two SentencePiece pieces
# Clause orders and how often a family takes them: mostly SVO, so alignments are mostly monotone and a small model
# learns them early; SOV and VSO families keep reordering in the world (as ja/ko vs en in lang12).
ORDER_WEIGHTS = {"SVO": 0.6, "SOV": 0.25, "VSO": 0.15}
TENSES = ("past", "pres", "fut")
NUMBERS = ("sg", "pl")

# Pretraining pairs with the pivot per resource group (H >> M >> L >> V, as bitext with English in Table 5/6).
PIVOT_PAIRS = {"H": 20000, "M": 2500, "L": 800, "V": 200}
# "A little" non-pivot bitext between two non-pivot languages, by group pair (M2M-124 saw some non-English data).
NON_PIVOT_PAIRS = {("H", "H"): 3000, ("H", "M"): 200, ("M", "M"): 150}

# The demo world mirrors lang30 (Table 6); the first 12 rows mirror lang12 (Table 5) in shape:
# code, name, resource, family, script, paper language it stands in for.
LANGUAGES = [
    ("h1", "Westlandic", "H", "Westic", "Latn", "en"),  # the pivot
    ("h2", "Sudoran", "H", "Southic", "Latn", "fr"),
    ("h3", "Nordwestic", "H", "Westic", "Latn", "de"),
    ("h4", "Tirrenic", "H", "Southic", "Latn", "it"),
    ("m1", "Huanic", "M", "Eastic", "Grek", "zh"),
    ("m2", "Lowlandic", "M", "Westic", "Latn", "nl"),
    ("m3", "Isleic", "M", "Islandic", "Cyrl", "ja"),
    ("m4", "Penic", "M", "Peninsic", "Armn", "ko"),
    ("v1", "Montanic", "V", "Southic", "Latn", "oc"),  # the Occitan-like language: close to h2 and h4
    ("v2", "Riveric", "V", "Riveric", "Geor", "or"),
    ("v3", "Deltic", "V", "Riveric", "Cyrl", "sd"),
    ("v4", "Coastic", "V", "Coastal", "Latn", "wo"),
    ("h5", "Atlantic", "H", "Southic", "Latn", "pt"),
    ("h6", "Steppic", "H", "Plainic", "Cyrl", "ru"),
    ("h7", "Meseric", "H", "Southic", "Latn", "es"),
    ("m5", "Sandic", "M", "Desertic", "Armn", "ar"),
    ("m6", "Fjordic", "M", "Westic", "Latn", "no"),
    ("m7", "Oasic", "M", "Desertic", "Grek", "he"),
    ("m8", "Gangic", "M", "Riveric", "Geor", "hi"),
    ("m9", "Maltic", "M", "Desertic", "Latn", "mt"),
    ("l1", "Kapic", "L", "Westic", "Latn", "af"),
    ("l2", "Ambic", "L", "Desertic", "Geor", "am"),
    ("l3", "Araric", "L", "Highlandic", "Armn", "hy"),
    ("l4", "Sahelic", "L", "Desertic", "Latn", "ha"),
    ("l5", "Lakic", "L", "Savannic", "Latn", "ny"),
    ("l6", "Shonic", "L", "Savannic", "Latn", "sn"),
    ("l7", "Forestic", "L", "Coastal", "Latn", "yo"),
    ("l8", "Zulic", "L", "Savannic", "Latn", "zu"),
    ("v5", "Fulic", "V", "Coastal", "Latn", "ff"),
    ("v6", "Kambic", "V", "Savannic", "Latn", "kam"),
]
PIVOT = "h1"
PIVOT_FAMILY = next(row[3] for row in LANGUAGES if row[0] == PIVOT)
MAX_LANGUAGES = len(LANGUAGES)

# Scripts are letter-for-letter maps of a..z onto a Unicode block, so unrelated scripts share no characters.
SCRIPT_BASE = {"Latn": ord("a"), "Grek": 0x3B1, "Cyrl": 0x430, "Geor": 0x10D0, "Armn": 0x561}


@dataclass(frozen=True)
class Frame:
    """One meaning: the interlingua every language renders."""

    subj: int
    subj_num: str
    subj_adj: int | None
    verb: int
    tense: str
    obj: int | None
    obj_num: str
    obj_adj: int | None
    adp: int | None
    place: int | None


@dataclass
class Grammar:
    """How one language turns a frame into words. Affixes attach to stems; `None` particles are omitted."""

    order: str  # "SVO" | "SOV" | "VSO"
    adj_after: bool
    postpositions: bool
    articles: dict[str, str | None]  # number -> article word (None: no articles)
    plural: str  # noun plural suffix ("" when plural is a separate particle)
    plural_particle: str | None
    adj_agrees: bool  # adjectives take the plural suffix
    obj_case: str  # suffix marking the object
    verb_suffix: dict[tuple[str, str], str]  # (tense, subject number) -> suffix
    tense_particle: dict[str, str | None]  # tense -> particle before the verb (isolating languages)


@dataclass
class Language:
    code: str
    name: str
    resource: str
    family: str
    script: str
    stands_for: str
    grammar: Grammar
    lexicon: dict[str, list[str]] = field(default_factory=dict)  # "noun"/"verb"/"adj"/"adp" -> stems


def _rng(seed: int, *parts: object) -> random.Random:
    """An independent, reproducible stream per purpose (str seeds are hashed with SHA-512 by `random`)."""
    return random.Random(":".join(map(str, (seed,) + parts)))


def _phonology(rng: random.Random) -> tuple[list[str], list[str]]:
    consonants = rng.sample(list("bcdfghjklmnpqrstvwxz"), rng.randint(9, 13))
    vowels = rng.sample(list("aeiouy"), rng.randint(3, 5))
    return consonants, vowels


def _word(rng: random.Random, phon: tuple[list[str], list[str]], syllables: int) -> str:
    consonants, vowels = phon
    out = []
    for _ in range(syllables):
        out.append(rng.choice(consonants) + rng.choice(vowels))
        if rng.random() < 0.25:
            out.append(rng.choice(consonants))
    return "".join(out)


def _unique_words(rng, phon, n: int, syllables: tuple[int, int], taken: set[str]) -> list[str]:
    words = []
    while len(words) < n:
        w = _word(rng, phon, rng.randint(*syllables))
        if w not in taken:
            taken.add(w)
            words.append(w)
    return words


def _proto_lexicon(rng: random.Random, phon) -> dict[str, list[str]]:
    taken: set[str] = set()
    return {
        "noun": _unique_words(rng, phon, N_NOUNS, STEM_SYLLABLES, taken),
        "verb": _unique_words(rng, phon, N_VERBS, STEM_SYLLABLES, taken),
        "adj": _unique_words(rng, phon, N_ADJS, STEM_SYLLABLES, taken),
        "adp": _unique_words(rng, phon, N_ADPS, (1, 1), taken),
        "function": _unique_words(rng, phon, 8, (1, 1), taken),  # articles and particles
    }


def _proto_grammar(rng: random.Random, func: list[str], phon, isolating: bool, order: str | None = None) -> Grammar:
    drawn = rng.choices(list(ORDER_WEIGHTS), weights=list(ORDER_WEIGHTS.values()))[0]
    order = order or drawn
    suffix = lambda: _word(rng, phon, 1)  # noqa: E731 - a one-syllable affix
    fusional = (not isolating) and rng.random() < 0.5
    tense_sfx = {t: suffix() for t in TENSES}
    num_sfx = {"sg": "", "pl": suffix()}
    verb_suffix = {
        (t, n): (suffix() if fusional else ("" if isolating else tense_sfx[t] + num_sfx[n]))
        for t in TENSES
        for n in NUMBERS
    }
    has_articles = (not isolating) and rng.random() < 0.6
    return Grammar(
        order=order,
        adj_after=rng.random() < 0.5,
        postpositions=order == "SOV" or rng.random() < 0.2,
        articles={"sg": func[0], "pl": func[1] if fusional else func[0]} if has_articles else {"sg": None, "pl": None},
        plural="" if isolating else suffix(),
        plural_particle=func[2] if isolating else None,
        adj_agrees=fusional,
        obj_case=suffix() if (order == "SOV" and not isolating) else "",
        verb_suffix=verb_suffix,
        tense_particle={"past": func[3], "pres": None, "fut": func[4]} if isolating else dict.fromkeys(TENSES),
    )


def _sound_change(rng: random.Random, phon) -> dict[str, str]:
    """Regular sound changes of one daughter language: one word-initial consonant shift, one word-final vowel shift.

    Sparse on purpose: related languages keep many identical word types, as Occitan does with Catalan or Italian.
    """
    consonants, vowels = phon
    initial = rng.choice(consonants)
    final = rng.choice(vowels)
    return {"initial": initial, "initial_to": rng.choice([c for c in consonants if c != initial]),
            "final": final, "final_to": rng.choice([v for v in vowels if v != final] or ["e"])}


def _apply(change: dict[str, str], word: str) -> str:
    if word.startswith(change["initial"]):
        word = change["initial_to"] + word[1:]
    if word.endswith(change["final"]):
        word = word[:-1] + change["final_to"]
    return word


def _daughter(rng, proto_lex, proto_gram: Grammar, phon) -> tuple[dict[str, list[str]], Grammar]:
    """A family member: proto stems under regular sound changes, ~12% fresh stems, the family's morphology
    (affixes, articles, particles) unchanged, adjective placement flipped with probability 0.2."""
    change = _sound_change(rng, phon)
    lexicon = {}
    for pos, stems in proto_lex.items():
        lexicon[pos] = [
            _word(rng, phon, 2) if (pos != "function" and rng.random() < 0.12) else _apply(change, s)
            for s in stems
        ]
    g = proto_gram
    grammar = Grammar(**{**g.__dict__, "adj_after": g.adj_after if rng.random() < 0.8 else not g.adj_after})
    return lexicon, grammar


def build_languages(n_languages: int = 12, seed: int = 1) -> list[Language]:
    """The first `n_languages` demo languages (12 = lang12's shape 4 H / 4 M / 4 V; up to 30 = lang30's)."""
    if not 12 <= n_languages <= MAX_LANGUAGES:
        raise LsloError(f"demo benchmark: n_languages={n_languages}; expected 12..{MAX_LANGUAGES}")
    families = {}
    for fam in sorted({row[3] for row in LANGUAGES}):
        rng = _rng(seed, "family", fam)
        phon = _phonology(rng)
        lex = _proto_lexicon(rng, phon)
        # the pivot's family is SVO, as English is
        order = "SVO" if fam == PIVOT_FAMILY else None
        families[fam] = (phon, lex, _proto_grammar(rng, lex["function"], phon, isolating=fam == "Eastic", order=order))
    languages = []
    for code, name, resource, fam, script, stands_for in LANGUAGES[:n_languages]:
        phon, proto_lex, proto_gram = families[fam]
        lexicon, grammar = _daughter(_rng(seed, "language", code), proto_lex, proto_gram, phon)
        languages.append(Language(code, name, resource, fam, script, stands_for, grammar, lexicon))
    return languages


def sample_frames(rng: random.Random, n: int, exclude: set[Frame] = frozenset()) -> list[Frame]:
    """`n` distinct frames not in `exclude`, from the demo's sentence grammar."""
    frames: list[Frame] = []
    seen = set(exclude)
    pick = lambda p, k: rng.randrange(k) if rng.random() < p else None  # noqa: E731
    while len(frames) < n:
        has_obj = rng.random() < 0.7  # short sentences (about 3-9 words)
        has_place = rng.random() < 0.25
        f = Frame(
            subj=rng.randrange(N_NOUNS),
            subj_num=rng.choice(NUMBERS),
            subj_adj=pick(0.3, N_ADJS),
            verb=rng.randrange(N_VERBS),
            tense=rng.choice(TENSES),
            obj=rng.randrange(N_NOUNS) if has_obj else None,
            obj_num=rng.choice(NUMBERS) if has_obj else "sg",
            obj_adj=pick(0.25, N_ADJS) if has_obj else None,
            adp=rng.randrange(N_ADPS) if has_place else None,
            place=rng.randrange(N_NOUNS) if has_place else None,
        )
        if f not in seen:
            seen.add(f)
            frames.append(f)
    return frames


def _noun_phrase(lang: Language, noun: int, num: str, adj: int | None, case: str = "") -> list[str]:
    g, lex = lang.grammar, lang.lexicon
    plural = g.plural if num == "pl" else ""
    words = [lex["noun"][noun] + plural + case]
    if num == "pl" and g.plural_particle:
        words.insert(0, g.plural_particle)
    if adj is not None:
        adjective = lex["adj"][adj] + (plural if g.adj_agrees else "")
        words = words + [adjective] if g.adj_after else [adjective] + words
    article = g.articles[num]
    return ([article] if article else []) + words


def render(lang: Language, f: Frame) -> str:
    """The sentence for frame `f` in `lang`, in its script."""
    g = lang.grammar
    subj = _noun_phrase(lang, f.subj, f.subj_num, f.subj_adj)
    verb = [lang.lexicon["verb"][f.verb] + g.verb_suffix[(f.tense, f.subj_num)]]
    if g.tense_particle[f.tense]:
        verb.insert(0, g.tense_particle[f.tense])
    obj = _noun_phrase(lang, f.obj, f.obj_num, f.obj_adj, g.obj_case) if f.obj is not None else []
    place = []
    if f.place is not None:
        adp, noun = lang.lexicon["adp"][f.adp], _noun_phrase(lang, f.place, "sg", None)
        place = noun + [adp] if g.postpositions else [adp] + noun
    if g.order == "SVO":
        words = subj + verb + obj + place
    elif g.order == "SOV":
        words = subj + place + obj + verb
    else:  # VSO
        words = verb + subj + obj + place
    text = " ".join(words)
    base = SCRIPT_BASE[lang.script]
    return text.translate({ord(c): base + ord(c) - ord("a") for c in "abcdefghijklmnopqrstuvwxyz"})


def bitext_plan(languages: list[Language], scale: float = 1.0) -> dict[tuple[str, str], int]:
    """(a, b) -> number of pretraining pairs; a precedes b in table order, the pivot comes first.

    `scale` multiplies every size (at least 2 pairs each) for quick test runs; the ratios stay H >> M >> V.
    """
    size = lambda n: max(2, round(n * scale))  # noqa: E731
    plan = {(PIVOT, lang.code): size(PIVOT_PAIRS[lang.resource]) for lang in languages if lang.code != PIVOT}
    others = [lang for lang in languages if lang.code != PIVOT]
    for i, a in enumerate(others):
        for b in others[i + 1 :]:
            n = NON_PIVOT_PAIRS.get((a.resource, b.resource)) or NON_PIVOT_PAIRS.get((b.resource, a.resource))
            if n:
                plan[(a.code, b.code)] = size(n)
    return plan


def language_table(languages: list[Language], plan: dict[tuple[str, str], int]) -> pd.DataFrame:
    """The demo language table, in config/languages.tsv's columns; `bitext` = pairs with the pivot."""
    rows = []
    for i, lang in enumerate(languages):
        subsets = ["demo12"] if i < 12 else []
        if len(languages) > 12:
            subsets.append(f"demo{len(languages)}")
        rows.append(
            {
                "code": lang.code,
                "name": lang.name,
                "flores101": lang.code,  # file stem in the FLORES-101 layout
                "flores200": f"{lang.code}_{lang.script}",
                "resource": lang.resource,
                "family": lang.family,
                "bitext": "" if lang.code == PIVOT else plan[(PIVOT, lang.code)],
                "subsets": ",".join(subsets),
            }
        )
    return pd.DataFrame(rows)


def make_benchmark(out_dir: str | Path, n_languages: int = 12, seed: int = 1, bitext_scale: float = 1.0) -> Path:
    """Write the demo benchmark (FLORES-101 layout, bitext, language table) to `out_dir`; deterministic in `seed`.

    bitext_scale shrinks the pretraining bitext for quick runs (tests, smoke runs); dev/devtest are unchanged.
    The directory appears complete or not at all; an existing one is replaced.
    """
    if not bitext_scale > 0:
        raise LsloError(f"demo benchmark: bitext_scale={bitext_scale}; expected a positive number")
    languages = build_languages(n_languages, seed)
    eval_frames = sample_frames(_rng(seed, "flores"), DEV_LINES + DEVTEST_LINES)
    splits = {"dev": eval_frames[:DEV_LINES], "devtest": eval_frames[DEV_LINES:]}
    plan = bitext_plan(languages, bitext_scale)
    by_code = {lang.code: lang for lang in languages}
    with atomic_write(out_dir, is_dir=True) as root:
        for split, frames in splits.items():
            (root / split).mkdir()
            for lang in languages:
                lines = [render(lang, f) for f in frames]
                (root / split / f"{lang.code}.{split}").write_text("\n".join(lines) + "\n", encoding="utf-8")
        (root / "bitext").mkdir()
        for (a, b), n in plan.items():
            frames = sample_frames(_rng(seed, "bitext", a, b), n, exclude=set(eval_frames))
            for code in (a, b):
                lines = [render(by_code[code], f) for f in frames]
                (root / "bitext" / f"{a}-{b}.{code}").write_text("\n".join(lines) + "\n", encoding="utf-8")
        write_tsv(language_table(languages, plan), root / "languages.tsv")
    return Path(out_dir)


def read_bitext(root: str | Path) -> dict[tuple[str, str], tuple[list[str], list[str]]]:
    """(a, b) -> (lines in a, lines in b) for every bitext pair under `<root>/bitext/`."""
    pairs = {}
    for path in sorted(Path(root, "bitext").glob("*-*.*")):
        a, b = path.name.split(".")[0].split("-")
        if path.suffix[1:] != a:
            continue
        src = path.read_text(encoding="utf-8").splitlines()
        tgt = path.with_suffix(f".{b}").read_text(encoding="utf-8").splitlines()
        if len(src) != len(tgt):
            raise LsloError(f"{path}: {len(src)} lines but {path.with_suffix('.' + b)} has {len(tgt)}")
        pairs[(a, b)] = (src, tgt)
    if not pairs:
        raise LsloError(f"{root}/bitext: no bitext files <a>-<b>.<a> found; run make_benchmark first")
    return pairs
