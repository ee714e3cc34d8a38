#!/usr/bin/env python3
"""Fixtures for zhijian-core's `.pth` reader (run by `cargo xtask fixtures`).

Writes to crates/zhijian-core/tests/fixtures/:

- `tiny_legacy.pth`: the checkpoint below saved in PyTorch's legacy non-zip
  pickle layout (`_use_new_zipfile_serialization=False`), the layout of the
  EfficientNet-Lite0 weights we use;
- `tiny_zip.pth`: the same checkpoint in today's default zip layout;
- `tiny_expected.safetensors`: what the reader must return, written by the
  `safetensors` package: every tensor made contiguous, under its flattened
  (dot-joined) name, in the checkpoint's order. The int entry `step` is not a
  tensor, so it is absent here and the reader reports it as skipped.

The checkpoint covers what a reader can get wrong: every common dtype, a
transposed (non-contiguous) tensor, two views of one storage at an offset, a
0-d tensor, an `nn.Parameter`, a nested dict, an empty tensor, and entries that
are not tensors (an int, a string inside a list, an empty dict).
"""
import os
from collections import OrderedDict

import torch
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "crates", "zhijian-core", "tests", "fixtures")


def checkpoint():
    g = torch.Generator().manual_seed(0)
    base = torch.arange(24, dtype=torch.float32) / 8 - 1
    nested = OrderedDict()
    nested["weight"] = torch.randn(3, 2, generator=g)
    nested["inner"] = {"bias": torch.randn(2, generator=g).double()}
    ck = OrderedDict()
    ck["f32"] = torch.randn(2, 3, generator=g)
    ck["f64"] = torch.randn(4, generator=g, dtype=torch.float64)
    ck["f16"] = torch.randn(2, 2, generator=g).half()
    ck["bf16"] = torch.randn(3, generator=g).bfloat16()
    ck["i64"] = torch.tensor([[-3, 0], [7, 2**40]], dtype=torch.int64)
    ck["i32"] = torch.tensor([1, -2, 3], dtype=torch.int32)
    ck["i8"] = torch.tensor([-128, 0, 127], dtype=torch.int8)
    ck["u8"] = torch.tensor([0, 1, 255], dtype=torch.uint8)
    ck["mask"] = torch.tensor([True, False, True, True])
    # A view with swapped strides (stride (1, 4)) whose storage is the 3×4 original.
    ck["transposed"] = torch.randn(3, 4, generator=g).t()
    # Two views of one 24-element storage: rows 1..3 as 2×4, and a strided slice at offset 5.
    ck["view_a"] = base.view(6, 4)[1:3]
    ck["view_b"] = base[5:17:3]
    ck["scalar"] = torch.tensor(2.5)
    ck["empty"] = torch.zeros(0, 3)
    ck["param"] = torch.nn.Parameter(torch.randn(2, 2, generator=g))
    ck["block"] = nested
    ck["step"] = 7
    # A list mixing a tensor and a string, and an empty dict: `aux.0` is a
    # tensor, `aux.1` and `note` are skipped.
    ck["aux"] = [torch.tensor([1.5, -0.5]), "text"]
    ck["note"] = {}
    return ck


def flatten(obj, prefix=""):
    out = OrderedDict()
    for k, v in obj.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, name + "."))
        elif isinstance(v, list):
            out.update(flatten(dict(enumerate(v)), name + "."))
        elif isinstance(v, torch.Tensor):
            out[name] = v.detach().contiguous().clone()
    return out


def main():
    os.makedirs(OUT, exist_ok=True)
    ck = checkpoint()
    assert not ck["transposed"].is_contiguous()
    assert ck["view_a"].untyped_storage().data_ptr() == ck["view_b"].untyped_storage().data_ptr()
    torch.save(ck, os.path.join(OUT, "tiny_legacy.pth"), _use_new_zipfile_serialization=False)
    torch.save(ck, os.path.join(OUT, "tiny_zip.pth"))
    save_file(flatten(ck), os.path.join(OUT, "tiny_expected.safetensors"))
    # The round trip through torch itself must agree with what we expect.
    for name in ("tiny_legacy.pth", "tiny_zip.pth"):
        back = flatten(torch.load(os.path.join(OUT, name), weights_only=False))
        for k, v in flatten(ck).items():
            assert torch.equal(back[k], v), (name, k)
    print(f"wrote tiny_legacy.pth, tiny_zip.pth, tiny_expected.safetensors to {OUT}")


if __name__ == "__main__":
    main()
