#!/usr/bin/env python3
"""Golden files for the ResNet backbone's parity tests (run by `cargo xtask fixtures`).

Builds narrow timm ResNets (same key names and block math as torchvision's) with
random weights and random BatchNorm statistics, and writes to
crates/zhijian-backbones/tests/fixtures/resnet_tiny.safetensors, per block type
(`basic.` / `bottleneck.`): the state dict (`w.` prefix), evaluation-mode stage
outputs, pooled features and logits for a fixed batch, and after one
training-mode forward pass the logits and the stem's updated running mean.
"""
import os

import torch
from safetensors.torch import save_file
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from golden import randomize_batchnorm, record_outputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "crates", "zhijian-backbones", "tests", "fixtures", "resnet_tiny.safetensors")


def main():
    torch.manual_seed(0)
    images = torch.randn(3, 3, 40, 40)
    tensors = {"images": images}
    for name, block in (("basic", BasicBlock), ("bottleneck", Bottleneck)):
        # timm's plain 7×7 stem is always 64 wide (stem_width applies to deep stems).
        model = ResNet(block, layers=(2, 1, 1, 1), channels=(8, 12, 16, 20), num_classes=5)
        randomize_batchnorm(model)
        # Cloned: the training-mode pass below updates the live BatchNorm buffers in place.
        tensors.update({f"{name}.w.{k}": v.clone() for k, v in model.state_dict().items()})
        model.eval()
        record_outputs(model, [getattr(model, f"layer{i}") for i in range(1, 5)], images, name, tensors)
        model.train()
        with torch.no_grad():
            tensors[f"{name}.train.logits"] = model(images).contiguous()
        tensors[f"{name}.train.bn1.running_mean"] = model.bn1.running_mean.clone()
    save_file(tensors, OUT)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
