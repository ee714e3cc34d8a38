#!/usr/bin/env python3
"""Logits of adapters written by `zhijian export --peft DIR`, computed by
Hugging Face transformers + peft (the parity test in
crates/zhijian-cli/tests/it/peft.rs runs this with the set-up's venv).

    peft_parity.py --base ASSET_DIR --inputs TOKENS.safetensors \
        [--adapter NAME=DIR ...] [--make KIND=DIR ...] --out LOGITS.safetensors

ASSET_DIR holds the base model's `config.json` and `model.safetensors`
(zhijian's asset folder, e.g. ~/.cache/zhijian/assets/all-minilm-l6-v2);
TOKENS holds `ids` and `mask` ([batch, seq] int64, zhijian's tokenisation).
For each adapter the base `BertModel` is loaded afresh, wrapped with
`peft.PeftModel.from_pretrained(base, DIR)`, run in eval mode, pooled as
`zhijian_head.json` says (mean over real tokens, as sentence-transformers, or
the [CLS] token) and passed through the head in `zhijian_head.safetensors`.
OUT gets one `[batch, classes]` tensor per NAME, and `<NAME>.peft_type` is
printed with the number of adapted modules PEFT created, so a silently ignored
adapter shows.

`--make KIND=DIR` goes the other way, for `zhijian import`: PEFT itself
creates an adapter of KIND (`lora`: suffix and regex targets, a rank and an
alpha pattern; `dora`: DoRA with rsLoRA; `ia3`: regex targets) on the base,
with every weight drawn at random (seeded), saves it to DIR with
`save_pretrained`, and OUT gets the model's mean-pooled features `[batch,
hidden]` under `made-KIND`. Offline: nothing is downloaded.
"""
import argparse
import json
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import BertModel  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)
hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()


def logits(base_dir, adapter_dir, ids, mask):
    base = BertModel.from_pretrained(base_dir, torch_dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir)
    model.eval()
    adapted = sum(1 for name, _ in model.named_modules() if name.endswith((".lora_A", ".ia3_l")))
    with open(os.path.join(adapter_dir, "zhijian_head.json")) as f:
        info = json.load(f)
    head = load_file(os.path.join(adapter_dir, "zhijian_head.safetensors"))
    with torch.no_grad():
        states = model(input_ids=ids, attention_mask=mask).last_hidden_state
        if info["pooling"] == "mean":
            m = mask.unsqueeze(-1).to(states.dtype)
            pooled = (states * m).sum(1) / m.sum(1).clamp(min=1e-9)
        elif info["pooling"] == "cls":
            pooled = states[:, 0]
        else:
            raise SystemExit(f"peft_parity: unknown pooling {info['pooling']!r} in {adapter_dir}")
        out = pooled @ head["weight"].T + head["bias"]
    return out, model.peft_config["default"].peft_type, adapted


MAKE = {
    "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "intermediate.dense"],
                               rank_pattern={r"layer\.[0-2]\.attention\.self\.value": 2},
                               alpha_pattern={"layer.0.attention.self.query": 32}),
    "dora": lambda: LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], use_dora=True, use_rslora=True),
    "ia3": lambda: IA3Config(target_modules=r".*\.(key|value|\d\.output\.dense)", feedforward_modules=r".*\.\d\.output\.dense"),
}


def make(base_dir, kind, out_dir, ids, mask):
    """A PEFT adapter of `kind` with random weights, saved to `out_dir`; its mean-pooled features."""
    torch.manual_seed(0)
    config = MAKE[kind]()
    config.task_type = "FEATURE_EXTRACTION"
    model = get_peft_model(BertModel.from_pretrained(base_dir, torch_dtype=torch.float32), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.05)
            elif "lora_A" in name:
                p.copy_(torch.randn_like(p) * 0.05)
            elif "lora_magnitude" in name or "ia3_l" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(out_dir)
    with torch.no_grad():
        states = model(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(states.dtype)
        return (states * m).sum(1) / m.sum(1).clamp(min=1e-9)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True)
    parser.add_argument("--inputs", required=True)
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR")
    parser.add_argument("--make", action="append", default=[], metavar="KIND=DIR")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    tokens = load_file(args.inputs)
    ids, mask = tokens["ids"].long(), tokens["mask"].long()
    results = {}
    for spec in args.adapter:
        name, _, path = spec.partition("=")
        out, peft_type, adapted = logits(args.base, path, ids, mask)
        print(f"{name}: {peft_type} adapter from {path}, {adapted} adapted modules, logits {tuple(out.shape)}")
        results[name] = out.contiguous()
    for spec in args.make:
        kind, _, path = spec.partition("=")
        results[f"made-{kind}"] = make(args.base, kind, path, ids, mask).contiguous()
        print(f"made-{kind}: made by peft into {path}, features {tuple(results[f'made-{kind}'].shape)}")
    save_file(results, args.out)


if __name__ == "__main__":
    main()
