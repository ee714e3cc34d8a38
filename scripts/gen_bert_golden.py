#!/usr/bin/env python3
"""Golden files for the BERT backbone's parity tests (run by `cargo xtask fixtures`).

Writes, under crates/zhijian-backbones/tests/fixtures/:
  bert_tiny.safetensors   a random-init 2-layer BertModel (transformers) with its
                          weights (`w.` prefix), fixed ids/mask, every layer's
                          output and the mean-pooled features;
  minilm_golden.safetensors  token ids and masks of a fixed list of sentences
                          (tokenised by Hugging Face `tokenizers` from the
                          shipped tokenizer.json), block 0 / last block outputs
                          and sentence embeddings computed by transformers'
                          BertModel from the shipped model.safetensors, with
                          sentence-transformers' mean pooling.

The reference is Hugging Face transformers, run offline; no hub access.
"""
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import BertConfig, BertModel
from tokenizers import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "crates", "zhijian-backbones", "tests", "fixtures")
CACHE = os.environ.get("ZHIJIAN_CACHE", os.path.expanduser("~/.cache/zhijian/assets"))
MINILM = os.path.join(CACHE, "all-minilm-l6-v2")

SENTENCES = [
    "A gripping, beautifully shot thriller that never lets go.",
    "The plot is a mess and the jokes fall flat.",
    "Hello world!",
    "It's neither as funny nor as clever as it thinks it is.",
    "An unexpectedly moving portrait of grief, anchored by two superb performances.",
    "Zhijian reuses pre-trained models.",
    "tedious",
    "Despite its flaws, the film's final act soars -- and earns every tear.",
]


def mean_pool(states, mask):
    m = mask.unsqueeze(-1).to(states.dtype)
    return (states * m).sum(1) / m.sum(1).clamp(min=1e-9)


def tiny():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=40, type_vocab_size=2,
                     hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, layer_norm_eps=1e-12)
    model = BertModel(cfg, add_pooling_layer=False).eval()
    ids = torch.randint(1, 100, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    ids = ids * mask  # pad id 0 where masked
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    tensors = {f"w.{k}": v.contiguous() for k, v in model.state_dict().items() if k != "embeddings.position_ids"}
    tensors.update({"ids": ids, "mask": mask, "pooled": mean_pool(out.last_hidden_state, mask)})
    for i, h in enumerate(out.hidden_states[1:]):
        tensors[f"block.{i}"] = h.contiguous()
    save_file(tensors, os.path.join(OUT, "bert_tiny.safetensors"))


def minilm():
    if not os.path.exists(os.path.join(MINILM, "model.safetensors")):
        sys.exit(f"{MINILM}/model.safetensors missing: run `cargo xtask fetch all-minilm-l6-v2` first")
    tok = Tokenizer.from_file(os.path.join(MINILM, "tokenizer.json"))
    tok.no_truncation()
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(SENTENCES)
    ids = torch.tensor([e.ids for e in enc])
    mask = torch.tensor([e.attention_mask for e in enc])
    cfg = BertConfig.from_json_file(os.path.join(MINILM, "config.json"))
    model = BertModel(cfg, add_pooling_layer=False).eval()
    from safetensors.torch import load_file
    missing, _ = model.load_state_dict(load_file(os.path.join(MINILM, "model.safetensors")), strict=False)
    assert not missing, missing
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    save_file({
        "ids": ids, "mask": mask,
        "block.0": out.hidden_states[1].contiguous(),
        "block.5": out.hidden_states[6].contiguous(),
        "pooled": mean_pool(out.last_hidden_state, mask),
    }, os.path.join(OUT, "minilm_golden.safetensors"))


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    tiny()
    minilm()
    print(f"wrote golden files under {OUT}")
