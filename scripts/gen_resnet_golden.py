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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "crates", "zhijian-backbones", "tests", "fixtures", "resnet_tiny.safetensors")


def main():
    torch.manual_seed(0)
    images = torch.randn(3, 3, 40, 40)
    tensors = {"images": images}
    for name, block in (("basic", BasicBlock), ("bottleneck", Bottleneck)):
        # timm's plain 7×7 stem is always 64 wide (stem_width applies to deep stems).
        model = ResNet(block, layers=(2, 1, 1, 1), channels=(8, 12, 16, 20), num_classes=5)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.weight.normal_(1.0, 0.2)
                    m.bias.normal_(0.0, 0.2)
                    m.running_mean.normal_(0.0, 0.2)
                    m.running_var.uniform_(0.5, 1.5)
        # Cloned: the training-mode pass below updates the live BatchNorm buffers in place.
        tensors.update({f"{name}.w.{k}": v.clone() for k, v in model.state_dict().items()})
        model.eval()
        stages = []
        hooks = [getattr(model, f"layer{i}").register_forward_hook(lambda _m, _i, o: stages.append(o)) for i in range(1, 5)]
        with torch.no_grad():
            features = model.forward_features(images)
            pooled = model.forward_head(features, pre_logits=True)
            logits = model.forward_head(features)
        for h in hooks:
            h.remove()
        for i, s in enumerate(stages):
            tensors[f"{name}.block.{i}"] = s.contiguous()
        tensors[f"{name}.pooled"] = pooled.contiguous()
        tensors[f"{name}.logits"] = logits.contiguous()
        model.train()
        with torch.no_grad():
            tensors[f"{name}.train.logits"] = model(images).contiguous()
        tensors[f"{name}.train.bn1.running_mean"] = model.bn1.running_mean.clone()
    save_file(tensors, OUT)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
