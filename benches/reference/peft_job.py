#!/usr/bin/env python3
"""PyTorch's side of `cargo xtask reference`: the same training jobs as
`examples/reference_job.rs` runs in zhijian, written the usual PyTorch way with
Hugging Face transformers (`BertModel`) and peft (`LoraConfig`).

Everything a job needs comes from the file `reference_job prepare` writes: the
training and test tokens (zhijian's own tokenisation and split of Rotten
Tomatoes), the initial head and LoRA matrices, and, in its metadata, the plan:
the hyper-parameters of `configs/demo.toml` as zhijian parsed them. Both sides
therefore train on the same tokens, in the same order (zhijian's engine draws
`randperm` right after `manual_seed(seed)`, in the same LibTorch; so does this
script), from the same starting point, with the same optimiser and schedule.

Subcommands (run with the set-up's venv; nothing is downloaded):

    peft_job.py job --method linear_probe|full_finetune|lora --precision fp32|bf16 [--epochs E] [--group-by-length] --data FILE --out JSON
    peft_job.py ceiling --out JSON
    peft_job.py flops-check --data FILE --out JSON
    peft_job.py profile --method full_finetune|lora --precision fp32|bf16 [--steps N] --data FILE --out JSON

`job` trains for one epoch over the prepared examples (or `--epochs E`,
evaluating the test split after each: the `curve` of the time-to-accuracy
jobs) and writes the same JSON fields as zhijian's job. `linear_probe` runs
the frozen encoder once over both splits (under no_grad, in the job's
precision; that time counts as training time) and trains the head on the
pooled features, PyTorch's fastest way to train a probe. `bf16` wraps forward and loss in
`torch.autocast("cpu", dtype=torch.bfloat16)` (PyTorch's fastest CPU setting
here: bf16 matmuls run ~4x fp32); evaluation then runs under it too.

Model FLOPs follow one convention on both sides (also in reference_job.rs and
the README): a matmul of [m, k] by [k, n] costs 2mkn; its backward costs 2mkn
for the input gradient plus 2mkn for the weight gradient when the weight trains.
Per batch of `rows` sequences padded to `seq` tokens (T = rows * seq):

    2 T (2 P_frozen + 3 P_trained) + 12 L h rows seq^2 + 6 h C rows

where P are the weights of the linear layers applied per token (frozen or
trained; for LoRA the frozen ones are the whole encoder, the trained ones the
A and B matrices), the second term is attention's two matmuls (QK^T and AV: 4 L
h seq^2 per sequence forward, twice that backward since both operands need
gradients) and the last the classification head. Input gradients are counted
for every layer: autograd skips a few (LoRA's first layer's frozen
projections), which `flops-check` measures with torch's FlopCounterMode.
"""
import argparse
import json
import math
import os
import resource
import sys
import time
import warnings

# Offline: the weights come from zhijian's asset cache, never from the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

# peft calls an API transformers 5 deprecates; the warning says nothing about this job.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def read_data(path):
    """The prepared tensors and the plan (JSON in the file's metadata)."""
    if not os.path.isfile(path):
        sys.exit(f"peft_job: no data file {path}; make it with "
                 "`cargo run --release --example reference_job -- prepare --steps N --out FILE`")
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    if "plan" not in meta:
        sys.exit(f"peft_job: {path} has no plan in its metadata; was it written by `reference_job prepare`?")
    return load_file(path), json.loads(meta["plan"])


def schedule_factor(kind, step, total, warmup):
    """zhijian's `Schedule::factor`: linear warm-up (the first step already
    trains, at 1/warmup), then cosine, linear or constant."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(total - warmup, 1)
    progress = min((step - warmup) / span, 1.0)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "linear":
        return 1.0 - progress
    if kind == "constant":
        return 1.0
    raise ValueError(f"unknown schedule {kind!r}")


def train_flops(rows, seq, plan, method):
    """Model FLOPs of one training step on `rows` sequences padded to `seq`
    tokens (the convention of the module docstring)."""
    b = plan["bert"]
    layers, h, inter, classes = b["num_hidden_layers"], b["hidden_size"], b["intermediate_size"], len(plan["classes"])
    encoder = layers * (4 * h * h + 2 * h * inter)
    if method == "full_finetune":
        frozen, trained = 0, encoder
    else:
        frozen, trained = encoder, plan["jobs"]["lora"]["adapter_params"]
    tokens = rows * seq
    return 2 * tokens * (2 * frozen + 3 * trained) + 12 * layers * h * rows * seq * seq + 6 * h * classes * rows


def trim(ids, mask, idx):
    """Rows `idx`, cut to their longest real sequence (as zhijian's `Input::select`)."""
    m = mask[idx]
    longest = max(int(m.sum(1).max()), 1)
    return ids[idx, :longest], m[:, :longest]


class Classifier(torch.nn.Module):
    """A BERT encoder, mean pooling over real tokens (zhijian's `Pooling::Mean`,
    as sentence-transformers) and a linear head."""

    def __init__(self, encoder, head):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, ids, mask):
        states = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * m).sum(1) / m.sum(1).clamp_min(1e-9)
        return self.head(pooled)


def build(plan, tensors, method):
    """MiniLM with its real weights, the prepared head (and LoRA matrices), and
    the parameters that train."""
    from transformers import BertConfig, BertModel

    for path in (plan["weights"]["config"], plan["weights"]["model"]):
        if not os.path.isfile(path):
            sys.exit(f"peft_job: no {path}; fetch it with `cargo xtask fetch {plan['weights']['asset']}`")
    config = BertConfig.from_json_file(plan["weights"]["config"])
    config._attn_implementation = "sdpa"
    encoder = BertModel(config, add_pooling_layer=False)
    state = load_file(plan["weights"]["model"])
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    # The checkpoint also holds the unused pooler and an old position_ids buffer.
    unexpected = [k for k in unexpected if not (k.startswith("pooler.") or k == "embeddings.position_ids")]
    if missing or unexpected:
        sys.exit(f"peft_job: checkpoint mismatch: missing {missing}, unexpected {unexpected}")
    head = torch.nn.Linear(config.hidden_size, len(plan["classes"]))
    with torch.no_grad():
        head.weight.copy_(tensors["init/head.weight"])
        head.bias.copy_(tensors["init/head.bias"])
    if method == "lora":
        from peft import LoraConfig, get_peft_model
        from peft.tuners.lora import LoraLayer

        lp = plan["jobs"]["lora"]
        lc = lp["methods"][0]
        sites = lp["lora_sites"]
        encoder = get_peft_model(encoder, LoraConfig(
            r=lc["rank"], lora_alpha=lc["alpha"], lora_dropout=lc["dropout"], target_modules=sites, bias="none"))
        found = []
        with torch.no_grad():
            for name, module in encoder.named_modules():
                if isinstance(module, LoraLayer):
                    site = name.removeprefix("base_model.model.")
                    module.lora_A["default"].weight.copy_(tensors[f"init/lora/{site}.lora_A"])
                    module.lora_B["default"].weight.copy_(tensors[f"init/lora/{site}.lora_B"])
                    found.append(site)
        if sorted(found) != sorted(sites):
            sys.exit(f"peft_job: peft adapted {sorted(found)}, zhijian {sorted(sites)}")
    elif method == "linear_probe":
        for p in encoder.parameters():
            p.requires_grad_(False)
    else:
        for p in encoder.parameters():
            p.requires_grad_(True)
    model = Classifier(encoder, head)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return model, trainable


def evaluate(model, ids, mask, labels, batch_size, autocast):
    """Top-1 on the test split, in batches of similar length (as zhijian's `predict`)."""
    model.eval()
    order = mask.sum(1).argsort(stable=True)
    correct = 0
    with torch.no_grad(), autocast():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            x, m = trim(ids, mask, idx)
            correct += int((model(x, m).argmax(1) == labels[idx]).sum())
    return correct / len(labels)


def grouped_by_length(order, mask, batch):
    """zhijian's `grouped_by_length` (Hugging Face's LengthGroupedSampler):
    runs of 50 batches of the shuffled order sorted by length, longest first,
    the run holding the longest review first."""
    lengths = mask.sum(1)[order]
    mega = 50 * batch
    groups = []
    for start in range(0, len(order), mega):
        chunk = order[start:start + mega]
        by_length = lengths[start:start + mega].sort(stable=True, descending=True).indices
        groups.append(chunk[by_length])
    longest = max(range(len(groups)), key=lambda i: (int(mask[groups[i][0]].sum()), -i))
    groups[0], groups[longest] = groups[longest], groups[0]
    return torch.cat(groups)


def pooled_features(model, ids, mask, batch_size, autocast):
    """The frozen encoder's mean-pooled features of every example, in order
    (batches of similar length, as zhijian's `cache_features`), in fp32."""
    model.eval()
    order = mask.sum(1).argsort(stable=True)
    out = torch.empty(len(ids), model.head.in_features)
    with torch.no_grad(), autocast():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            x, m = trim(ids, mask, idx)
            states = model.encoder(input_ids=x, attention_mask=m).last_hidden_state.float()
            mm = m.unsqueeze(-1).float()
            out[idx] = (states * mm).sum(1) / mm.sum(1).clamp_min(1e-9)
    return out


def adamw(trainable, cfg):
    """zhijian's AdamW: decoupled decay on matrices only, not on biases and norm scales;
    ATen's fused kernel, which zhijian runs too (one pass per tensor; PyTorch's
    default on CPU is the slower per-operation loop)."""
    opt_cfg = cfg["optimizer"]
    decay = [p for p in trainable if p.dim() >= 2]
    rest = [p for p in trainable if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg["weight_decay"]}, {"params": rest, "weight_decay": 0.0}],
        lr=cfg["lr"], betas=(opt_cfg["beta1"], opt_cfg["beta2"]), eps=opt_cfg["eps"], fused=True)


def job(args):
    """Trains over the prepared examples, evaluates, writes the JSON."""
    tensors, plan = read_data(args.data)
    jp = plan["jobs"][args.method]
    cfg = jp["train"]
    opt_cfg = cfg["optimizer"]
    if opt_cfg["kind"] != "adamw":
        sys.exit(f"peft_job: optimiser {opt_cfg['kind']} not supported (only adamw)")
    if plan["pooling"] != "mean":
        sys.exit(f"peft_job: pooling {plan['pooling']} not supported (only mean)")
    if cfg["label_smoothing"] != 0.0:
        sys.exit("peft_job: label smoothing not supported")
    epochs = args.epochs or cfg["epochs"]
    model, trainable = build(plan, tensors, args.method)
    opt = adamw(trainable, cfg)
    ids, mask, labels = tensors["train.ids"], tensors["train.mask"], tensors["train.labels"]
    test = (tensors["test.ids"], tensors["test.mask"], tensors["test.labels"])
    n, batch = len(labels), cfg["batch_size"]
    per_epoch = math.ceil(n / batch)
    total = per_epoch * epochs
    warmup = math.floor(cfg["warmup_ratio"] * total + 0.5)  # Rust's round(), half away from zero
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: schedule_factor(cfg["schedule"], k, total, warmup))
    bf16 = args.precision == "bf16"
    probe = args.method == "linear_probe"

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    label = f"pytorch {args.method} {args.precision}"
    start = time.perf_counter()
    if probe:
        features = pooled_features(model, ids, mask, cfg["eval_batch_size"], autocast)
        test_features = pooled_features(model, test[0], test[1], cfg["eval_batch_size"], autocast)
    feature_seconds = time.perf_counter() - start

    def test_top1():
        if probe:
            model.eval()
            with torch.no_grad(), autocast():
                return float((model.head(test_features).argmax(1) == test[2]).float().mean())
        return evaluate(model, *test, cfg["eval_batch_size"], autocast)

    model.train()
    torch.manual_seed(cfg["seed"])
    loss_sum, tokens, flops, step, eval_seconds, curve = 0.0, 0, 0, 0, 0.0, []
    for epoch in range(epochs):
        order = torch.randperm(n)
        if args.group_by_length and not probe:
            order = grouped_by_length(order, mask, batch)
        loss_sum = 0.0
        for k in range(per_epoch):
            idx = order[k * batch:(k + 1) * batch]
            with autocast():
                if probe:
                    logits = model.head(features[idx])
                else:
                    x, m = trim(ids, mask, idx)
                    logits = model(x, m)
                loss = torch.nn.functional.cross_entropy(logits, labels[idx])
            opt.zero_grad()
            loss.backward()
            if cfg["grad_clip"] > 0:
                torch.nn.utils.clip_grad_norm_(trainable, cfg["grad_clip"])
            opt.step()
            sched.step()
            value = loss.item()
            if not math.isfinite(value):
                sys.exit(f"peft_job: training diverged (loss {value}) at step {step}")
            loss_sum += value
            step += 1
            if not probe and epoch == 0:
                tokens += x.numel()
                flops += train_flops(x.shape[0], x.shape[1], plan, args.method)
            if not probe and (step % 10 == 0 or step == total):
                rate = step * batch / (time.perf_counter() - start - eval_seconds)
                print(f"  {label}: step {step}/{total}  loss {loss_sum / (k + 1):.4f}  {rate:.1f} samples/s",
                      flush=True)
        if epochs > 1:
            t = time.perf_counter()
            trained = t - start - eval_seconds
            top1 = test_top1()
            eval_seconds += time.perf_counter() - t
            curve.append({"epoch": epoch + 1, "seconds": trained, "test_top1": top1})
            print(f"  {label}: epoch {epoch + 1}/{epochs}  test top-1 {100 * top1:.2f}%", flush=True)
            model.train()
    # As zhijian's: the training loop alone (the curve's times include the features).
    seconds = time.perf_counter() - start - eval_seconds - feature_seconds
    top1 = test_top1()
    samples = min(n, per_epoch * batch) * epochs
    counted = epochs == 1 and not probe
    out = {
        "side": "pytorch",
        "method": args.method,
        "precision": args.precision,
        "steps": total,
        "samples": samples,
        "seconds": seconds,
        "feature_seconds": feature_seconds,
        "epochs": epochs,
        "group_by_length": args.group_by_length,
        "curve": curve,
        "samples_per_s": samples / seconds,
        "final_loss": loss_sum / per_epoch,
        "test_top1": top1,
        "test_n": len(test[2]),
        "trainable_params": sum(p.numel() for p in trainable),
        "total_params": sum(p.numel() for p in model.parameters()),
        "tokens": tokens if counted else None,
        "model_flops": flops if counted else None,
        "model_flops_per_s": flops / seconds if counted else None,
        # ru_maxrss is KiB on Linux.
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                     "peft": __import__("peft").__version__ if args.method == "lora" else None},
    }
    write_json(args.out, out)
    print(f"  {label}: {out['samples_per_s']:.1f} samples/s, test top-1 {100 * top1:.2f}%", flush=True)


def matmul_rate(n, dtype, min_seconds=0.4, trials=3, shape=None):
    """Best sustained FLOP/s of `n`x`n` matmuls (or `[m, k]` by `[k, n]` for
    `shape = (m, k, n)`) over `trials` timed runs of at least `min_seconds`
    each, after a warm-up."""
    m, k, n = shape or (n, n, n)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(k, n, generator=g).to(dtype)
    for _ in range(2):
        torch.matmul(a, b)
    t = time.perf_counter()
    torch.matmul(a, b)
    reps = max(1, math.ceil(min_seconds / max(time.perf_counter() - t, 1e-6)))
    best = 0.0
    for _ in range(trials):
        t = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b)
        best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t))
    return best


CEILING_SIZES = [512, 1024, 2048, 4096]
# A size whose one matmul would take longer than this at the best rate so far is
# skipped: without AVX-512 BF16 / AMX, bf16 matmuls take a slow path (~0.4
# GFLOP/s on a Zen 3 core pair), where n = 4096 alone would take minutes.
MAX_CALL_SECONDS = 10.0


def ceiling(args):
    """Achievable matmul FLOP/s in fp32 and bf16 (square sizes 512-4096)."""
    out = {"side": "pytorch", "threads": torch.get_num_threads(), "sizes": CEILING_SIZES}
    for name, dtype in [("fp32", torch.float32), ("bf16", torch.bfloat16)]:
        rates = []
        for n in CEILING_SIZES:
            known = [r for r in rates if r]
            rates.append(None if known and 2 * n ** 3 / max(known) > MAX_CALL_SECONDS else matmul_rate(n, dtype))
        out[name] = {"by_size": rates, "best": max(r for r in rates if r)}
        print(f"  pytorch {name}: " + ", ".join(f"n={n} " + (f"{r / 1e9:.0f}" if r else "skipped (too slow)")
                                             for n, r in zip(CEILING_SIZES, rates)) + " GFLOP/s", flush=True)
    write_json(args.out, out)


def flops_check(args):
    """Compares the analytic model FLOPs of one training step with the count of
    torch's FlopCounterMode (every matmul autograd actually ran), per method."""
    from torch.utils.flop_counter import FlopCounterMode

    tensors, plan = read_data(args.data)
    ids, mask, labels = tensors["train.ids"], tensors["train.mask"], tensors["train.labels"]
    idx = torch.arange(min(8, len(labels)))
    x, m = trim(ids, mask, idx)
    out = {}
    for method in ["full_finetune", "lora"]:
        model, _ = build(plan, tensors, method)
        model.train()
        with FlopCounterMode(display=False) as counter:
            torch.nn.functional.cross_entropy(model(x, m), labels[idx]).backward()
        counted = counter.get_total_flops()
        analytic = train_flops(x.shape[0], x.shape[1], plan, method)
        out[method] = {"rows": x.shape[0], "seq": x.shape[1], "analytic": analytic, "counted": counted}
        print(f"  {method}: analytic {analytic / 1e9:.3f} GFLOP, FlopCounterMode {counted / 1e9:.3f} GFLOP "
              f"({counted / analytic:.4f})", flush=True)
    write_json(args.out, out)


# Operator families of `profile`: which share of a training step the matrix
# products take (what the ceiling measures), and what the rest is spent on.
OP_FAMILIES = [
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product",
                "aten::_efficient_attention", "aten::_flash_attention", "aten::_scaled_mm")),
    ("optimiser", ("Optimizer.", "aten::_foreach", "aten::addcdiv", "aten::addcmul", "aten::lerp", "aten::sqrt")),
    ("dtype casts", ("aten::copy_", "aten::to", "aten::_to_copy")),
    ("dropout and random numbers", ("aten::bernoulli", "aten::native_dropout", "aten::dropout")),
    ("layer norm", ("aten::native_layer_norm", "aten::layer_norm")),
    ("gelu", ("aten::gelu",)),
    ("softmax", ("aten::_softmax", "aten::softmax", "aten::_log_softmax")),
]


def op_family(name):
    for family, prefixes in OP_FAMILIES:
        if name.startswith(prefixes):
            return family
    return "other"


def profile(args):
    """Where a training step's time goes: `--steps` steps (after two warm-up
    steps) of one job under torch.profiler, each operator's self CPU time
    summed by family. These are the same ATen kernels zhijian calls, so the
    shares say what bounds both sides' fraction of the matmul ceiling. Then
    the rate of the encoder's own matmul shapes (the profiled batches' mean
    token count) against the square ceiling, measured in the same process."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    tensors, plan = read_data(args.data)
    cfg = plan["jobs"][args.method]["train"]
    model, trainable = build(plan, tensors, args.method)
    opt = adamw(trainable, cfg)
    ids, mask, labels = tensors["train.ids"], tensors["train.mask"], tensors["train.labels"]
    batch = cfg["batch_size"]
    model.train()
    torch.manual_seed(cfg["seed"])
    order = torch.randperm(len(labels))
    tokens = []

    def step(k):
        idx = order[k * batch:(k + 1) * batch]
        x, m = trim(ids, mask, idx)
        tokens.append(x.numel())
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            loss = torch.nn.functional.cross_entropy(model(x, m), labels[idx])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, cfg["grad_clip"])
        opt.step()

    for k in range(2):
        step(k)
    start = time.perf_counter()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for k in range(2, 2 + args.steps):
            step(k)
    wall = time.perf_counter() - start
    families, ops = {}, []
    for e in prof.key_averages():
        seconds = e.self_cpu_time_total / 1e6
        families[op_family(e.key)] = families.get(op_family(e.key), 0.0) + seconds
        ops.append((seconds, e.key))
    total = sum(families.values())
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    square = max(matmul_rate(n, dtype) for n in (512, 1024, 2048))
    t, h, i = round(sum(tokens) / len(tokens)), model.encoder.config.hidden_size, model.encoder.config.intermediate_size
    shapes = {"[T, h] x [h, h] (attention projections)": (t, h, h), "[T, h] x [h, i] (FFN up)": (t, h, i),
              "[T, i] x [i, h] (FFN down)": (t, i, h), "[h, T] x [T, i] (a weight gradient)": (h, t, i)}
    shape_rates = {name: matmul_rate(0, dtype, shape=v) / square for name, v in shapes.items()}
    out = {"method": args.method, "precision": args.precision, "steps": args.steps, "threads": torch.get_num_threads(),
           "wall_seconds": wall, "self_cpu_seconds": total,
           "families": {f: {"seconds": s, "share": s / total} for f, s in sorted(families.items(), key=lambda x: -x[1])},
           "top_ops": [{"op": k, "seconds": s, "share": s / total} for s, k in sorted(ops, reverse=True)[:15]],
           "tokens_per_batch": t, "square_ceiling_flops": square, "shape_rate_of_ceiling": shape_rates}
    print(f"  {args.method} {args.precision}: {args.steps} steps, {wall:.1f} s wall (profiled), "
          f"{torch.get_num_threads()} threads")
    for f, v in out["families"].items():
        print(f"    {f:28s} {100 * v['share']:5.1f} %")
    print(f"  {args.precision} matmul rate at the encoder's shapes (T = {t}), of the square ceiling "
          f"({square / 1e12:.3f} TFLOP/s):")
    for name, share in shape_rates.items():
        print(f"    {name:42s} {100 * share:5.1f} %")
    write_json(args.out, out)


def write_json(path, value):
    """Writes JSON atomically (temporary file, then rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("job", help="train one job, write its JSON")
    p.add_argument("--method", choices=["linear_probe", "full_finetune", "lora"], required=True)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: the plan's one)")
    p.add_argument("--group-by-length", action="store_true", help="batch reviews of similar length together")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(run=job)
    p = sub.add_parser("ceiling", help="measure matmul FLOP/s in fp32 and bf16")
    p.add_argument("--out", required=True)
    p.set_defaults(run=ceiling)
    p = sub.add_parser("flops-check", help="analytic model FLOPs against FlopCounterMode")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(run=flops_check)
    p = sub.add_parser("profile", help="a training step's time by operator family (torch.profiler)")
    p.add_argument("--method", choices=["full_finetune", "lora"], required=True)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(run=profile)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
