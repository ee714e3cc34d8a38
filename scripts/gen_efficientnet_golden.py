#!/usr/bin/env python3
"""Golden files for the EfficientNet-Lite backbone's parity tests (run by `cargo xtask fixtures`).

Builds timm's `tf_efficientnet_lite` architecture (TensorFlow "same" padding,
BatchNorm eps 1e-3) at reduced width and depth so the fixture stays small,
with random weights and random BatchNorm statistics, renames its keys to the
lukemelas names the shipped Lite0 weights use, and writes to
crates/zhijian-backbones/tests/fixtures/efficientnet_lite_tiny.safetensors:
the state dict (`w.` prefix), and for two input sizes (an odd one, where
"same" padding is asymmetric) the stage outputs, pooled features and logits
in evaluation mode.
"""
import os
from functools import partial

import torch
from safetensors.torch import save_file
from timm.models._efficientnet_builder import decode_arch_def, round_channels
from timm.models.efficientnet import EfficientNet
from golden import randomize_batchnorm, record_outputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "crates", "zhijian-backbones", "tests", "fixtures", "efficientnet_lite_tiny.safetensors")

# timm's `_gen_efficientnet_lite` arch, built directly to choose the multipliers.
ARCH = [
    ["ds_r1_k3_s1_e1_c16"],
    ["ir_r2_k3_s2_e6_c24"],
    ["ir_r2_k5_s2_e6_c40"],
    ["ir_r3_k3_s2_e6_c80"],
    ["ir_r3_k5_s1_e6_c112"],
    ["ir_r4_k5_s2_e6_c192"],
    ["ir_r1_k3_s1_e6_c320"],
]
WIDTH, DEPTH = 0.25, 0.5


def lukemelas_names(model):
    """timm key → lukemelas key (blocks numbered across stages)."""
    names = {"conv_stem": "_conv_stem", "bn1": "_bn0", "conv_head": "_conv_head", "bn2": "_bn1", "classifier": "_fc"}
    ds = {"conv_dw": "_depthwise_conv", "bn1": "_bn1", "conv_pw": "_project_conv", "bn2": "_bn2"}
    ir = {"conv_pw": "_expand_conv", "bn1": "_bn0", "conv_dw": "_depthwise_conv", "bn2": "_bn1", "conv_pwl": "_project_conv", "bn3": "_bn2"}
    flat = [(s, j) for s, stage in enumerate(model.blocks) for j in range(len(stage))]
    out = {}
    for key, value in model.state_dict().items():
        parts = key.split(".")
        if parts[0] == "blocks":
            n = flat.index((int(parts[1]), int(parts[2])))
            table = ir if hasattr(model.blocks[int(parts[1])][int(parts[2])], "conv_pwl") else ds
            out[".".join(["_blocks", str(n), table[parts[3]]] + parts[4:])] = value.clone()
        else:
            out[".".join([names[parts[0]]] + parts[1:])] = value.clone()
    return out


def main():
    torch.manual_seed(0)
    model = EfficientNet(
        block_args=decode_arch_def(ARCH, DEPTH, fix_first_last=True),
        num_features=1280,
        stem_size=32,
        fix_stem=True,
        round_chs_fn=partial(round_channels, multiplier=WIDTH),
        act_layer=torch.nn.ReLU6,
        norm_layer=partial(torch.nn.BatchNorm2d, eps=1e-3),
        pad_type="same",
        num_classes=7,
    )
    randomize_batchnorm(model)
    tensors = {f"w.{k}": v for k, v in lukemelas_names(model).items()}
    model.eval()
    for size in (32, 45):
        images = torch.randn(2, 3, size, size)
        tensors[f"images{size}"] = images
        record_outputs(model, model.blocks, images, str(size), tensors)
    save_file(tensors, OUT)
    print(f"wrote {OUT}: {sum(v.numel() for k, v in tensors.items() if k.startswith('w.'))} weights")


if __name__ == "__main__":
    main()
