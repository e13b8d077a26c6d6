"""Grounding stage: Grounding DINO boxes for the objects the MLLM listed, on the LR, normalized xyxy.

Each row's objects become one query text (``"red car . dog ."``, Grounding DINO's format). For every
predicted query box the stage scores each phrase by the highest token probability inside that phrase's
tokens; a box is kept when its best phrase scores above ``box_threshold`` and ``text_threshold``.
Then per-phrase NMS (in torch: torchvision is never required), sorted by score, at most ``max_boxes``
(the smaller of ``annotate.grounding.max_boxes`` and ``model.max_boxes``).

The detector always sees the LR, in prepare as in upscale: inference has nothing else, so training on
boxes found in the HR would teach the model boxes it never gets. Its processor resizes the LR to the
detector's input size (800 px short side for the real model); boxes are normalized to [0, 1], and the
LR is the HR crop scaled by ``1 / data.scale``, so the same numbers hold in the HR frame.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch

from spasem.columns import as_list
from spasem.config.annotate import GroundingConfig, ModelsConfig
from spasem.encoders import torch_dtype
from spasem.preprocess import ImageTransform
from stages.annotations import AnnotationStage


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of xyxy boxes ``[N,4]`` x ``[M,4]``."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp(min=1e-9)


def nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou: float) -> torch.Tensor:
    """Indices kept by greedy NMS within each label, highest score first (torchvision's batched_nms)."""
    order = torch.argsort(scores, descending=True, stable=True).tolist()
    # box j suppresses box i when they share a label and overlap above ``iou``; one matrix, no per-pair Python
    suppress = ((box_iou(boxes, boxes) > iou) & (labels[:, None] == labels[None, :])).numpy()
    removed = np.zeros(len(order), bool)
    keep: list[int] = []
    for i in order:
        if not removed[i]:
            keep.append(i)
            removed |= suppress[i]
    return torch.tensor(keep, dtype=torch.long)


def phrase_token_spans(offsets: list[tuple[int, int]], text: str, phrases: list[str]) -> list[list[int]]:
    """For each phrase of ``text`` (joined as ``"p1 . p2 ."``), the token positions inside it."""
    spans, start = [], 0
    for phrase in phrases:
        lo = text.index(phrase, start)
        hi = lo + len(phrase)
        start = hi
        spans.append([t for t, (a, b) in enumerate(offsets) if b > a and a >= lo and b <= hi])
    return spans


def select_boxes(probs: torch.Tensor, boxes_cxcywh: torch.Tensor, spans: list[list[int]], phrases: list[str],
                 box_threshold: float, text_threshold: float, iou: float, max_boxes: int
                 ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Phrases, normalized xyxy boxes ``[K,4]`` and scores ``[K]`` of one image's queries (``probs [Q, T]``)."""
    width = probs.shape[1]
    valid = [(j, [t for t in span if t < width]) for j, span in enumerate(spans)]
    valid = [(j, span) for j, span in valid if span]
    if not valid:
        return [], np.zeros((0, 4), np.float32), np.zeros((0,), np.float32)
    per_phrase = torch.stack([probs[:, span].max(dim=1).values for _, span in valid], dim=1)  # [Q, P]
    score, best = per_phrase.max(dim=1)
    keep = (score > box_threshold) & (score > text_threshold)
    cx, cy, w, h = boxes_cxcywh.unbind(-1)
    xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1).clamp(0, 1)
    xyxy, score, labels = xyxy[keep], score[keep], best[keep]
    kept = nms(xyxy, score, labels, iou)[:max_boxes] if len(score) else torch.zeros(0, dtype=torch.long)
    names = [phrases[valid[int(labels[k])][0]] for k in kept]
    return names, xyxy[kept].float().numpy().reshape(-1, 4), score[kept].float().numpy().reshape(-1)


def input_size(size: dict[str, int], config: Any) -> dict[str, int]:
    """The processor's resize target, raised so the detector's coarsest feature map has more than one pixel.

    Its last level is the backbone's stride times 2 per extra level; at one pixel, GroupNorm refuses a
    batch of one (the tiny profile's 64 px square image). The real model's 800 px is far above it.
    """
    backbone = config.backbone_config
    stages = len(getattr(backbone, "depths", ())) or 4
    extra = max(0, config.num_feature_levels - len(getattr(backbone, "out_features", ())))
    least = getattr(backbone, "patch_size", 4) * 2 ** (stages - 1 + extra) + 1
    short = max(int(size["shortest_edge"]), least)
    return {"shortest_edge": short, "longest_edge": max(int(size.get("longest_edge", short)), short)}


class Grounder(AnnotationStage):
    """Adds ``phrases`` (list of str), ``boxes`` (float32 ``[K,4]``) and ``scores`` (float32 ``[K]``)."""

    name = "grounding"

    def __init__(self, section: GroundingConfig, models: ModelsConfig, paths: dict[str, str], max_boxes: int | None = None):
        """``max_boxes``: the model's box budget (``model.max_boxes``), capping ``section.max_boxes``."""
        from transformers import AutoProcessor, GroundingDinoForObjectDetection

        super().__init__(section.batch_size)
        self.cfg = section
        self.max_boxes = min(section.max_boxes, max_boxes or section.max_boxes)
        self.processor = AutoProcessor.from_pretrained(paths["grounding_dino"])
        self.processor.tokenizer.padding_side = "right"  # phrase spans are token positions of the padded batch
        self.model = GroundingDinoForObjectDetection.from_pretrained(
            paths["grounding_dino"], dtype=torch_dtype(models.dtype)
        ).to(models.device).eval()
        self.size = input_size(self.processor.image_processor.size, self.model.config)
        # resize, normalize and pad in torch on the detector's device (use_processors: the processor itself)
        self.transform = replace(ImageTransform.from_processor(self.processor.image_processor), **self.size)
        self.use_processors = False

    @staticmethod
    def _image(batch: dict[str, Any], i: int) -> np.ndarray:
        return np.asarray(batch["lr"][i], np.uint8)

    @torch.no_grad()
    def process(self, batch: dict[str, Any], rows: list[int]) -> list[dict[str, Any]]:
        if "objects" not in batch:
            raise KeyError("grounding needs the captions stage's 'objects' column; enable annotate.captions")
        objects = {i: list(dict.fromkeys(" ".join(str(o).lower().split()) for o in as_list(batch["objects"][i])
                                         if str(o).strip())) for i in rows}
        out = {i: self.placeholder(batch, i) for i in rows}
        todo = [i for i in rows if objects[i]]
        if todo:
            texts = [" . ".join(objects[i]) + " ." for i in todo]
            images = [self._image(batch, i) for i in todo]
            if self.use_processors:
                inputs = self.processor(images=images, text=texts, padding=True, size=self.size,
                                        return_tensors="pt").to(self.model.device)
                inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
            else:
                inputs = self.processor.tokenizer(texts, padding=True, return_tensors="pt").to(self.model.device)
                inputs.update(self.transform(images, self.model.device, self.model.dtype))
            result = self.model(**inputs)
            probs = result.logits.float().sigmoid().cpu()
            pred = result.pred_boxes.float().cpu()
            # each text's token offsets, from one call; a row's tokens sit at the same positions in the model's
            # padded batch (the tokenizer pads on the right)
            offsets = self.processor.tokenizer(texts, return_offsets_mapping=True)["offset_mapping"]
            for n, i in enumerate(todo):
                spans = phrase_token_spans(offsets[n], texts[n], objects[i])
                phrases, boxes, scores = select_boxes(
                    probs[n], pred[n], spans, objects[i], self.cfg.box_threshold, self.cfg.text_threshold,
                    self.cfg.nms_iou, self.max_boxes,
                )
                out[i] = {"phrases": phrases, "boxes": boxes, "scores": scores}
        return [out[i] for i in rows]

    def placeholder(self, batch: dict[str, Any], row: int) -> dict[str, Any]:
        return {"phrases": [], "boxes": np.zeros((0, 4), np.float32), "scores": np.zeros((0,), np.float32)}
