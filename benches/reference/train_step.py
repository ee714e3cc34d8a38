#!/usr/bin/env python3
"""Times full fine-tuning steps of MiniLM-L6 in PyTorch + transformers, the
same job `cargo run --example train_step -- full_finetune 50 8` times in zhijian:
batch 32 of random tokens, all real (no padding), mean pooling, a 2-class
head, AdamW (lr 5e-5, weight decay 0.01), gradient clipping at 1.0, fp32.

Run with the set-up's venv, after `cargo xtask fetch all-minilm-l6-v2`:
    ~/.cache/zhijian/venv/bin/python benches/reference/train_step.py [seq_len] [steps]
"""
import os
import sys
import time

import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertModel


def main():
    seq = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    cache = os.environ.get("ZHIJIAN_CACHE", os.path.expanduser("~/.cache/zhijian/assets"))
    weights = os.path.join(cache, "all-minilm-l6-v2")
    torch.manual_seed(0)
    model = BertModel(BertConfig.from_json_file(os.path.join(weights, "config.json")), add_pooling_layer=False)
    model.load_state_dict(load_file(os.path.join(weights, "model.safetensors")), strict=False)
    head = torch.nn.Linear(model.config.hidden_size, 2)
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=5e-5, weight_decay=0.01)
    ids = torch.randint(1000, 30000, (32, seq))
    mask = torch.ones_like(ids)
    labels = torch.randint(0, 2, (32,))
    model.train()
    print(f"threads {torch.get_num_threads()}, attention {model.config._attn_implementation}")
    for step in range(steps):
        start = time.perf_counter()
        states = model(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        loss = torch.nn.functional.cross_entropy(head(pooled), labels)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        print(f"step {step}: {time.perf_counter() - start:.3f}s")


if __name__ == "__main__":
    main()
