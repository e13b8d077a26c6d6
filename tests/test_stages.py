"""The annotation stages in a plain loop on tiny checkpoints loaded by path: columns, rejects, determinism."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from pipeline.annotate_phase import STAGE_ORDER, STAGES, stage_kwargs
from spasem.columns import object_array
from spasem.config import CONFIG_DIR, load_config
from spasem.profiles import model_id, resolve_models, tiny_sd
from spasem.shards import decode_annotations, encode_annotations
from stages.annotations import AnnotationStage
from stages.grounding import nms, phrase_token_spans, select_boxes
from tests.conftest import failing_on_key

HR, LR = 64, 16


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    cache = tmp_path_factory.mktemp("models")
    return load_config(None, [f"models.cache_dir={cache}", "annotate.captions.max_new_tokens=8",
                              "annotate.captions.batch_size=2", "data.hr_size=64", "data.min_size=64"])


@pytest.fixture(scope="module")
def paths(cfg):
    return resolve_models(cfg.models)


def _batch(n: int = 5, hr: bool = True, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    batch = {"key": object_array([f"img{i}" for i in range(n)]), "shard": np.array([0, 0, 0, 1, 1][:n]),
             "lr": rng.integers(0, 256, (n, LR, LR, 3), dtype=np.uint8)}
    if hr:
        batch["hr"] = rng.integers(0, 256, (n, HR, HR, 3), dtype=np.uint8)
    return batch


@pytest.fixture(scope="module")
def stages(cfg, paths):
    return [STAGES[name](**stage_kwargs(cfg, name, paths)) for name in STAGE_ORDER]


def _run(stages, batch):
    for stage in stages:
        batch = stage(batch)
    return batch


@pytest.fixture(scope="module")
def annotated(stages):
    return _run(stages, _batch())


def test_all_stages_add_their_columns_with_design_shapes(annotated):
    out = annotated
    assert list(out["status"]) == ["ok"] * 5
    assert all(isinstance(c, str) and c for c in out["caption_high"]) and all(out["caption_low"])
    for objects, phrases, boxes, scores in zip(out["objects"], out["phrases"], out["boxes"], out["scores"], strict=True):
        assert set(phrases) <= set(objects) and len(phrases) == len(boxes) == len(scores) <= 8
        assert np.asarray(boxes).reshape(-1, 4).min(initial=0) >= 0 and np.asarray(boxes).max(initial=1) <= 1
    tokens = (tiny_sd.ENCODER_IMAGE_SIZE // 8) ** 2 + 1
    assert out["clip_lr"].shape == (5, tokens, tiny_sd.CLIP_VISION_DIM) and out["clip_lr"].dtype == np.float16
    assert out["dino_lr"].shape == (5, tokens, tiny_sd.DINO_DIM)
    assert out["clip_hr"].shape == (5, tiny_sd.CLIP_VISION_DIM) and out["dino_hr"].shape == (5, tiny_sd.DINO_DIM)
    assert out["text"].shape == (5, 2, 77, tiny_sd.TEXT_DIM) and out["text"].dtype == np.float16
    assert out["latent"].shape == (5, 8, HR // 8, HR // 8) and out["latent"].dtype == np.float16
    assert not np.array_equal(out["text"][:, 0], out["text"][:, 1])  # high and low captions differ
    # the HR's quality caption (low_hr) and its states, what training conditions on with the HR
    assert all(out["caption_low_hr"]) and out["text_low_hr"].shape == (5, 77, tiny_sd.TEXT_DIM)
    assert out["text_low_hr"].dtype == np.float16


def test_text_states_are_the_text_encoders_of_each_caption(stages, annotated):
    from spasem.encoders import encode_prompts

    encoder = stages[-1]
    for column, states in (("caption_high", annotated["text"][:, 0]), ("caption_low", annotated["text"][:, 1]),
                           ("caption_low_hr", annotated["text_low_hr"])):
        expected = encode_prompts(encoder.tokenizer, encoder.text_encoder, [str(c) for c in annotated[column]])
        np.testing.assert_allclose(states.astype(np.float32), expected.float().numpy(), atol=2e-3, rtol=2e-3)


def test_same_input_same_annotations(stages, annotated):
    a, b = annotated, _run(stages, _batch())
    for name in ("caption_high", "caption_low", "clip_lr", "dino_hr", "text", "latent"):
        assert np.array_equal(np.stack(list(a[name])) if a[name].dtype == object else a[name],
                              np.stack(list(b[name])) if b[name].dtype == object else b[name]), name


def test_a_row_does_not_depend_on_the_other_shards_in_its_batch(stages, annotated):
    both = annotated
    alone = _run(stages, {k: v[3:] for k, v in _batch().items()})  # shard 1 only, as a resumed run sees it
    assert list(alone["caption_high"]) == list(both["caption_high"][3:])
    assert np.array_equal(alone["latent"], both["latent"][3:]) and np.array_equal(alone["text"], both["text"][3:])


def test_injected_failure_rejects_one_row_and_later_stages_skip_it(cfg, paths, stages):
    from stages.captions import Captioner

    failing = failing_on_key(Captioner, "img1")
    out = _run([failing(**stage_kwargs(cfg, "captions", paths)), stages[3]], _batch())
    assert list(out["status"]) == ["ok", "error", "ok", "ok", "ok"]
    assert out["error"][1].startswith("captions: RuntimeError: injected failure for key img1")
    assert out["caption_high"][1] == "" and out["caption_high"][0]
    assert not out["latent"][1].any() and out["latent"][0].any()  # placeholder, same shape, never computed


def test_without_hr_grounding_uses_the_lr_and_hr_outputs_are_skipped(stages):
    out = _run(stages, _batch(hr=False))
    assert {"clip_hr", "dino_hr", "latent"}.isdisjoint(out) and out["text"].shape[0] == 5
    assert all(len(p) == len(b) for p, b in zip(out["phrases"], out["boxes"], strict=True))


def test_grounding_sees_the_lr_as_upscale_does(stages):
    """Training gets the boxes inference will get: the HR, present or not, changes nothing."""
    grounder = stages[1]
    batch = _batch()
    batch["objects"] = object_array([["cat", "red car"], ["dog"], [], ["tree", "sky"], ["person"]])
    with_hr = grounder(dict(batch))
    other = grounder({**batch, "hr": np.zeros_like(batch["hr"])})
    without = grounder({k: v for k, v in batch.items() if k != "hr"})
    for out in (other, without):
        assert [list(p) for p in out["phrases"]] == [list(p) for p in with_hr["phrases"]]
        assert all(np.array_equal(a, b) for a, b in zip(out["boxes"], with_hr["boxes"], strict=True))
    assert list(with_hr["status"]) == ["ok"] * 5 and len(with_hr["phrases"][2]) == 0  # no objects: no query


class RecordingBackend:
    """A caption backend that names the image size it was given and remembers every call."""

    def __init__(self, objects_prompt: str):
        self.objects_prompt = objects_prompt
        self.calls: list[tuple[int, list[str]]] = []

    def caption(self, images, prompts):
        self.calls.append((images[0].shape[0], list(prompts)))
        return [["1. A red car\n2. A dog" if p == self.objects_prompt else f"{im.shape[0]}px" for im in images]
                for p in prompts]


@pytest.mark.parametrize("high_on, with_hr", [("hr", True), ("lr", True), ("hr", False)])
def test_captions_ask_each_prompt_about_xpsrs_image(cfg, paths, high_on, with_hr):
    """XPSR trains on the HR's high-level caption and the LR's quality caption; upscale has only the LR."""
    from stages.captions import Captioner

    section = cfg.annotate.captions.model_copy(update={"high_on": high_on})
    backend = RecordingBackend(section.objects_prompt)
    out = Captioner(section, cfg.models, paths, backend=backend)(_batch(3, hr=with_hr))
    high_px = HR if high_on == "hr" and with_hr else LR
    assert list(out["caption_high"]) == [f"{high_px}px"] * 3 and list(out["caption_low"]) == [f"{LR}px"] * 3
    assert [list(o) for o in out["objects"]] == [["red car", "dog"]] * 3  # parsed from the LR's object list
    # low_hr (default): the quality of the HR too, as XPSR's lowlevel_prompt_q_GT; upscale has no HR
    assert list(out.get("caption_low_hr", [])) == ([f"{HR}px"] * 3 if with_hr else [])
    # prompts about one image go in one call, so the backend shares that image's prefix between them
    lr_prompts = {p for px, prompts in backend.calls if px == LR for p in prompts}
    hr_prompts = {p for px, prompts in backend.calls if px == HR for p in prompts}
    assert {section.low_prompt, section.objects_prompt} <= lr_prompts
    assert (section.high_prompt in lr_prompts) == (high_px == LR)
    assert hr_prompts == ({section.low_prompt} | ({section.high_prompt} if high_px == HR else set()) if with_hr else set())
    assert len(backend.calls) == (2 if with_hr else 1) * 2  # per micro-batch (shards 0 and 1)


@pytest.mark.parametrize("lr_shape", [(16, 16), (16, 24)], ids=["square", "wide"])
def test_every_annotation_stage_on_a_one_row_batch(stages, lr_shape):
    """One row, as the row-by-row retry and a last partial batch run them, square or not."""
    rng = np.random.default_rng(7)
    h, w = lr_shape
    batch = {"key": object_array(["solo"]), "shard": np.array([0]),
             "lr": rng.integers(0, 256, (1, h, w, 3), dtype=np.uint8),
             "hr": rng.integers(0, 256, (1, 4 * h, 4 * w, 3), dtype=np.uint8)}
    for stage in stages:
        if stage.name == "grounding":  # the tiny LLaVA may list nothing: make sure the detector runs
            batch["objects"] = object_array([["cat", "red car"]])
        batch = stage(batch)
        assert list(batch["status"]) == ["ok"], (stage.name, list(batch["error"]))
    assert 0 < len(batch["phrases"][0]) == len(batch["boxes"][0]) <= 8
    assert batch["latent"].shape == (1, 8, h // 2, w // 2) and batch["text"].shape[:2] == (1, 2)
    assert batch["clip_hr"].shape == (1, tiny_sd.CLIP_VISION_DIM)


@pytest.mark.parametrize("size", [(80, 80), (80, 120)], ids=["square", "wide"])
def test_read_crop_degrade_on_a_one_row_batch(tmp_path, size):
    from PIL import Image

    from spasem.config import DataConfig, DegradationConfig
    from spasem.storage import LocalStore
    from stages.crop import RandomCrop
    from stages.degrade import Degrade
    from stages.read import ReadImages

    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(tmp_path / "one.png")
    batch = ReadImages(LocalStore(tmp_path), 10**8, 64, 10**8)({"path": np.asarray(["one.png"], dtype=object)})
    assert list(batch["status"]) == ["ok"] and batch["image"][0].shape == (*size, 3)
    batch = RandomCrop(64, 1, 0)(batch)
    x, y, cw, ch = batch["crop"][0]
    assert batch["hr"].shape == (1, 64, 64, 3) and x + cw <= size[1] and y + ch <= size[0]
    out = Degrade(DataConfig(hr_size=64, scale=4), DegradationConfig())(batch)
    assert list(out["status"]) == ["ok"] and out["lr"].shape == (1, 16, 16, 3) and out["hr"].shape == (1, 64, 64, 3)


def _image_batch(*images: np.ndarray) -> dict[str, np.ndarray]:
    from spasem.columns import object_array

    n = len(images)
    return {"image": object_array(list(images)), "source": object_array([f"img{i}.png" for i in range(n)]),
            "status": object_array(["ok"] * n), "error": object_array([""] * n)}


def test_crops_are_mirrored_half_the_time_as_the_papers_datasets_do():
    """BasicSR's ``augment(use_hflip=True)``: each crop mirrored left-right with probability 1/2, seeded,
    the record's box still in the source's coordinates; ``data.hflip: false`` mirrors none."""
    from stages.crop import RandomCrop

    image = np.random.default_rng(5).integers(0, 256, (90, 70, 3), dtype=np.uint8)
    out = RandomCrop(32, 400, 7)(_image_batch(image))
    assert out["flip"].dtype == bool and 0.4 < out["flip"].mean() < 0.6
    for (x, y, w, h), flip, hr in zip(out["crop"], out["flip"], out["hr"], strict=True):
        crop = image[y : y + h, x : x + w]
        np.testing.assert_array_equal(hr, crop[:, ::-1] if flip else crop)
    again = RandomCrop(32, 400, 7)(_image_batch(image))
    assert np.array_equal(again["flip"], out["flip"]) and np.array_equal(again["hr"], out["hr"])
    plain = RandomCrop(32, 400, 7, hflip=False)(_image_batch(image))
    assert not plain["flip"].any() and np.array_equal(plain["crop"], out["crop"])  # the same boxes


def test_an_image_smaller_than_the_crop_is_padded_by_reflection():
    """With ``data.min_size`` below the crop, an image that passes is padded at the bottom and right
    (reflect-101, as ``RealESRGANDataset``) instead of failing its whole shard."""
    from stages.crop import RandomCrop

    image = np.random.default_rng(6).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    out = RandomCrop(64, 3, 0, hflip=False)(_image_batch(image))
    assert list(out["status"]) == ["ok"] * 3 and out["hr"].shape == (3, 64, 64, 3)
    assert (out["crop"] == [0, 0, 64, 64]).all()
    hr = out["hr"][0]
    np.testing.assert_array_equal(hr[:40, :50], image)
    np.testing.assert_array_equal(hr[40:, :50], image[38 - np.arange(24)])  # row 40 mirrors row 38
    np.testing.assert_array_equal(hr[:40, 50:], image[:, 48 - np.arange(14)])


def test_select_boxes_thresholds_nms_and_cap():
    phrases = ["cat", "red car"]
    spans = [[1], [3, 4]]  # token positions of each phrase
    probs = torch.zeros(5, 6)
    probs[0, 1], probs[1, 1], probs[2, 4], probs[3, 3], probs[4, 1] = 0.9, 0.8, 0.7, 0.3, 0.6
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.51, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2],
                          [0.2, 0.2, 0.1, 0.1], [0.1, 0.1, 0.4, 0.4]])
    names, xyxy, scores = select_boxes(probs, boxes, spans, phrases, 0.35, 0.25, 0.5, max_boxes=8)
    # query 1 overlaps query 0 (same phrase): suppressed; query 2 overlaps too but is another phrase;
    # query 3 is under the box threshold; query 4's box is clipped to the image
    assert names == ["cat", "red car", "cat"] and scores.tolist() == pytest.approx([0.9, 0.7, 0.6])
    assert xyxy[0].tolist() == pytest.approx([0.4, 0.4, 0.6, 0.6]) and xyxy[2].tolist() == pytest.approx([0, 0, 0.3, 0.3])
    names, _, _ = select_boxes(probs, boxes, spans, phrases, 0.35, 0.25, 0.5, max_boxes=1)
    assert names == ["cat"]


def test_nms_and_token_spans():
    boxes = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 0.9], [0, 0, 0.5, 0.5]], dtype=torch.float32)
    keep = nms(boxes, torch.tensor([0.5, 0.9, 0.8]), torch.tensor([0, 0, 0]), 0.5)
    assert keep.tolist() == [1, 2]
    text = "cat . red car ."
    offsets = [(0, 0), (0, 3), (4, 5), (6, 9), (10, 13), (14, 15), (0, 0)]
    assert phrase_token_spans(offsets, text, ["cat", "red car"]) == [[1], [3, 4]]


def test_nms_keeps_what_greedy_pairwise_nms_keeps():
    """The one-matrix NMS against the textbook loop, on many random boxes with ties and three labels."""
    from stages.grounding import box_iou

    rng = np.random.default_rng(3)
    for _ in range(20):
        n = int(rng.integers(1, 40))
        xy = torch.tensor(rng.random((n, 2)), dtype=torch.float32) * 0.7
        boxes = torch.cat([xy, xy + torch.tensor(rng.random((n, 2)), dtype=torch.float32) * 0.3 + 0.01], dim=1)
        scores = torch.tensor(rng.integers(0, 5, n) / 5, dtype=torch.float32)  # ties: the order is stable
        labels = torch.tensor(rng.integers(0, 3, n))
        ious, expected = box_iou(boxes, boxes), []
        for i in torch.argsort(scores, descending=True, stable=True).tolist():
            if all(labels[j] != labels[i] or ious[i, j] <= 0.4 for j in expected):
                expected.append(i)
        assert nms(boxes, scores, labels, 0.4).tolist() == expected


def test_members_round_trip_without_pickle(annotated):
    row = {k: v[0] for k, v in annotated.items()}
    members = encode_annotations(row, {"captions": "llava-x", "grounding": "gdino-x"})
    assert {"caption.json", "boxes.json", "clip_lr.npy", "dino_lr.npy", "clip_hr.npy", "dino_hr.npy",
            "text.npy", "text_low_hr.npy", "latent.npy"} == set(members)
    for name in ("clip_lr", "text", "text_low_hr", "latent"):
        arr = np.load(io.BytesIO(members[f"{name}.npy"]), allow_pickle=False)
        assert arr.dtype == np.float16 and np.array_equal(arr, row[name])
    back = decode_annotations(members)
    assert back["caption_high"] == row["caption_high"] and back["phrases"] == list(row["phrases"])
    assert back["caption_low_hr"] == row["caption_low_hr"]
    assert row["text_low_hr"].shape == row["text"].shape[1:]
    # a sample annotated without low_hr has neither member, and reads back without the column
    bare = encode_annotations({k: v for k, v in row.items() if not k.endswith("low_hr")}, {"captions": "llava-x"})
    assert "text_low_hr.npy" not in bare and "caption_low_hr" not in decode_annotations(bare)
    assert back["boxes"].shape == (len(row["phrases"]), 4)


def test_stage_failure_protocol_retries_row_by_row():
    class Flaky(AnnotationStage):
        name = "flaky"

        def process(self, batch, rows):
            if any(batch["key"][i] == "bad" for i in rows):
                raise ValueError("cannot handle this one")
            return [{"value": np.full(2, i, np.float16)} for i in rows]

        def placeholder(self, batch, row):
            return {"value": np.zeros(2, np.float16)}

    batch = {"key": object_array(["a", "bad", "c", "d"]), "status": object_array(["ok", "ok", "ok", "error"]),
             "error": object_array(["", "", "", "read: earlier"])}
    out = Flaky(batch_size=4)(batch)
    assert list(out["status"]) == ["ok", "error", "ok", "error"]
    assert list(out["error"]) == ["", "flaky: ValueError: cannot handle this one", "", "read: earlier"]
    assert out["value"][:, 0].tolist() == [0, 0, 2, 0]


def test_llava_torch_backend_without_the_package_is_a_clear_error(cfg, paths):
    from stages.captions import Captioner

    pytest.importorskip("transformers")
    try:
        import llava  # noqa: F401
        pytest.skip("llava-torch is installed")
    except ImportError:
        pass
    bad = cfg.model_copy(deep=True)
    bad.annotate.captions.backend = "llava_torch"
    with pytest.raises(ImportError, match="llava-torch.*environment of its own"):
        Captioner(bad.annotate.captions, bad.models, paths)
    bad.annotate.captions.backend = "nope"
    with pytest.raises(ValueError, match="transformers"):
        Captioner(bad.annotate.captions, bad.models, paths)


def test_markers_name_models_not_cache_paths(cfg, paths):
    assert model_id(cfg.models, "llava") == "tiny-v1/llava" and paths["llava"].endswith("llava")
    real = load_config(CONFIG_DIR / "sd15.yaml")
    assert model_id(real.models, "llava") == "llava-hf/llava-1.5-7b-hf"
    assert load_config(CONFIG_DIR / "sd21.yaml").models.sd == "stabilityai/stable-diffusion-2-1"


@pytest.mark.parametrize("static_cache", [False, True])
def test_shared_image_prefix_gives_the_captions_of_separate_rows(paths, static_cache):
    from spasem.config.annotate import HIGH_PROMPT, LOW_PROMPT, OBJECTS_PROMPT
    from spasem.vlm.llava import TransformersLlava

    images = list(_batch(3)["lr"])
    prompts = [HIGH_PROMPT, LOW_PROMPT, OBJECTS_PROMPT]
    shared = TransformersLlava(paths["llava"], "cpu", torch.float32, 10, compile=static_cache, share_prefix=True)
    joint = TransformersLlava(paths["llava"], "cpu", torch.float32, 10, share_prefix=False)
    out = shared.caption(images, prompts)
    assert out == joint.caption(images, prompts)
    assert len(out) == 3 and all(len(c) == 3 and all(c) for c in out) and len({tuple(c) for c in out}) == 3
