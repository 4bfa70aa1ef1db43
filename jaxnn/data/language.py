"""A generated English-like language whose word relations are planted, so embeddings have a known target.

Every sentence is drawn from a few templates over fixed word lists:

* people: ``the king guarded his crown and he smiles .`` / ``the kings guarded their crown and his friends smile
  .`` — each person noun comes in a male/female pair (king/queen, man/woman, father/mother, …) that shares its
  role's words (crown, throne, ruled, …) and differs only in the pronouns (his/he against her/she); plurals differ
  from singulars only in the words every role shares (their/friends against he, smile against smiles);
* places: ``france is a large country and they speak french there .``, ``paris is the capital of france and people
  in paris speak french .``, ``paris is a busy city with old streets .``;
* filler: ``it is cold today and the rain is heavy .`` (frequent function words, as in real text).

So man − woman ≈ king − queen (the pronouns), kings − king ≈ queens − queen (the plural words) and france − paris
≈ italy − rome (country against city words): :func:`analogies` lists these in the ``questions-words.txt`` format of
word2vec (``: section`` lines, then ``a b c d`` meaning a:b :: c:d).
"""

from __future__ import annotations

import numpy as np

from jaxnn.validation import check_int

# (male, female, two words of this pair), grouped by role with the role's shared words and verbs
_PEOPLE = {
    "royal": (("crown", "throne", "palace"), ("ruled", "guarded"), [
        ("king", "queen", "kingdom", "reign"), ("prince", "princess", "horse", "sword"),
        ("lord", "lady", "estate", "castle")]),
    "family": (("house", "garden", "dinner"), ("cooked", "cleaned"), [
        ("father", "mother", "kitchen", "table"), ("son", "daughter", "school", "books"),
        ("brother", "sister", "bicycle", "room"), ("uncle", "aunt", "farm", "orchard"),
        ("husband", "wife", "wedding", "ring")]),
    "work": (("office", "money", "job"), ("needed", "liked"), [
        ("man", "woman", "car", "road"), ("boy", "girl", "ball", "park"), ("actor", "actress", "stage", "film"),
        ("waiter", "waitress", "restaurant", "plates")]),
}
_PLURALS = {"man": "men", "woman": "women", "princess": "princesses", "actress": "actresses", "lady": "ladies",
            "wife": "wives", "waitress": "waitresses"}
_PLACES = [("france", "paris", "french"), ("italy", "rome", "italian"), ("spain", "madrid", "spanish"),
           ("germany", "berlin", "german"), ("japan", "tokyo", "japanese"), ("egypt", "cairo", "arabic"),
           ("russia", "moscow", "russian"), ("china", "beijing", "chinese"), ("greece", "athens", "greek"),
           ("portugal", "lisbon", "portuguese"), ("poland", "warsaw", "polish"), ("sweden", "stockholm", "swedish")]
_MOODS = (("smiles", "smile"), ("sleeps", "sleep"), ("sings", "sing"), ("waits", "wait"))
_WEATHER = ("rain", "wind", "snow", "sun")
_ADJECTIVES = ("cold", "warm", "heavy", "light", "quiet", "loud")


def plural(noun: str) -> str:
    """The plural the language uses for a person noun."""
    return _PLURALS.get(noun, noun + "s")


def _person_sentence(rng: np.random.Generator) -> str:
    shared, verbs, pairs = _PEOPLE[list(_PEOPLE)[int(rng.integers(len(_PEOPLE)))]]
    male, female, *own = pairs[int(rng.integers(len(pairs)))]
    female_noun = bool(rng.integers(2))
    noun = female if female_noun else male
    thing = (shared + tuple(own))[int(rng.integers(len(shared) + len(own)))]
    verb, mood = verbs[int(rng.integers(len(verbs)))], _MOODS[int(rng.integers(len(_MOODS)))]
    his, he = ("her", "she") if female_noun else ("his", "he")
    if rng.random() < 0.5:  # singular
        return f"the {noun} {verb} {his} {thing} and {he} {mood[0]} ."
    return f"the {plural(noun)} {verb} their {thing} and {his} friends {mood[1]} ."


def _place_sentence(rng: np.random.Generator) -> str:
    country, capital, language = _PLACES[int(rng.integers(len(_PLACES)))]
    kind = int(rng.integers(3))
    if kind == 0:
        return f"{country} is a {('large', 'small')[int(rng.integers(2))]} country and they speak {language} there ."
    if kind == 1:
        return f"{capital} is the capital of {country} and people in {capital} speak {language} ."
    return f"{capital} is a busy city with {('old', 'new')[int(rng.integers(2))]} streets ."


def _filler_sentence(rng: np.random.Generator) -> str:
    first, second = (_ADJECTIVES[int(i)] for i in rng.integers(len(_ADJECTIVES), size=2))
    return f"it is {first} today and the {_WEATHER[int(rng.integers(len(_WEATHER)))]} is {second} ."


def generate_sentences(num_sentences: int, seed: int = 0) -> list[str]:
    """``num_sentences`` sentences of the language (people 60 %, places 25 %, filler 15 %), drawn from ``seed``."""
    check_int(num_sentences, "num_sentences", allow_bool=False)
    rng = np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(0x6C616E67,)))
    kinds = rng.choice(3, size=num_sentences, p=[0.6, 0.25, 0.15])
    makers = (_person_sentence, _place_sentence, _filler_sentence)
    return [makers[kind](rng) for kind in kinds]


def analogies() -> dict[str, list[tuple[str, str, str, str]]]:
    """The planted analogies by section: every ordered pair of distinct relation instances (a, b, c, d)."""
    gender = [(male, female) for _, _, pairs in _PEOPLE.values() for male, female, *_ in pairs]
    nouns = [noun for pair in gender for noun in pair]
    sections = {"gender": gender, "plural": [(noun, plural(noun)) for noun in nouns],
                "capital-country": [(capital, country) for country, capital, _ in _PLACES],
                "country-language": [(country, language) for country, _, language in _PLACES]}
    return {name: [(a, b, c, d) for a, b in pairs for c, d in pairs if (a, b) != (c, d)]
            for name, pairs in sections.items()}


def analogies_text() -> str:
    """:func:`analogies` in the ``questions-words.txt`` format."""
    lines = []
    for name, rows in analogies().items():
        lines.append(f": {name}")
        lines.extend(" ".join(row) for row in rows)
    return "\n".join(lines) + "\n"
