"""adaptd's training recipe against PEFT + PyTorch, side by side in one run (`make bench`).

    python benches/compare_training.py [--runs N] [--threads T] [--only throughput|quality]

1. Throughput and peak RSS: LoRA r=8 on query/value of all-MiniLM-L6-v2 plus a linear head,
   sequences of 64 tokens, batch 16, the same threads. adaptd trains through the bundle's
   TorchScript graph in Rust (`benches/training.rs`, the daemon's own `fit`); PEFT trains the
   Hugging Face model in Python (`benches/peft_reference.py`). Each side is its own process, run
   in turn, N times; medians and ratios are printed (the machine is shared and noisy).
2. Learning quality: the digits CNN on sideways (rotated) digits it never saw, LoRA r=8 on
   conv2/fc1 plus the classifier, 100 upright digits replayed; the same split, hyper-parameters and
   seed on both sides. Accuracy of the frozen base, of each side's adapter, and of an offline full
   fine-tune (PyTorch), on a sideways test set and on upright digits (forgetting).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def throughput_data(path: Path, n: int = 256, seq: int = 64) -> None:
    """Operator commands in three intents, tokenized by the bundle's tokenizer, padded to `seq`."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer

    verbs = [("go to", 0), ("drive to", 0), ("navigate to", 0), ("pick up", 1), ("place", 1), ("grab", 1),
             ("report on", 2), ("check", 2), ("what is the state of", 2)]
    things = ["the loading dock", "the blue box", "the charging station", "aisle seven", "the red shelf",
              "the wrench on the bench", "the pallet near the north entrance", "the battery"]
    texts, labels = [], []
    for i in range(n):
        verb, label = verbs[i % len(verbs)]
        texts.append(f"please {verb} {things[(i // len(verbs)) % len(things)]} now")
        labels.append(label)
    tok = Tokenizer.from_file(str(ROOT / "build" / "bundles" / "minilm" / "tokenizer.json"))
    tok.enable_truncation(seq)
    tok.enable_padding(length=seq)
    enc = tok.encode_batch(texts)
    gen = torch.Generator().manual_seed(0)
    save_file({
        "input_ids": torch.tensor([e.ids for e in enc], dtype=torch.int64),
        "attention_mask": torch.tensor([e.attention_mask for e in enc], dtype=torch.int64),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "head_weight": torch.randn(3, 384, generator=gen) * 0.02,
        "head_bias": torch.zeros(3),
    }, str(path))


def quality_data(path: Path) -> dict:
    """Sideways digits the base never saw: 60 % train (+ 100 replayed upright), 10 % validation,
    30 % test; the other 100 upright retention digits check forgetting."""
    from safetensors.torch import load_file, save_file

    d = load_file(str(ROOT / "build" / "data" / "digits.safetensors"))
    images, labels = d["images"], d["labels"]
    pool = ((d["pretrain"] == 0) & (d["retention"] == 0)).nonzero().flatten()
    pool = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(1))]
    n_train, n_val = int(0.6 * len(pool)), int(0.1 * len(pool))
    tr, va, te = pool[:n_train], pool[n_train:n_train + n_val], pool[n_train + n_val:]
    sideways = lambda idx: torch.rot90(images[idx], k=-1, dims=(2, 3)).contiguous()  # noqa: E731  clockwise, as adaptd's datasets
    retention = d["retention"].nonzero().flatten()
    replay, check = retention[0::2], retention[1::2]
    save_file({
        "train_x": torch.cat([sideways(tr), images[replay]]).contiguous(), "train_y": torch.cat([labels[tr], labels[replay]]),
        "val_x": sideways(va), "val_y": labels[va].contiguous(),
        "test_x": sideways(te), "test_y": labels[te].contiguous(),
        "retention_x": images[check].contiguous(), "retention_y": labels[check].contiguous(),
    }, str(path))
    return {"train": n_train + len(replay), "validation": n_val, "test": len(te), "retention": len(check)}


def run_adaptd(mode: str, data: Path, extra: list[str]) -> dict:
    cmd = ["cargo", "bench", "-q", "-p", "adaptd", "--bench", "training", "--", mode, str(data), *extra]
    return last_json(subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout)


def run_peft(mode: str, data: Path, extra: list[str]) -> dict:
    cmd = [PYTHON, str(ROOT / "benches" / "peft_reference.py"), mode, str(data), *extra]
    env = dict(os.environ, OMP_NUM_THREADS=extra[extra.index("--threads") + 1])
    return last_json(subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True, env=env).stdout)


def last_json(out: str) -> dict:
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", choices=["throughput", "quality"])
    args = p.parse_args()
    subprocess.run(["cargo", "build", "-q", "--release", "-p", "adaptd", "--bench", "training"], cwd=ROOT, check=True)
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "throughput"):
            data = Path(tmp) / "minilm.safetensors"
            throughput_data(data)
            extra = ["--threads", str(args.threads), "--epochs", "2", "--rank", "8", "--lr", "5e-4", "--head-lr", "5e-3"]
            runs = {"adaptd": [], "peft": []}
            for i in range(args.runs):
                for side, fn in (("adaptd", run_adaptd), ("peft", run_peft)):
                    r = fn("throughput", data, extra)
                    runs[side].append(r)
                    print(f"  run {i + 1} {side:<6} {r['samples_per_second']:7.1f} samples/s  peak RSS {r['peak_rss_bytes'] / 2**20:6.0f} MiB  loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}", flush=True)
            med = {s: (statistics.median(r["samples_per_second"] for r in rs), statistics.median(r["peak_rss_bytes"] for r in rs)) for s, rs in runs.items()}
            print(f"\nLoRA training, all-MiniLM-L6-v2, r=8 query/value, seq 64, batch 16, {args.threads} threads, median of {args.runs}:")
            print(f"  {'':<8} {'samples/s':>10} {'peak RSS':>10}")
            for side, (sps, rss) in med.items():
                print(f"  {side:<8} {sps:>10.1f} {rss / 2**20:>8.0f} MiB")
            print(f"  ratio adaptd/PEFT: throughput {med['adaptd'][0] / med['peft'][0]:.2f}x (target >= 1.5x), "
                  f"peak RSS {med['adaptd'][1] / med['peft'][1]:.2f}x (target <= 0.6x)\n")
        if args.only in (None, "quality"):
            data = Path(tmp) / "digits.safetensors"
            sizes = quality_data(data)
            base = ["--threads", str(args.threads), "--epochs", "30", "--rank", "8", "--lr", "2e-3", "--head-lr", "5e-3"]
            # Initialisation and shuffling differ between the two RNGs: compare over seeds, not one draw.
            seeds = range(max(args.runs, 5))
            results = [(run_adaptd("quality", data, [*base, "--seed", str(s)]), run_peft("quality", data, [*base, "--seed", str(s)])) for s in seeds]
            def stat(values):
                return f"{100 * statistics.mean(values):5.1f}% ± {100 * statistics.stdev(values):3.1f}"
            print(f"Learning quality, digits-cnn on sideways digits ({sizes}), LoRA r=8 conv2/fc1 + head, 30 epochs, "
                  f"best by validation loss; mean ± stdev over {len(seeds)} seeds:")
            print(f"  {'':<28} {'sideways test':>15} {'upright (forgetting)':>21}")
            rows = [("frozen base", [a["base"] for a, _ in results]), ("adaptd LoRA", [a["lora"] for a, _ in results]),
                    ("PEFT LoRA", [r["lora"] for _, r in results]), ("full fine-tune (PyTorch)", [r["full_finetune"] for _, r in results])]
            for name, ms in rows:
                print(f"  {name:<28} {stat([m['test'] for m in ms]):>15} {stat([m['retention'] for m in ms]):>21}")
            gap = 100 * (statistics.mean(a["lora"]["test"] for a, _ in results) - statistics.mean(r["lora"]["test"] for _, r in results))
            print(f"  adaptd - PEFT on the sideways test set: {gap:+.1f} points (target: within 1 point)")
            print(f"  training time per run, median: adaptd {statistics.median(a['lora']['seconds'] for a, _ in results):.1f} s, "
                  f"PEFT {statistics.median(r['lora']['seconds'] for _, r in results):.1f} s")


if __name__ == "__main__":
    main()
