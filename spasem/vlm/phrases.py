"""The objects an MLLM lists, as short noun phrases a detector can be queried with.

The captions stage asks the MLLM a third question (``annotate.captions.objects_prompt``: list the
objects as short noun phrases, separated by commas) and :func:`parse_objects` turns whatever comes
back into a clean list: lists separated by commas, semicolons, newlines, bullets or numbers, or a
sentence ("The image shows a man, a dog and a red car."). The nouns themselves are the model's; this
step only removes list syntax, articles, counts and trailing relations ("a man in a red shirt" ->
"man"), so a compound ("fire hydrant"), an -ing noun ("building", "wedding ring"), a hyphenated word
("t-shirt") or a colour that belongs to the noun ("red car") stays whole. No tagger model: the same
answer always gives the same queries.
"""

from __future__ import annotations

import re

# a reply often opens with a sentence about the list before the list itself
_LEAD_IN = re.compile(
    r"^\s*(?:(?:here (?:is|are)|the (?:main |visible |key )?objects?|objects?|items?|"
    r"(?:in|within) (?:this|the) (?:image|picture|photo)[^:,]*?)[^:\n]*:\s*"
    r"|(?:in (?:this|the) (?:image|picture|photo),?\s*)?(?:the (?:image|picture|photo) (?:shows|contains|features|"
    r"depicts|includes)|there (?:is|are)|i (?:can )?see|we (?:can )?see)\s+)"
)
_INTERJECTION = re.compile(r"^\s*(?:sure|certainly|okay|ok|yes|of course)\b[,!.:]?\s*")
_NUMBERING = re.compile(r"(?:^|\s)(?:\d{1,2}[.)]|[-*\u2022\u00b7\u2013])\s+")
# " and " splits a list ("a man and a dog", "cats, dogs and birds") but not two colours of one
# thing ("a black and white cat")
_COLOURS = {"black", "white", "red", "green", "blue", "yellow", "orange", "purple", "pink", "brown", "gray", "grey",
            "silver", "gold", "golden", "beige", "dark", "light"}
_AND = re.compile(r"(\S*)(,?\s+(?:and|or|plus|as well as)\s+)(\S*)")


def _split_and(match: re.Match) -> str:
    before, after = match.group(1), match.group(3)
    if before in _COLOURS and after in _COLOURS:
        return match.group(0)
    return f"{before}, {after}"


_SPLIT = re.compile(r"[,;\n]|\.(?:\s|$)")
# where a noun phrase ends and its relation to something else begins
_TAIL = re.compile(
    r"\s+(?:in|on|at|near|behind|beside|besides|under|underneath|above|below|with|without|inside|outside|"
    r"against|along|across|over|between|from|by|next to|in front of|on top of|that|which|who|while|is|are|"
    r"being|sitting|standing|lying|holding|wearing|hanging|parked|placed|located)\b.*$"
)
_DETERMINERS = {
    "a", "an", "the", "some", "several", "many", "few", "multiple", "various", "numerous", "other", "another",
    "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "dozen", "dozens", "lots",
    "his", "her", "their", "its", "this", "that", "these", "those", "each", "every", "more", "both",
}
# "a pair of shoes" -> "shoes": the collective word names no object a detector should box
_COLLECTIVES = {"pair", "pairs", "couple", "group", "groups", "bunch", "set", "herd", "flock", "stack", "pile",
                "row", "rows", "piece", "pieces", "slice", "slices", "lot", "number", "variety", "collection",
                "close-up", "closeup", "view", "picture", "photo", "image"}
# answers that name no object
_NOT_OBJECTS = {
    "image", "picture", "photo", "photograph", "scene", "view", "background", "foreground", "object", "objects",
    "item", "items", "none", "nothing", "etc", "others", "other objects", "various objects", "n/a", "unknown",
}
# a phrase opening with one of these is the rest of a sentence ("it is hard to tell"), not a noun
_SENTENCE_WORDS = {"it", "they", "there", "i", "we", "you", "he", "she", "what", "sorry", "unfortunately", "please",
                   "is", "are", "was", "were", "hard", "difficult", "not", "no", "cannot", "can't"}
MAX_WORDS = 4  # longer items are sentences, not noun phrases


def _clean(item: str) -> str:
    item = re.sub(r"\([^)]*\)|\[[^\]]*\]", " ", item)  # "(in the background)"
    item = re.sub(r"[^\w\s'\-/&]", " ", item)  # quotes, colons, stray dots; keep t-shirt, children's
    item = _TAIL.sub("", " " + " ".join(item.split())).strip()
    words = item.split()
    while words:
        if words[0] in _DETERMINERS or words[0].isdigit():
            words = words[1:]
        elif len(words) > 2 and words[0] in _COLLECTIVES and words[1] == "of":
            words = words[2:]
        else:
            break
    return " ".join(w.strip("'-/&") for w in words if w.strip("'-/&"))


def parse_objects(text: str, max_objects: int) -> list[str]:
    """The noun phrases of an MLLM's object list: lower case, first seen first, no repeats, at most ``max_objects``."""
    if max_objects <= 0:
        return []
    text = str(text).lower().replace("\r", "\n")
    text = _LEAD_IN.sub("", _INTERJECTION.sub("", text, count=1), count=1)
    text = _NUMBERING.sub("\n", text)
    text = _AND.sub(_split_and, text)
    phrases: list[str] = []
    for item in _SPLIT.split(text):
        phrase = _clean(item)
        words = phrase.split()
        if (not words or len(words) > MAX_WORDS or phrase in _NOT_OBJECTS or words[0] in _SENTENCE_WORDS
                or not re.search(r"[^\W\d_]", phrase)):
            continue
        if phrase not in phrases:
            phrases.append(phrase)
            if len(phrases) == max_objects:
                break
    return phrases
