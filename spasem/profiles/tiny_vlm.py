"""Tiny random-init LLaVA and Grounding DINO for the ``tiny`` profile, built offline from real config classes.

LLaVA: a tiny CLIP vision tower + a tiny Llama, a word-level tokenizer with the ``<image>`` token and
LLaVA-1.5's chat template, wrapped in a real ``LlavaProcessor``. Grounding DINO: a tiny Swin backbone
+ a tiny BERT text encoder and a ``BertTokenizer`` over the same small vocabulary, wrapped in a real
``GroundingDinoProcessor``. Both are saved with ``save_pretrained`` and loaded back with
``AutoProcessor`` / ``*.from_pretrained`` exactly as the real checkpoints are. Their words are real
English words, so the captions of the random models are gibberish made of words and the phrase
extractor of the caption stage has nouns to find.
"""

from __future__ import annotations

from pathlib import Path

import torch

SEED = 4321
IMAGE_SIZE = 32  # LLaVA's vision tower input side (336 in LLaVA-1.5)
PATCH = 8
GDINO_SIZE = 64  # Grounding DINO's shortest edge (800 in the real processor)

# LLaVA-1.5's chat template (llava-hf), without the training-only generation markers
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

OBJECT_WORDS = (
    "person man woman child people face hand hair eye dog cat bird horse cow sheep fish animal car bus truck "
    "bicycle boat train plane road street sidewalk building house window door wall roof tower bridge city "
    "tree grass flower leaf plant forest field mountain hill rock sand beach sea water river lake sky cloud "
    "sun snow table chair bed sofa cup mug coffee plate bowl food fruit apple bread cake bottle glass book "
    "phone computer screen lamp clock sign text logo shirt hat helmet suit astronaut flag rocket camera "
    "tripod coin ball toy rope fence pole"
).split()
ATTRIBUTE_WORDS = (
    "red orange yellow green blue purple pink brown black white gray grey gold silver dark bright light "
    "small large big tall old new young wooden metal round"
).split()
QUALITY_WORDS = (
    "image picture photo photograph scene quality clarity clear sharp blurry blur noise noisy grainy color "
    "colors colour lighting light exposure contrast detail details texture resolution low high good poor "
    "excellent average overall well slightly very somewhat soft vivid natural dull"
).split()
FUNCTION_WORDS = (
    "a an the of on in with and or is are was be there this that it its his her their near at by to from "
    "for as some two three several one standing sitting holding wearing looking background foreground "
    "front behind top left right center middle under over next while please provide descriptive summary "
    "content describe evaluate based factors such user assistant system"
).split()
PUNCTUATION = [".", ",", ":", "?", "!", "'", "-"]


def vocabulary() -> list[str]:
    """The tiny models' shared word list (deduplicated, order fixed)."""
    return list(dict.fromkeys(OBJECT_WORDS + ATTRIBUTE_WORDS + QUALITY_WORDS + FUNCTION_WORDS + PUNCTUATION))


def _llava_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    vocab = {tok: i for i, tok in enumerate(specials + vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        padding_side="left", model_max_length=512,
    )
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return fast


def build_llava(target: Path) -> None:
    """A tiny ``LlavaForConditionalGeneration`` + ``LlavaProcessor`` (CLIP image processor, chat template)."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        GenerationConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = _llava_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<s>", "</s>", "<pad>", "<image>")}
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=32,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
            bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"],
        ),
        image_token_index=ids["<image>"],
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(SEED)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"], do_sample=False,
    )
    model.save_pretrained(str(target))
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
        vision_feature_select_strategy="default", chat_template=LLAVA_CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(str(target))


def build_grounding_dino(target: Path) -> None:
    """A tiny ``GroundingDinoForObjectDetection`` + ``GroundingDinoProcessor`` (BERT tokenizer, Swin backbone)."""
    from transformers import (
        BertConfig,
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    target.mkdir(parents=True, exist_ok=True)
    vocab_file = target / "vocab.txt"
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + vocabulary()
    vocab_file.write_text("\n".join(words) + "\n")
    tokenizer = BertTokenizer(str(vocab_file), do_lower_case=True, model_max_length=64)
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(
            image_size=GDINO_SIZE, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4],
            window_size=4, out_features=["stage2", "stage3", "stage4"],
        ),
        text_config=BertConfig(
            vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=64,
        ),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        encoder_attention_heads=2, decoder_attention_heads=2, num_queries=16, encoder_n_points=2,
        decoder_n_points=2, max_text_len=64, num_feature_levels=4, disable_custom_kernels=True,
    )
    torch.manual_seed(SEED + 1)
    model = GroundingDinoForObjectDetection(config).eval()
    model.save_pretrained(str(target))
    image_processor = GroundingDinoImageProcessor(size={"shortest_edge": GDINO_SIZE, "longest_edge": 2 * GDINO_SIZE})
    GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(target))
