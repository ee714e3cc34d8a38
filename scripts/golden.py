"""Shared pieces of the vision golden-file scripts (`gen_*_golden.py`)."""
import torch


def randomize_batchnorm(model):
    """Random BatchNorm scales, shifts and running statistics, so that a wrong
    epsilon, a swapped statistic or a skipped layer shows in the outputs."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 1.5)


def record_outputs(model, stages, images, prefix, tensors):
    """Runs a timm model on `images` without gradients and stores, under
    `prefix`, the output of each module of `stages` (`.block.i`), the pooled
    features (`.pooled`) and the logits (`.logits`)."""
    outputs = []
    hooks = [s.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for s in stages]
    with torch.no_grad():
        features = model.forward_features(images)
        pooled = model.forward_head(features, pre_logits=True)
        logits = model.forward_head(features)
    for h in hooks:
        h.remove()
    for i, out in enumerate(outputs):
        tensors[f"{prefix}.block.{i}"] = out.contiguous()
    tensors[f"{prefix}.pooled"] = pooled.contiguous()
    tensors[f"{prefix}.logits"] = logits.contiguous()
