"""Object phrases from an MLLM's list: the queries Grounding DINO gets for real answers and for garbage."""

from __future__ import annotations

import pytest

from spasem.vlm.phrases import parse_objects

# (what an MLLM answers to "list the objects as short noun phrases", the queries the detector should get)
TABLE = [
    # plain comma lists, as LLaVA-1.5 usually answers
    ("Man, bicycle, street, dog, tree", ["man", "bicycle", "street", "dog", "tree"]),
    ("A tall building, a small red car, the street", ["tall building", "small red car", "street"]),
    ("apple; banana; orange", ["apple", "banana", "orange"]),
    # numbered, bulleted and one-per-line lists
    ("1. A tall building\n2. A small red car\n3. Street lamp", ["tall building", "small red car", "street lamp"]),
    ("- dog\n- frisbee\n- green grass", ["dog", "frisbee", "green grass"]),
    ("\u2022 laptop \u2022 coffee mug \u2022 notebook", ["laptop", "coffee mug", "notebook"]),
    ("Sure! 1) cat 2) sofa 3) pillow", ["cat", "sofa", "pillow"]),
    ("* Lighthouse\n* Rocks\n* Ocean waves\n* Seagull", ["lighthouse", "rocks", "ocean waves", "seagull"]),
    ("Objects:\nmountain\nlake\npine trees\n", ["mountain", "lake", "pine trees"]),
    # a sentence instead of a list
    ("The image shows a man, a dog and a red car.", ["man", "dog", "red car"]),
    ("There are several people, a fire hydrant and a traffic light.", ["people", "fire hydrant", "traffic light"]),
    ("In this image, I can see a cat and a laptop on a desk.", ["cat", "laptop"]),
    ("Here are the objects in the image: a wedding ring, a bouquet of flowers, a white dress.",
     ["wedding ring", "bouquet of flowers", "white dress"]),
    # -ing nouns are nouns
    ("painting, ceiling, building, wedding ring", ["painting", "ceiling", "building", "wedding ring"]),
    ("a clothing rack, a sewing machine, a railing", ["clothing rack", "sewing machine", "railing"]),
    ("a wedding cake, an evening gown, a ceiling fan", ["wedding cake", "evening gown", "ceiling fan"]),
    # compound nouns stay whole
    ("a fire hydrant, a traffic light, a stop sign, a parking meter",
     ["fire hydrant", "traffic light", "stop sign", "parking meter"]),
    ("tennis racket, baseball bat, soccer ball", ["tennis racket", "baseball bat", "soccer ball"]),
    # hyphenated words
    ("a white T-shirt, blue jeans, a pair of flip-flops", ["white t-shirt", "blue jeans", "flip-flops"]),
    ("a double-decker bus, a street-light", ["double-decker bus", "street-light"]),
    ("a close-up of a sunflower", ["sunflower"]),
    # plurals and counts
    ("two dogs, three cats, 4 chairs", ["dogs", "cats", "chairs"]),
    ("cats, dogs and birds", ["cats", "dogs", "birds"]),
    ("several boats, many seagulls, some buoys", ["boats", "seagulls", "buoys"]),
    # "a pair of", "a group of": the collective names no object
    ("a pair of sneakers, a pair of scissors", ["sneakers", "scissors"]),
    ("a group of people, a flock of birds, a herd of cows", ["people", "birds", "cows"]),
    ("a slice of pizza, a cup of coffee", ["pizza", "cup of coffee"]),
    # colours that belong to a noun
    ("a black and white cat, a red ball", ["black and white cat", "red ball"]),
    ("a yellow taxi, a blue sky, green leaves", ["yellow taxi", "blue sky", "green leaves"]),
    ("a brown leather bag, a silver watch", ["brown leather bag", "silver watch"]),
    # relations after the noun are not part of it
    ("trees (in the background), a bench, a lamp post", ["trees", "bench", "lamp post"]),
    ("a woman in a red dress, a man with a hat", ["woman", "man"]),
    ("a car parked on the street, a blue sky", ["car", "blue sky"]),
    ("a vase on the table, a book next to the vase", ["vase", "book"]),
    ("the children's toys, a teddy bear", ["children's toys", "teddy bear"]),
    # repeats and case
    ("Dog, dog, DOG, a dog, the dog", ["dog"]),
    # no object, or not an answer at all (the tiny random LLaVA)
    ("None", []),
    ("", []),
    ("The image is blurry and it is hard to tell what is in it, sorry about that.", []),
    ("ighbor Sud cinqu ighbor ighbor , , .. 13", []),
    ("1. 2. 3. ..., ;;", []),
]


@pytest.mark.parametrize("answer, expected", TABLE, ids=[a[:40] or "empty" for a, _ in TABLE])
def test_object_phrases_from_realistic_answers(answer, expected):
    assert parse_objects(answer, 8) == expected


def test_cap_order_and_no_separator_inside_a_phrase():
    answer = ", ".join(f"object{i}" for i in range(20))
    assert parse_objects(answer, 8) == [f"object{i}" for i in range(8)]
    assert parse_objects("cat, dog", 0) == []
    # the grounding query joins phrases with " . ": no phrase may carry a dot of its own
    assert all("." not in p for p in parse_objects("St. Mary's church, a u.s. flag, 3.5 m tall tree", 8))


def test_garbage_of_any_kind_gives_a_short_clean_list():
    garbage = "\u0105\u017c\u00e9 \u2581zw ##ing </s> <unk> 12 ,,, ;; \n\n - * 1) ??? \u00bf"
    phrases = parse_objects(garbage * 5, 8)
    assert len(phrases) <= 8 and all(p == p.lower() and p.strip() == p and p for p in phrases)
    assert len(phrases) == len(set(phrases))
