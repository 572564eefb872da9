"""Tiny random-weight BLIP, BLIP-2 and LLaVA-1.5 models, built at test time with no network.

Each builder saves a model and its processor with ``save_pretrained`` into a directory that
``vision-host serve --model DIR`` loads through the same ``from_pretrained`` path as the real
checkpoints (``Salesforce/blip-image-captioning-large``, ``Salesforce/blip2-opt-2.7b``,
``llava-hf/llava-1.5-7b-hf``): the real model and processor classes, 32×32 images, hidden
size 32, 2 layers, and word-level vocabularies of a few dozen words. The answers are
nonsense words from :data:`WORDS` / :data:`LM_WORDS`; the code path is the real one.
"""

from __future__ import annotations

from pathlib import Path

#: BLIP's BERT vocabulary.
WORDS = ("[PAD] [UNK] [CLS] [SEP] [MASK] a an the of on in with photo picture bottle table man woman "
         "red blue green is there two hand water glass").split()
#: The decoder-only models' vocabulary (OPT for BLIP-2, Llama for LLaVA), with the words of
#: their prompt templates and enough JSON to write an object (keys and strings as whole tokens).
LM_WORDS = ("<pad> </s> <unk> <s> a an the of on in with photo picture bottle table man woman red blue green "
            "is there two hand water glass what USER ASSISTANT : ? . Question Answer describe this image "
            # JSON pieces, for structured output (a format / JSON Schema): whole strings, single digits
            '{ } [ ] , true false null 0 1 2 3 4 5 6 7 8 9 "person" "count" "photo" "man"').split()

#: LLaVA-1.5's chat template (the prompt format of llava-hf/llava-1.5-7b-hf: ``USER: <image>\n…
#: ASSISTANT:``), written for the tiny model.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'text') %}{{ item['text'] + ' ' }}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


def _image_processor(kind: str, **kw):
    import transformers
    # transformers 5 without torchvision has the PIL-backed classes under their own names
    cls = getattr(transformers, kind + "Pil", None) or getattr(transformers, kind)
    return cls(**kw)


def _lm_tokenizer(bos: str):
    """A word-level fast tokenizer over :data:`LM_WORDS` that starts every text with ``bos``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(LM_WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                       special_tokens=[(bos, vocab[bos])])
    tok.decoder = decoders.WordPiece(prefix="##")   # words joined by spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def build_tiny_blip(directory: Path) -> Path:
    """Save a random-weight BLIP captioner and its processor to ``directory``."""
    import torch
    from transformers import BertTokenizerFast, BlipConfig, BlipForConditionalGeneration, BlipProcessor

    directory.mkdir(parents=True, exist_ok=True)
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(WORDS) + "\n")
    try:
        tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(WORDS)}, do_lower_case=True)
    except TypeError:   # transformers 4: a vocab file
        tokenizer = BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)
    assert tokenizer("a photo of")["input_ids"][1:-1] == [WORDS.index(w) for w in ("a", "photo", "of")]
    processor = BlipProcessor(image_processor=_image_processor("BlipImageProcessor", size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    config = BlipConfig(
        text_config=dict(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=64, pad_token_id=0,
                         bos_token_id=WORDS.index("[CLS]"), sep_token_id=WORDS.index("[SEP]"),
                         eos_token_id=WORDS.index("[SEP]")),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=16),
        projection_dim=32)
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def build_tiny_blip2(directory: Path) -> Path:
    """Save a random-weight BLIP-2 (ViT + Q-Former with 4 queries + OPT) and its processor."""
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor

    processor = Blip2Processor(image_processor=_image_processor("BlipImageProcessor", size={"height": 32, "width": 32}),
                               tokenizer=_lm_tokenizer("</s>"), num_query_tokens=4)   # OPT's BOS is </s>
    tok = processor.tokenizer
    config = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=16),
        qformer_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                            encoder_hidden_size=32, vocab_size=64),
        text_config=dict(model_type="opt", vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                         num_attention_heads=2, max_position_embeddings=128, word_embed_proj_dim=32,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id),
        num_query_tokens=4, image_token_index=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(5)   # weights whose greedy answers differ from prompt to prompt
    directory.mkdir(parents=True, exist_ok=True)
    Blip2ForConditionalGeneration(config).save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def build_tiny_llava(directory: Path) -> Path:
    """Save a random-weight LLaVA-1.5 (CLIP ViT + projector + Llama) and its processor with
    the chat template."""
    import torch
    from transformers import AddedToken, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok = _lm_tokenizer("<s>")
    tok.add_tokens([AddedToken("<image>", normalized=False, special=True)], special_tokens=True)
    processor = LlavaProcessor(
        image_processor=_image_processor("CLIPImageProcessor", size={"shortest_edge": 32},
                                         crop_size={"height": 32, "width": 32}),
        tokenizer=tok, patch_size=16, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE)
    config = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=16, projection_dim=32),
        text_config=dict(model_type="llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=256, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id),
        image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
        vision_feature_select_strategy="default")
    torch.manual_seed(0)
    directory.mkdir(parents=True, exist_ok=True)
    LlavaForConditionalGeneration(config).save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


BUILDERS = {"blip": build_tiny_blip, "blip2": build_tiny_blip2, "llava": build_tiny_llava}
