#!/usr/bin/env python3
"""Golden files for the MPNet tests of the BERT-family backbone (run by `cargo xtask fixtures`).

Writes, under crates/zhijian-backbones/tests/fixtures/:
  mpnet_tiny.config.json   the config.json transformers writes for a tiny
                           MPNetConfig (model_type "mpnet", 32 relative buckets);
  mpnet_tiny.safetensors   that random-init 2-layer MPNetModel's weights (`w.`
                           prefix), fixed ids/mask (right padding with the pad
                           id 1; 140 tokens, so that relative distances fill the
                           exact buckets 0..7 and the log-spaced ones, and pass
                           128, where transformers clamps to the last bucket),
                           every layer's output, the mean-pooled features and
                           transformers' own buckets for 140 tokens;
  mpnet_golden.safetensors the pre-trained check, from the fetched
                           all-mpnet-base-v2 asset (skipped, with a note, when it
                           is not fetched): ids/mask of SENTENCES tokenised by
                           Hugging Face `tokenizers` from the shipped
                           tokenizer.json, transformers' MPNetModel outputs with
                           sentence-transformers' pipeline (mean pooling, then L2
                           normalisation: the asset's modules.json), and the
                           cosine similarity of each of PAIRS.

MPNet differs from BERT where the backbone must follow it: position ids as
RoBERTa's (padding index 1), no token types, and a relative position bias
(`encoder.relative_attention_bias`, [32, heads]) added to every layer's scores.

The reference is Hugging Face transformers, run offline; no hub access.
"""
import os

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from transformers import MPNetConfig, MPNetModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "crates", "zhijian-backbones", "tests", "fixtures")
CACHE = os.environ.get("ZHIJIAN_CACHE", os.path.expanduser("~/.cache/zhijian/assets"))
MPNET = os.path.join(CACHE, "all-mpnet-base-v2")

SENTENCES = [
    "A man is playing a guitar.",
    "Someone is strumming an acoustic guitar on stage.",
    "A woman is slicing vegetables in the kitchen.",
    "The new movie is awesome.",
    "This film is absolutely fantastic.",
    "The stock market fell sharply on Monday.",
    "How do I bake bread at home?",
    "What is a simple recipe for homemade bread?",
]
# Index pairs into SENTENCES: paraphrases, related and unrelated sentences.
PAIRS = [(0, 1), (0, 2), (3, 4), (3, 5), (6, 7), (6, 5), (1, 4), (2, 7)]


def mean_pool(states, mask):
    m = mask.unsqueeze(-1).to(states.dtype)
    return (states * m).sum(1) / m.sum(1).clamp(min=1e-9)


def tiny():
    torch.manual_seed(0)
    cfg = MPNetConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=160, relative_attention_num_buckets=32,
                      layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    model = MPNetModel(cfg, add_pooling_layer=False).eval()
    # Scales that make a wrong position offset or a wrong bucket show in the
    # outputs (the default init, N(0, 0.02), would hide them).
    with torch.no_grad():
        model.embeddings.position_embeddings.weight.normal_(0.0, 0.5)
        model.encoder.relative_attention_bias.weight.normal_(0.0, 1.0)
    ids = torch.randint(3, 50, (3, 140))
    mask = torch.ones_like(ids)
    mask[1, 100:] = 0
    mask[2, 9:] = 0
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, cfg.pad_token_id))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    tensors = {f"w.{k}": v.contiguous() for k, v in model.state_dict().items() if k != "embeddings.position_ids"}
    tensors.update({"ids": ids, "mask": mask, "pooled": mean_pool(out.last_hidden_state, mask)})
    for i, h in enumerate(out.hidden_states[1:]):
        tensors[f"block.{i}"] = h.contiguous()
    # transformers' own buckets for 140 tokens, to check ours against directly.
    pos = torch.arange(140)
    tensors["buckets"] = model.encoder.relative_position_bucket(pos[None, :] - pos[:, None]).to(torch.uint8)
    save_file(tensors, os.path.join(OUT, "mpnet_tiny.safetensors"))
    cfg.to_json_file(os.path.join(OUT, "mpnet_tiny.config.json"))


def pretrained():
    if not os.path.exists(os.path.join(MPNET, "model.safetensors")):
        print(f"skipping mpnet_golden.safetensors: {MPNET}/model.safetensors missing "
              "(run `cargo xtask fetch all-mpnet-base-v2` first)")
        return
    tok = Tokenizer.from_file(os.path.join(MPNET, "tokenizer.json"))
    tok.enable_truncation(384)  # sentence-transformers' max_seq_length for this model
    tok.enable_padding(pad_id=1, pad_token="<pad>")
    enc = tok.encode_batch(SENTENCES)
    ids = torch.tensor([e.ids for e in enc])
    mask = torch.tensor([e.attention_mask for e in enc])
    cfg = MPNetConfig.from_json_file(os.path.join(MPNET, "config.json"))
    model = MPNetModel(cfg, add_pooling_layer=False).eval()
    missing, _ = model.load_state_dict(load_file(os.path.join(MPNET, "model.safetensors")), strict=False)
    assert not missing, missing
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    pooled = mean_pool(out.last_hidden_state, mask)
    embeddings = torch.nn.functional.normalize(pooled, p=2, dim=1)
    pairs = torch.tensor(PAIRS)
    cosines = (embeddings[pairs[:, 0]] * embeddings[pairs[:, 1]]).sum(1)
    save_file({"ids": ids, "mask": mask, "pooled": pooled, "embeddings": embeddings, "pairs": pairs, "cosines": cosines},
              os.path.join(OUT, "mpnet_golden.safetensors"))
    for (a, b), c in sorted(zip(PAIRS, cosines.tolist()), key=lambda p: -p[1]):
        print(f"  cos {c:.4f}  {SENTENCES[a]!r} ~ {SENTENCES[b]!r}")


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    tiny()
    pretrained()
    print(f"wrote mpnet golden files under {OUT}")
