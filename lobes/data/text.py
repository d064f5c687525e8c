"""Random English sentences from a small grammar over a vocabulary of common words.

Sentences are built from templates (subject, verb, object, place, time...) whose slots are filled with
random words, so a corpus of a few thousand utterances covers several hundred distinct words in many
combinations. Output is upper case without punctuation, like LibriSpeech transcripts.

Example
-------
>>> import numpy as np
>>> sentence = random_sentence(np.random.default_rng(0))
>>> sentence == sentence.upper() and len(sentence.split()) >= 3
True
"""

from __future__ import annotations

import numpy as np

__all__ = ["HELD_OUT_WORDS", "VOCABULARY", "random_sentence", "random_sentences", "with_new_words"]

# Word classes (lower case; the grammar upper-cases the result).
_NAMES = (
    "john mary peter susan david emma james anna robert lucy thomas sarah paul laura mark helen "
    "george alice henry kate"
).split()
_PEOPLE = (
    "man woman boy girl child teacher doctor farmer driver baker student friend father mother "
    "brother sister king queen soldier captain neighbor artist singer worker nurse pilot"
).split()
_ANIMALS = "dog cat horse bird fish cow sheep rabbit mouse lion bear fox duck goat pig wolf".split()
_THINGS = (
    "book letter table chair door window box bag cup glass bottle plate knife key ball hat coat "
    "shoe bread apple cake milk water coffee paper picture phone watch clock lamp bed car boat "
    "train bus bicycle ticket map flower tree stone rope basket radio song story message gift "
    "ring wheel bell candle blanket pencil camera ladder bucket"
).split()
_PLACES = (
    "house garden kitchen school market river forest city village station office church "
    "hospital library park beach bridge hill field road street shop farm castle island valley "
    "lake harbor museum theater"
).split()
_ADJECTIVES = (
    "big small old young new good bad happy sad red blue green yellow black white brown long "
    "short tall little heavy light warm cold hot quiet loud dark bright clean dirty empty full "
    "strong soft hard fast slow rich poor kind busy tired hungry famous strange simple early "
    "late wet dry sweet beautiful careful"
).split()
_COLORS = "red blue green yellow black white brown gray orange purple pink golden".split()
# (base, third person, past) forms of transitive verbs.
_TRANSITIVE = [
    ("see", "sees", "saw"), ("take", "takes", "took"), ("find", "finds", "found"),
    ("bring", "brings", "brought"), ("carry", "carries", "carried"), ("open", "opens", "opened"),
    ("close", "closes", "closed"), ("watch", "watches", "watched"), ("want", "wants", "wanted"),
    ("need", "needs", "needed"), ("like", "likes", "liked"), ("love", "loves", "loved"),
    ("buy", "buys", "bought"), ("sell", "sells", "sold"), ("paint", "paints", "painted"),
    ("clean", "cleans", "cleaned"), ("push", "pushes", "pushed"), ("pull", "pulls", "pulled"),
    ("hold", "holds", "held"), ("lose", "loses", "lost"), ("keep", "keeps", "kept"),
    ("leave", "leaves", "left"), ("send", "sends", "sent"), ("show", "shows", "showed"),
    ("follow", "follows", "followed"), ("help", "helps", "helped"), ("call", "calls", "called"),
    ("visit", "visits", "visited"), ("move", "moves", "moved"), ("fix", "fixes", "fixed"),
    ("break", "breaks", "broke"), ("build", "builds", "built"), ("cook", "cooks", "cooked"),
    ("draw", "draws", "drew"), ("catch", "catches", "caught"), ("throw", "throws", "threw"),
    ("wash", "washes", "washed"), ("fill", "fills", "filled"), ("check", "checks", "checked"),
    ("count", "counts", "counted"), ("remember", "remembers", "remembered"),
    ("forget", "forgets", "forgot"), ("hide", "hides", "hid"), ("cut", "cuts", "cut"),
    ("drop", "drops", "dropped"), ("pick", "picks", "picked"), ("wear", "wears", "wore"),
    ("read", "reads", "read"), ("write", "writes", "wrote"), ("ask", "asks", "asked"),
]
# (base, third person, past) forms of intransitive verbs.
_INTRANSITIVE = [
    ("walk", "walks", "walked"), ("run", "runs", "ran"), ("sleep", "sleeps", "slept"),
    ("sing", "sings", "sang"), ("dance", "dances", "danced"), ("wait", "waits", "waited"),
    ("work", "works", "worked"), ("play", "plays", "played"), ("laugh", "laughs", "laughed"),
    ("cry", "cries", "cried"), ("swim", "swims", "swam"), ("jump", "jumps", "jumped"),
    ("sit", "sits", "sat"), ("stand", "stands", "stood"), ("arrive", "arrives", "arrived"),
    ("travel", "travels", "traveled"), ("rest", "rests", "rested"), ("smile", "smiles", "smiled"),
    ("listen", "listens", "listened"), ("talk", "talks", "talked"), ("stay", "stays", "stayed"),
    ("climb", "climbs", "climbed"), ("fall", "falls", "fell"), ("shout", "shouts", "shouted"),
]
_ADVERBS = (
    "quickly slowly quietly loudly carefully happily sadly easily suddenly often always never "
    "again together alone early late soon today tomorrow yesterday"
).split()
_TIMES = [
    "in the morning", "in the evening", "at night", "last week", "next week", "every day",
    "on monday", "on tuesday", "on wednesday", "on thursday", "on friday", "on saturday",
    "on sunday", "before dinner", "after lunch", "this summer", "last winter", "in spring",
    "in the autumn", "at noon",
]
_PREPOSITIONS = "in near behind under over beside inside outside across through".split()
_COUNTABLE = [t for t in _THINGS if t not in ("bread", "milk", "water", "coffee", "paper")]
_IRREGULAR_PLURALS = {"knife": "knives"}
_NUMBERS = "two three four five six seven eight nine ten eleven twelve twenty".split()
_QUESTION_WORDS = "where when why how".split()
_FEELINGS = "happy sad tired hungry angry afraid ready sorry glad busy".split()

# Nouns the grammar never produces: a sentence of the "new words" test slice has some of the nouns of a
# grammar sentence replaced by these (same word class), so it holds words that no training transcript has.
_NEW_NOUNS = {
    "names": "oliver victor grace daniel sophie martin natalie oscar rachel simon".split(),
    "animals": "tiger zebra monkey snake eagle donkey spider turtle camel parrot".split(),
    "things": "umbrella guitar pillow jacket hammer mirror wallet spoon towel necklace envelope telescope "
    "piano kettle sandwich bracelet".split(),
    "places": "airport desert bakery stadium cathedral garage cinema factory palace tunnel".split(),
}


def _plural(noun: str) -> str:
    if noun in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[noun]
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    return noun + "s"


def _pick(rng: np.random.Generator, words) -> str:
    return words[int(rng.integers(len(words)))]


def _noun_phrase(rng: np.random.Generator) -> str:
    kind = rng.random()
    if kind < 0.2:
        return _pick(rng, _NAMES)
    noun = _pick(rng, _PEOPLE if kind < 0.55 else _ANIMALS)
    det = _pick(rng, ("the", "the", "a", "my", "your", "our", "that", "this"))
    if det == "a" and noun[0] in "aeiou":
        det = "an"
    if rng.random() < 0.4:
        adjective = _pick(rng, _ADJECTIVES)
        if det in ("a", "an"):
            det = "an" if adjective[0] in "aeiou" else "a"
        return f"{det} {adjective} {noun}"
    return f"{det} {noun}"


def _object_phrase(rng: np.random.Generator) -> str:
    roll = rng.random()
    if roll < 0.15:
        return f"{_pick(rng, _NUMBERS)} {_plural(_pick(rng, _COUNTABLE))}"
    noun = _pick(rng, _THINGS)
    det = _pick(rng, ("the", "the", "a", "his", "her", "their", "some", "every"))
    adjective = _pick(rng, _ADJECTIVES + _COLORS) if rng.random() < 0.5 else None
    first = adjective or noun
    if det == "a" and first[0] in "aeiou":
        det = "an"
    return f"{det} {adjective} {noun}" if adjective else f"{det} {noun}"


def _place_phrase(rng: np.random.Generator) -> str:
    return f"{_pick(rng, _PREPOSITIONS)} the {_pick(rng, _PLACES)}"


def _template(rng: np.random.Generator) -> str:
    t = int(rng.integers(10))
    if t == 0:  # the old man saw a red box near the river
        return f"{_noun_phrase(rng)} {_pick(rng, _TRANSITIVE)[2]} {_object_phrase(rng)} {_place_phrase(rng)}"
    if t == 1:  # mary carries the cup every day
        return f"{_noun_phrase(rng)} {_pick(rng, _TRANSITIVE)[1]} {_object_phrase(rng)} {_pick(rng, _TIMES)}"
    if t == 2:  # the dog walked slowly behind the house
        return (
            f"{_noun_phrase(rng)} {_pick(rng, _INTRANSITIVE)[2]} {_pick(rng, _ADVERBS)} "
            f"{_place_phrase(rng)}"
        )
    if t == 3:  # please bring the green bottle to the kitchen
        return f"please {_pick(rng, _TRANSITIVE)[0]} {_object_phrase(rng)} to the {_pick(rng, _PLACES)}"
    if t == 4:  # where did you find the key
        question, subject = _pick(rng, _QUESTION_WORDS), _noun_phrase(rng)
        return f"{question} did {subject} {_pick(rng, _TRANSITIVE)[0]} {_object_phrase(rng)}"
    if t == 5:  # we will visit the museum tomorrow
        subject = _pick(rng, ("we", "they", "you", "i", "she", "he"))
        return f"{subject} will {_pick(rng, _TRANSITIVE)[0]} {_object_phrase(rng)} {_pick(rng, _TIMES)}"
    if t == 6:  # there are five apples in the basket
        return f"there are {_pick(rng, _NUMBERS)} {_plural(_pick(rng, _COUNTABLE))} {_place_phrase(rng)}"
    if t == 7:  # the teacher was tired after lunch
        return f"{_noun_phrase(rng)} was {_pick(rng, _FEELINGS)} {_pick(rng, _TIMES)}"
    if t == 8:  # john and the cat played together in the garden
        return (
            f"{_noun_phrase(rng)} and {_noun_phrase(rng)} {_pick(rng, _INTRANSITIVE)[2]} "
            f"{_pick(rng, _ADVERBS)}"
        )
    # the small bird likes the warm water because it is sweet
    return (
        f"{_noun_phrase(rng)} {_pick(rng, _TRANSITIVE)[1]} {_object_phrase(rng)} because it is "
        f"{_pick(rng, _ADJECTIVES)}"
    )


def _vocabulary() -> list[str]:
    words = set()
    for group in (_NAMES, _PEOPLE, _ANIMALS, _THINGS, _PLACES, _ADJECTIVES, _COLORS, _ADVERBS,
                  _PREPOSITIONS, _NUMBERS, _QUESTION_WORDS, _FEELINGS):
        words.update(group)
    for forms in _TRANSITIVE + _INTRANSITIVE:
        words.update(forms)
    for phrase in _TIMES:
        words.update(phrase.split())
    words.update(_plural(thing) for thing in _COUNTABLE)
    words.update("the a an my your our that this his her their some every please to did we they you i "
                 "she he will there are was and because it is".split())
    return sorted(w.upper() for w in words)


VOCABULARY: list[str] = _vocabulary()
"""Every word the grammar can produce (upper case, sorted)."""

HELD_OUT_WORDS: list[str] = sorted(w.upper() for words in _NEW_NOUNS.values() for w in words)
"""Nouns the grammar never produces (upper case, sorted): only :func:`with_new_words` puts them in a sentence."""

if set(HELD_OUT_WORDS) & set(VOCABULARY):
    raise AssertionError(f"held-out words in the grammar: {sorted(set(HELD_OUT_WORDS) & set(VOCABULARY))}")

# The grammar's nouns by class, the classes the held-out nouns replace; a word that is also a verb, an
# adjective or an adverb somewhere ("watch") is never replaced.
_NOT_NOUNS = {w for forms in _TRANSITIVE + _INTRANSITIVE for w in forms} | set(
    _ADJECTIVES + _COLORS + _ADVERBS + _FEELINGS
)
_REPLACEABLE = {
    cls: [w for w in words if w not in _NOT_NOUNS]
    for cls, words in (("names", _NAMES), ("animals", _ANIMALS), ("things", _THINGS), ("places", _PLACES))
}
_CLASS_OF = {w.upper(): cls for cls, words in _REPLACEABLE.items() for w in words}



def random_sentence(rng: np.random.Generator, max_words: int | None = None) -> str:
    """One random upper-case sentence from the grammar.

    Arguments
    ---------
    rng : numpy.random.Generator
        Source of randomness (the sentence is a function of its state).
    max_words : int, optional
        Redraw until the sentence has at most this many words.

    Returns
    -------
    str
        Upper-case words separated by single spaces.

    Example
    -------
    >>> import numpy as np
    >>> len(random_sentence(np.random.default_rng(1), max_words=8).split()) <= 8
    True
    """
    if max_words is not None and max_words < 4:
        raise ValueError(f"max_words must be at least 4 (the shortest template), got {max_words}")
    while True:
        sentence = " ".join(_template(rng).split()).upper()
        if max_words is None or len(sentence.split()) <= max_words:
            return sentence


def random_sentences(num: int, seed: int = 0, max_words: int | None = None) -> list[str]:
    """``num`` random sentences, a function of ``seed``.

    Example
    -------
    >>> random_sentences(3, seed=7) == random_sentences(3, seed=7)
    True
    """
    rng = np.random.default_rng(seed)
    return [random_sentence(rng, max_words) for _ in range(num)]


def with_new_words(rng: np.random.Generator, sentence: str, fraction: float = 0.5) -> str:
    """``sentence`` with some of its nouns replaced by held-out nouns of the same class (at least one).

    Each replaceable noun (name, animal, thing, place) is replaced with probability ``fraction``; when
    none was drawn, one of them is replaced anyway, and a sentence without any replaceable noun is
    returned unchanged (callers redraw). The article before a replaced word is corrected (a / an).

    Example
    -------
    >>> import numpy as np
    >>> new = with_new_words(np.random.default_rng(0), "THE DOG SAW A BOX NEAR THE RIVER")
    >>> any(word in HELD_OUT_WORDS for word in new.split())
    True
    """
    words = sentence.split()
    slots = [i for i, w in enumerate(words) if w in _CLASS_OF]
    if not slots:
        return sentence
    chosen = [i for i in slots if rng.random() < fraction]
    if not chosen:
        chosen = [slots[int(rng.integers(len(slots)))]]
    for i in chosen:
        words[i] = _pick(rng, _NEW_NOUNS[_CLASS_OF[words[i]]]).upper()
        if i > 0 and words[i - 1] in ("A", "AN"):
            words[i - 1] = "AN" if words[i][0] in "AEIOU" else "A"
    return " ".join(words)
