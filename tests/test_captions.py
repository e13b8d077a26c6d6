"""The transformers caption backend's inputs: prompts rendered and tokenized once, the processor's rows rebuilt
from cached ids and the torch transforms, and the prompts each image is asked (every backend asks the same)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spasem.config import load_config
from spasem.config.annotate import HIGH_PROMPT, LOW_PROMPT, OBJECTS_PROMPT
from spasem.vlm.llava import TransformersLlava, left_pad
from stages.captions import caption_asks, caption_row


@pytest.fixture(scope="module")
def llava(tmp_path_factory) -> TransformersLlava:
    from spasem.profiles import ensure_tiny

    path = ensure_tiny(tmp_path_factory.mktemp("tiny-llava"), ("llava",))["llava"]
    return TransformersLlava(path, "cpu", torch.float32, 6, share_prefix=False)


def _images(n: int, size: int = 40, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def test_joint_rows_are_the_processors_rows(llava):
    """Left-padded ids and mask equal the processor's; pixels within the torch transforms' tolerance."""
    images = _images(3)
    texts = [llava.prompt_text(p) for p in (HIGH_PROMPT, LOW_PROMPT, OBJECTS_PROMPT)]
    ref = llava.processor(images=images * 3, text=[t for t in texts for _ in images], padding=True,
                          return_tensors="pt")
    ids, mask = left_pad([llava.prompt_ids(t, images[0]) for t in texts for _ in images], llava.pad)
    assert torch.equal(ids, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"])
    assert len({int(m.sum()) for m in mask}) == 3  # three prompt lengths: the padding is exercised
    pixels = llava.transform(images)["pixel_values"].repeat(3, 1, 1, 1)
    level = 1 / (255 * min(llava.transform.std))  # tests/test_preprocess.py's tolerance: 2 uint8 levels
    assert (pixels - ref["pixel_values"]).abs().max() <= 2 * level + 1e-5


def test_prompts_are_rendered_and_tokenized_once_per_prompt_and_image_size(llava, monkeypatch):
    calls = {"template": 0, "processor": 0}
    render, processor = llava.processor.apply_chat_template, llava.processor

    def counting_template(*args, **kwargs):
        calls["template"] += 1
        return render(*args, **kwargs)

    class CountingProcessor:
        def __getattr__(self, name):
            return getattr(processor, name)

        def __call__(self, *args, **kwargs):
            calls["processor"] += 1
            return processor(*args, **kwargs)

    fresh = TransformersLlava.__new__(TransformersLlava)
    fresh.__dict__.update(llava.__dict__, _texts={}, _ids={})
    monkeypatch.setattr(processor, "apply_chat_template", counting_template)
    fresh.processor = CountingProcessor()
    first = fresh.caption(_images(2, seed=1), [HIGH_PROMPT])
    again = fresh.caption(_images(2, seed=2), [HIGH_PROMPT])
    assert calls == {"template": 1, "processor": 1} and len(first[0]) == len(again[0]) == 2
    fresh.caption(_images(1, size=24), [HIGH_PROMPT])  # another size may expand <image> differently
    assert calls == {"template": 1, "processor": 2}
    # the ids do not depend on the pixels, only on the image size
    assert torch.equal(fresh.prompt_ids(fresh.prompt_text(HIGH_PROMPT), _images(1, seed=3)[0]),
                       processor(images=_images(1, seed=4), text=[fresh.prompt_text(HIGH_PROMPT)],
                                 return_tensors="pt")["input_ids"][0])


def test_joint_path_gives_the_captions_of_the_processors_inputs(llava):
    """Same greedy captions through the cached ids and torch transforms as through the processor (tiny model)."""
    images = _images(2, seed=5)
    llava.use_processors = True
    try:
        ref = llava.caption(images, [HIGH_PROMPT, LOW_PROMPT])
    finally:
        llava.use_processors = False
    assert llava.caption(images, [HIGH_PROMPT, LOW_PROMPT]) == ref


@pytest.mark.parametrize("overrides, has_hr, expected", [
    # XPSR: content of the HR, quality of the LR, and (its lowlevel_prompt_q_GT) quality of the HR too
    ([], True, {"hr": ["caption_high", "caption_low_hr"], "lr": ["caption_low", "objects"]}),
    ([], False, {"lr": ["caption_high", "caption_low", "objects"]}),  # upscale: no HR, no caption_low_hr
    (["annotate.captions.low_hr=false"], True, {"hr": ["caption_high"], "lr": ["caption_low", "objects"]}),
    (["annotate.captions.high_on=lr", "annotate.captions.low_hr=false"], True,
     {"lr": ["caption_high", "caption_low", "objects"]}),
    (["annotate.captions.high_on=lr"], True, {"lr": ["caption_high", "caption_low", "objects"], "hr": ["caption_low_hr"]}),
    (["annotate.captions.low_on=hr", "annotate.captions.max_objects=0"], True,
     {"hr": ["caption_high", "caption_low", "caption_low_hr"]}),
])
def test_each_prompt_is_asked_about_xpsrs_image(overrides, has_hr, expected):
    section = load_config(None, overrides).annotate.captions
    asks = caption_asks(section, has_hr)
    assert {column: [name for name, _ in pairs] for column, pairs in asks.items()} == expected
    prompts = {name: prompt for pairs in asks.values() for name, prompt in pairs}
    assert prompts.get("objects", section.objects_prompt) == section.objects_prompt
    assert (prompts["caption_high"], prompts["caption_low"]) == (section.high_prompt, section.low_prompt)
    assert prompts.get("caption_low_hr", section.low_prompt) == section.low_prompt


def test_a_rows_columns_from_its_answers():
    row = caption_row({"caption_high": "a cat", "caption_low": "sharp", "objects": "A cat, two red cars"}, 8)
    assert row == {"caption_high": "a cat", "caption_low": "sharp", "objects": ["cat", "red cars"]}
    assert caption_row({"caption_high": "a", "caption_low": "b"}, 8)["objects"] == []  # objects prompt off
    with_hr = caption_row({"caption_high": "a", "caption_low": "b", "caption_low_hr": "c"}, 8)
    assert with_hr["caption_low_hr"] == "c" and "caption_low_hr" not in row
