#!/usr/bin/env python3
"""Golden files for the ViT backbone's parity tests (run by `cargo xtask fixtures`).

Builds small timm VisionTransformers with random initial weights (no hub access),
and writes to crates/zhijian-backbones/tests/fixtures/vit_tiny.safetensors:
weights (`token.` / `avg.` prefixes: class-token and average pooling), a fixed
image batch at the training size (32 px) and at 48 px (position embeddings
resampled), every block's output, the pooled features and the logits.
"""
import os

import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer
from golden import record_outputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "crates", "zhijian-backbones", "tests", "fixtures", "vit_tiny.safetensors")


def build(global_pool):
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0,
                             num_classes=5, global_pool=global_pool, dynamic_img_size=True).eval()


def main():
    torch.manual_seed(0)
    tensors = {"images32": torch.randn(2, 3, 32, 32), "images48": torch.randn(2, 3, 48, 48)}
    for pool in ("token", "avg"):
        model = build(pool)
        # Random, not timm's near-zero init, so the class token and biases matter.
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        tensors.update({f"{pool}.w.{k}": v.contiguous() for k, v in model.state_dict().items()})
        record_outputs(model, model.blocks, tensors["images32"], f"{pool}.32", tensors)
        record_outputs(model, model.blocks, tensors["images48"], f"{pool}.48", tensors)
    save_file(tensors, OUT)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
