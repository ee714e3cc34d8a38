#!/usr/bin/env python3
"""Golden files for the RoBERTa-family test of the BERT backbone (run by `cargo xtask fixtures`).

Writes, under crates/zhijian-backbones/tests/fixtures/:
  roberta_tiny.config.json   the config.json transformers writes for a tiny
                             RobertaConfig (model_type "roberta", pad_token_id 1,
                             one token type, LayerNorm eps 1e-5);
  roberta_tiny.safetensors   that random-init 2-layer RobertaModel's weights
                             (`w.` prefix), fixed ids/mask (right padding with
                             the pad id), every layer's output and the
                             mean-pooled features.

RoBERTa differs from BERT where the backbone must follow it: position ids
start at pad_token_id + 1 (padding positions get pad_token_id), so position
embeddings 0 and 1 are never used by real tokens.

The reference is Hugging Face transformers, run offline; no hub access.
"""
import os

import torch
from safetensors.torch import save_file
from transformers import RobertaConfig, RobertaModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "crates", "zhijian-backbones", "tests", "fixtures")


def mean_pool(states, mask):
    m = mask.unsqueeze(-1).to(states.dtype)
    return (states * m).sum(1) / m.sum(1).clamp(min=1e-9)


def main():
    torch.manual_seed(0)
    cfg = RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=42, type_vocab_size=1,
                        pad_token_id=1, bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5)
    model = RobertaModel(cfg, add_pooling_layer=False).eval()
    # Non-trivial position embeddings everywhere, the padding row included, so
    # that an off-by-one offset shows in the outputs.
    with torch.no_grad():
        model.embeddings.position_embeddings.weight.normal_(0.0, 0.5)
    ids = torch.randint(3, 100, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, cfg.pad_token_id))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    skip = ("embeddings.position_ids", "embeddings.token_type_ids")
    tensors = {f"w.{k}": v.contiguous() for k, v in model.state_dict().items() if k not in skip}
    tensors.update({"ids": ids, "mask": mask, "pooled": mean_pool(out.last_hidden_state, mask)})
    for i, h in enumerate(out.hidden_states[1:]):
        tensors[f"block.{i}"] = h.contiguous()
    save_file(tensors, os.path.join(OUT, "roberta_tiny.safetensors"))
    cfg.to_json_file(os.path.join(OUT, "roberta_tiny.config.json"))


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    main()
    print(f"wrote roberta_tiny golden files under {OUT}")
