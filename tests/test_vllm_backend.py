"""The vLLM caption backend around its engine: prompts, greedy requests, answers, the recorded model id.

vLLM is never installed here (it pins its own torch): a stand-in ``vllm`` module records what the
backend sends and answers from the prompt, so everything but the engine runs on CPU.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest

from spasem.config import annotate as annotate_cfg
from spasem.config import load_config
from spasem.vlm import vllm_backend
from spasem.vlm.vllm_backend import (
    LLAVA15_FORMAT,
    RUNTIME_ENV,
    build_requests,
    chat_prompt,
    engine_kwargs,
    parse_outputs,
    sampling_params,
)
from stages.captions_vllm import caption_columns, collect_answers, processor_config, prompt_rows

PROMPTS = [annotate_cfg.HIGH_PROMPT, annotate_cfg.LOW_PROMPT, annotate_cfg.OBJECTS_PROMPT]


@pytest.fixture(scope="module")
def llava(tmp_path_factory) -> str:
    from spasem.profiles import ensure_tiny

    return ensure_tiny(tmp_path_factory.mktemp("tiny-llava"), ("llava",))["llava"]


class FakeVllm(types.ModuleType):
    """``vllm.LLM`` / ``SamplingParams`` stand-ins: answer each request with its prompt, padded with whitespace."""

    def __init__(self):
        super().__init__("vllm")
        fake = self
        self.engines, self.calls = [], []

        class LLM:
            def __init__(self, model, **kwargs):
                fake.engines.append({"model": model, **kwargs})

            def generate(self, requests, params, use_tqdm=True):
                fake.calls.append((requests, params))
                return [types.SimpleNamespace(outputs=[types.SimpleNamespace(text=fake.answer(r["prompt"]))])
                        for r in requests]

        self.LLM, self.SamplingParams = LLM, lambda **kw: dict(kw)

    @staticmethod
    def answer(prompt: str) -> str:
        if annotate_cfg.OBJECTS_PROMPT in prompt:  # a list as LLaVA writes one
            return "1. A red car\n2. Two dogs in the park\n"
        return f"  {prompt[-30:]}\n "


@pytest.fixture
def fake_vllm(monkeypatch) -> FakeVllm:
    fake = FakeVllm()
    monkeypatch.setitem(sys.modules, "vllm", fake)
    return fake


def test_prompts_are_the_transformers_backends_llava15_prompts(llava):
    """The same text reaches vLLM as the transformers backend feeds LLaVA, for every XPSR prompt."""
    from transformers import AutoProcessor

    from spasem.vlm.llava import TransformersLlava

    processor = AutoProcessor.from_pretrained(llava)
    for template in ("xpsr", "chat"):
        reference = TransformersLlava.__new__(TransformersLlava)
        reference.processor, reference._texts, reference.template = processor, {}, template
        for prompt in PROMPTS:
            assert chat_prompt(prompt, processor, template) == reference.prompt_text(prompt)
    for prompt in PROMPTS:
        # XPSR's caption scripts' own format (annotate.captions.template: xpsr, the default)
        assert chat_prompt(prompt, processor, "xpsr") == f"<image>\nUSER: {prompt} \nASSISTANT:"
        # and LLaVA-1.5's conversation format, used for a checkpoint without a template
        assert chat_prompt(prompt) == LLAVA15_FORMAT.format(prompt=prompt) == f"USER: <image>\n{prompt} ASSISTANT:"
    with pytest.raises(ValueError, match="template"):
        chat_prompt("p", processor, "llava_v1")


def test_requests_are_greedy_prompt_major_with_one_image_each():
    images = [np.full((8, 8, 3), v, np.uint8) for v in (10, 200)]
    requests = build_requests(images, ["p1", "p2"])
    assert [r["prompt"] for r in requests] == ["p1", "p1", "p2", "p2"]
    assert [int(np.asarray(r["multi_modal_data"]["image"])[0, 0, 0]) for r in requests] == [10, 200, 10, 200]
    params = sampling_params(64)
    assert params["temperature"] == 0.0 and params["n"] == 1 and params["max_tokens"] == 64
    kwargs = engine_kwargs("bfloat16", 64)
    assert kwargs["enable_prefix_caching"] and kwargs["limit_mm_per_prompt"] == {"image": 1}
    assert kwargs["dtype"] == engine_kwargs("torch.bfloat16", 64)["dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="float8"):
        engine_kwargs("float8", 64)


def test_answers_are_cleaned_and_split_per_prompt():
    texts = [" a  cat\n", "a dog ", "sharp", " noisy\tand dark "]
    assert parse_outputs(texts, n_images=2, n_prompts=2) == [["a cat", "a dog"], ["sharp", "noisy and dark"]]
    with pytest.raises(RuntimeError, match="3 answers for 2 images x 2 prompts"):
        parse_outputs(texts[:3], 2, 2)


def test_without_vllm_the_error_names_the_extra_and_the_runtime_env(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import fails as when it is not installed
    with pytest.raises(ImportError, match="'vllm' extra") as err:
        vllm_backend.VllmLlava("any", "cuda", "bfloat16", 16)
    assert str(RUNTIME_ENV) in str(err.value)
    with pytest.raises(ValueError, match="models.device='cpu'"):
        vllm_backend.VllmLlava("any", "cpu", "bfloat16", 16)


def test_captions_stage_on_vllm_writes_the_same_members_and_model_id(llava, fake_vllm):
    """``annotate.captions.backend=vllm``: the stage's columns, caption.json and the marker's model id."""
    from pipeline.annotate_phase import stage_ids
    from spasem.shards import decode_member, encode_annotations
    from stages.captions import Captioner

    cfg = load_config(None, ["annotate.captions.backend=vllm", "models.device=cuda", "models.dtype=bfloat16",
                             "annotate.captions.max_new_tokens=24"])
    stage = Captioner(cfg.annotate.captions, cfg.models, {"llava": llava})
    engine = fake_vllm.engines[0]
    assert engine["model"] == llava and engine["enable_prefix_caching"] and engine["dtype"] == "bfloat16"
    section = cfg.annotate.captions
    batch = {"key": np.asarray(["a", "b"], object), "lr": np.zeros((2, 16, 16, 3), np.uint8),
             "hr": np.zeros((2, 64, 64, 3), np.uint8)}
    out = stage(batch)
    assert list(out["status"]) == ["ok", "ok"]
    requests, params = fake_vllm.calls[0]
    assert params["temperature"] == 0.0 and params["max_tokens"] == 24
    # the prompts of the transformers backend, each about its image: high and quality on the HR (high_on:
    # hr, low_hr), quality and objects on the LR, all in one generate so the engine schedules them together
    asked = {(r["prompt"], np.asarray(r["multi_modal_data"]["image"]).shape[0])
             for requests, _ in fake_vllm.calls for r in requests}
    xpsr = "<image>\nUSER: {} \nASSISTANT:".format  # annotate.captions.template: xpsr, the default
    assert asked == {(xpsr(section.high_prompt), 64), (xpsr(section.low_prompt), 64), (xpsr(section.low_prompt), 16),
                     (xpsr(section.objects_prompt), 16)}
    assert len(fake_vllm.calls) == 1 and len(fake_vllm.calls[0][0]) == 4 * 2  # one generate per micro-batch
    assert [list(o) for o in out["objects"]] == [["red car", "dogs"]] * 2  # the column grounding reads
    # the fake answers with the prompt's tail, cleaned as the transformers backend cleans
    assert out["caption_high"][0] == " ".join(xpsr(cfg.annotate.captions.high_prompt)[-30:].split())
    assert out["caption_low"][1] == " ".join(xpsr(cfg.annotate.captions.low_prompt)[-30:].split())
    ids = stage_ids(cfg, ["captions"])
    assert ids == stage_ids(load_config(None, []), ["captions"])  # the backend is not part of the model id
    row = {k: v[0] for k, v in out.items()}
    caption = decode_member("json", encode_annotations(row, ids)["caption.json"])
    assert caption == {"high": out["caption_high"][0], "low": out["caption_low"][0],
                       "low_hr": out["caption_low_hr"][0], "model": ids["captions"]}


@pytest.mark.parametrize("high_on, with_hr", [("hr", True), ("lr", True), ("hr", False)])
def test_ray_data_llm_asks_the_prompts_each_about_its_image(high_on, with_hr):
    """Request rows for ray.data.llm: the prompts and images of the other backends, a row's requests together."""
    section = load_config(None, [f"annotate.captions.high_on={high_on}"]).annotate.captions
    batch = {"key": np.asarray(["k1", "k2"], object), "lr": np.zeros((2, 4, 4, 3), np.uint8)}
    if with_hr:
        batch["hr"] = np.zeros((2, 16, 16, 3), np.uint8)
    rows = prompt_rows(batch, section, render=lambda p: f"<{p}>")
    high_px = 16 if high_on == "hr" and with_hr else 4
    expected = [("caption_high", section.high_prompt, high_px), ("caption_low", section.low_prompt, 4),
                ("objects", section.objects_prompt, 4)]
    if with_hr:  # low_hr: the quality prompt about the HR too, only where there is one
        expected.append(("caption_low_hr", section.low_prompt, 16))
    # an image's prompts next to each other, the high caption's image first
    expected = sorted(expected, key=lambda e: e[2] != high_px)
    assert [(r["key"], r["answer"], r["prompt"], r["image"].shape[0]) for r in rows] == [
        (key, name, f"<{prompt}>", px) for key in ("k1", "k2") for name, prompt, px in expected]
    assert all(r["image"].dtype == np.uint8 for r in rows)
    no_objects = section.model_copy(update={"max_objects": 0})
    assert {r["answer"] for r in prompt_rows(batch, no_objects)} == {"caption_high", "caption_low"} | (
        {"caption_low_hr"} if with_hr else set())


def test_ray_data_llm_answers_become_the_captions_columns_grounding_reads():
    """Answers in any order, cleaned and folded per key; the objects answer parsed as the other backends parse it."""
    from pipeline.annotate_phase import stage_ids
    from spasem.shards import decode_member, encode_annotations

    cfg = load_config(None, ["annotate.captions.backend=vllm"])
    section = cfg.annotate.captions
    batch = {"key": np.asarray(["k1", "k2"], object), "lr": np.zeros((2, 4, 4, 3), np.uint8),
             "hr": np.zeros((2, 16, 16, 3), np.uint8)}
    rows = prompt_rows(batch, section)
    answers = [{"key": r["key"], "answer": r["answer"],
                "text": FakeVllm.answer(r["prompt"]) + ("" if r["answer"] == "objects" else f" {r['key']} ")}
               for r in reversed(rows)]
    columns = caption_columns(answers, section, ["k2", "k1"])
    high = " ".join(chat_prompt(section.high_prompt)[-30:].split())
    assert list(columns["caption_high"]) == [f"{high} k2", f"{high} k1"]
    assert [list(o) for o in columns["objects"]] == [["red car", "dogs"]] * 2
    row = {name: values[1] for name, values in columns.items()}
    ids = stage_ids(cfg, ["captions"])
    assert decode_member("json", encode_annotations(row, ids)["caption.json"]) == {
        "high": f"{high} k1", "low": row["caption_low"], "low_hr": row["caption_low_hr"], "model": ids["captions"]}
    low = " ".join(chat_prompt(section.low_prompt)[-30:].split())
    assert list(columns["caption_low_hr"]) == [f"{low} k2", f"{low} k1"]
    with pytest.raises(RuntimeError, match="'k1' has no answer for \\['objects'\\]"):
        caption_columns([a for a in answers if (a["key"], a["answer"]) != ("k1", "objects")], section, ["k1", "k2"])


def test_ray_data_llm_config_and_lost_requests():
    """vLLM in its own runtime_env; a key missing an answer is an error naming it."""
    from ray.data.llm import vLLMEngineProcessorConfig

    answers = [{"key": k, "answer": a, "text": f" {a}  {k} "} for k in ("k1", "k2")
               for a in ("caption_high", "caption_low")]
    assert collect_answers(answers, ["caption_high", "caption_low"]) == {
        "k1": {"caption_high": "caption_high k1", "caption_low": "caption_low k1"},
        "k2": {"caption_high": "caption_high k2", "caption_low": "caption_low k2"}}
    with pytest.raises(RuntimeError, match="'k1' has no answer for \\['caption_high'\\]"):
        collect_answers(answers[1:], ["caption_high", "caption_low"])
    with pytest.raises(RuntimeError, match="'k3' has no answer"):
        collect_answers(answers, ["caption_high", "caption_low"], keys=["k1", "k2", "k3"])
    cfg = load_config(None, ["models.dtype=bfloat16"])
    config = vLLMEngineProcessorConfig(**processor_config(cfg.annotate.captions, cfg.models, "llava-hf/llava-1.5-7b-hf"))
    assert config.runtime_env == RUNTIME_ENV and config.engine_kwargs["enable_prefix_caching"]
    assert config.batch_size == cfg.annotate.captions.batch_size


def test_the_captions_pool_gets_vllms_own_runtime_env_only_with_that_backend():
    from pipeline.annotate_phase import pool_options
    from spasem.config import load_config
    from spasem.vlm.vllm_backend import RUNTIME_ENV

    assert pool_options(load_config(None, ["annotate.captions.backend=vllm"]), "captions") == {"runtime_env": RUNTIME_ENV}
    assert pool_options(load_config(None, ["annotate.captions.backend=vllm"]), "grounding") == {}
    assert pool_options(load_config(), "captions") == {}


def test_prepare_renders_the_prompts_with_the_checkpoints_chat_template(tiny, caplog):
    """The ray.data.llm pass renders each prompt once on the driver through the checkpoint's processor;
    a driver that cannot read the checkpoint falls back to LLaVA-1.5's format, and says so."""
    from transformers import AutoProcessor

    from pipeline.captions_prepass import rendered_prompts
    from spasem.profiles import ensure_tiny

    llava = ensure_tiny(Path(tiny["sd"]).parents[1], ("llava",))["llava"]
    processor = AutoProcessor.from_pretrained(llava)
    processor.chat_template = "{% for m in messages %}<<{{ m['role'] }}>>{% endfor %}[image] " \
        "{{ messages[0]['content'][1]['text'] }} =>"  # a template unlike LLaVA-1.5's, to tell them apart
    custom = Path(tiny["sd"]).parents[1] / "llava-custom-template"
    processor.save_pretrained(custom)
    texts = rendered_prompts(str(custom), ("Describe it.", "Objects?"))
    assert texts == {"Describe it.": "<<user>>[image] Describe it. =>", "Objects?": "<<user>>[image] Objects? =>"}
    with caplog.at_level("WARNING"):
        texts = rendered_prompts(str(custom / "missing"), ("Describe it.",))
    assert texts == {"Describe it.": vllm_backend.LLAVA15_FORMAT.format(prompt="Describe it.")}
    assert "LLaVA-1.5's format" in caplog.text


def _stand_in_processor(drop_objects_of: str, built_with: list[str]):
    """A ``ray.data.llm`` processor's stand-in, built at run time so Ray ships it by value: each request
    row gets an answer naming its prompt's column and its image's height; the objects answer of key
    ``drop_objects_of`` is lost on the way, as a failed request would be. ``built_with`` collects the
    model source each build was given (on the driver)."""

    def build(section, models, model):
        built_with.append(model)
        def answer(row):
            text = "red car, dogs" if row["answer"] == "objects" else f" {row['answer']}  about {row['image'].shape[0]} px "
            return {"key": row["key"], "answer": row["answer"], "text": text, "model": model}

        return lambda requests: requests.map(answer).filter(
            lambda row: not (row["key"] == drop_objects_of and row["answer"] == "objects"))

    return build


@pytest.mark.slow
def test_prepare_captions_through_ray_data_llm(demo_prepared, tiny, tmp_path, monkeypatch):
    """``annotate.captions.backend=vllm`` in prepare: one ray.data.llm pass per wave asks every sample's
    prompts about its images; the answers become caption.json with the usual model id; a sample whose
    answers did not all come back is a reject naming the lost prompt."""
    import json
    import shutil

    from pipeline import captions_prepass
    from pipeline.annotate_phase import stage_ids
    from pipeline.prepare import main as prepare_main
    from spasem.shards import decode_png, read_tar
    from tests.conftest import demo_prepare_args

    first_pairs = read_tar((demo_prepared / "pairs" / "shard-000000.tar").read_bytes())
    victim = first_pairs[0][0]
    hr_px, lr_px = (decode_png(first_pairs[0][1][name]).shape[0] for name in ("hr.png", "lr.png"))
    built_with: list[str] = []
    monkeypatch.setattr(captions_prepass, "build_caption_processor", _stand_in_processor(victim, built_with))
    out = tmp_path / "vllm"
    shutil.copytree(demo_prepared / "pairs", out / "pairs")
    sets = ["prepare.phases=[annotate]", "annotate.captions.backend=vllm", "annotate.grounding.enabled=false",
            "annotate.embeddings.enabled=false", "annotate.encode.enabled=false"]
    assert prepare_main(demo_prepare_args(out, tiny, *[a for s in sets for a in ("--set", s)])) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rejected_by_reason"].get("captions") == 1
    samples = {key: members for tar in sorted((out / "shards").glob("shard-*.tar"))
               for key, members in read_tar(tar.read_bytes())}
    assert victim not in samples and len(samples) == summary["samples"] > 1
    model = stage_ids(load_config(), ["captions"])["captions"]
    for members in samples.values():  # the high prompt about the HR, the quality prompt about the LR and the HR
        assert json.loads(members["caption.json"]) == {
            "high": f"caption_high about {hr_px} px", "low": f"caption_low about {lr_px} px",
            "low_hr": f"caption_low_hr about {hr_px} px", "model": model}
    rejected = [r for m in (out / "shards").glob("shard-*.json") for r in json.loads(m.read_text())["rejected"]]
    assert any(victim in r["source"] and "no answer for ['objects']" in r["reason"] for r in rejected), rejected
    # the engines load the model the markers name: the tiny profile's LLaVA, not the configured hub id
    from spasem.profiles import ensure_tiny

    llava = ensure_tiny(Path(tiny["sd"]).parents[1], ("llava",))["llava"]
    assert built_with and {str(Path(m).resolve()) for m in built_with} == {str(Path(llava).resolve())}
