"""A tiny random transformers Llava (CLIP tower, Llama LM) and its reference preprocessing, for parity tests of
mm's scoring paths (`mm.ppl`, `mm.preference_eval`) against transformers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_images(root: Path, sizes) -> list[str]:
    """Random RGB PNGs of the given (width, height) sizes under `root`; their names."""
    rs = np.random.RandomState(0)
    names = []
    for k, (w, h) in enumerate(sizes):
        name = f"img{k}.png"
        Image.fromarray(rs.randint(0, 256, (h, w, 3)).astype(np.uint8)).save(root / name)
        names.append(name)
    return names


IMG_ID = 4  # the tiny tokenizer's <image>: the id the pipeline puts at image positions, HF's image_token_index


def hf_llava(seed: int = 0):
    """A float32 transformers Llava with weights N(0, 0.15) (norm scales 1 + N(0, 0.1)) from `seed`."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                          image_size=28, patch_size=14, hidden_act="quick_gelu")
    tc = LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0, pad_token_id=0)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vc, text_config=tc, image_token_index=IMG_ID,
                                                      image_seq_length=4)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g) if ("norm" in n and n.endswith("weight"))
                    else 0.15 * torch.randn(p.shape, generator=g))
    return model


def hf_pixels(path: Path):
    """LLaVA's pad-to-square on the CLIP mean colour, then transformers' own CLIP processor (PIL path)."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    proc = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    im = Image.open(path).convert("RGB")
    w, h = im.size
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), tuple(int(x * 255) for x in proc.image_mean))
    canvas.paste(im, ((side - w) // 2, (side - h) // 2))
    return proc(images=[canvas], return_tensors="pt")["pixel_values"]
