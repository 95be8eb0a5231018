"""LoReFT in adaptd against adaptd's LoRA and against pyreft, side by side in one run (`make bench`).

    python benches/compare_loreft.py [--runs N] [--threads T] [--only text|digits|camera]

1. The intents of compare_training's `text` (all-MiniLM-L6-v2, 20 intents, 16 examples each):
   - adaptd LoRA r=8 + head above the bundle's cut, as the daemon trains it;
   - adaptd LoReFT r=4 + head on the outputs of layers 4 and 5 (the LoReFT slots above the cut),
     each text's first and last token (f1+l1), above the cut as the daemon trains it, and on the
     whole graph (every layer run every step, as pyreft runs it);
   - pyreft 0.1.0 LoReFT r=4 on the same layers and positions, with the same recipe, in its own
     environment (`benches/pyreft_reference.py`, `.venv-pyreft`).
   Test accuracy, trainable parameters, the adapter's tensor file bytes, samples/s over the
   whole job, peak RSS of each side's process; means over seeds, ratios.
2. The sideways digits of compare_training's `quality`: adaptd LoRA r=8 against LoReFT r=4 (after
   conv2 and fc1), the same recipe.
3. The camera task (EfficientNet-Lite0 at 224x224, the parts station of benches/shifts.py): on each
   camera shift, the frames the shift suite publishes (the parts as commissioned and as shifted) a
   tenth of them for validation, scored on the shift's held-out frames. adaptd LoRA r=8 on the
   bundle's 7 slots against LoReFT r=4 on the outputs of blocks 13-15 (every pixel), both above
   the bundle's cut as the daemon trains them, each at the daemon's learning rate (LoRA 1e-3,
   LoReFT 5e-3: `training.loreft_learning_rate`), and LoReFT also at LoRA's. pyreft is not run here: its interventions edit the last axis of a
   [batch, position, dim] output, a transformer's, not a feature map's channels.

Goals (issue: LoReFT adapters): LoReFT within 1 point of adaptd's LoRA with <= 1/10 of its
parameters and files; within 1 point of pyreft's accuracy at >= 2x its throughput and <= 0.5x its
memory on the CPU.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benches"))
from compare_training import last_json, quality_data, text_data  # noqa: E402

PYREFT_PYTHON = ROOT / ".venv-pyreft" / "bin" / "python"


def adaptd(data: Path, extra: list[str]) -> dict:
    cmd = ["cargo", "bench", "-q", "-p", "adaptd", "--bench", "training", "--", "adapter", str(data), *extra]
    return last_json(subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout)


def pyreft(data: Path, extra: list[str]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=extra[extra.index("--threads") + 1])
    cmd = [str(PYREFT_PYTHON), str(ROOT / "benches" / "pyreft_reference.py"), "adapter", str(data), *extra]
    return last_json(subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True, env=env).stdout)


def table(title: str, rows: dict[str, list[dict]]) -> dict[str, dict]:
    mean = {name: {k: statistics.mean(r[k] for r in rs) for k in ("test", "params", "file_bytes", "samples_per_second", "peak_rss_bytes")}
            for name, rs in rows.items()}
    spread = {name: statistics.stdev([r["test"] for r in rs]) if len(rs) > 1 else 0.0 for name, rs in rows.items()}
    print(f"\n{title}")
    print(f"  {'':<34} {'test':>14} {'params':>8} {'file':>9} {'samples/s':>10} {'peak RSS':>9}")
    for name, m in mean.items():
        print(f"  {name:<34} {100 * m['test']:6.2f}% ± {100 * spread[name]:3.1f} {m['params']:>8.0f} {m['file_bytes'] / 1024:>7.1f}KB "
              f"{m['samples_per_second']:>10.1f} {m['peak_rss_bytes'] / 2**20:>7.0f}MB")
    return mean


CAMERA_BUNDLE = ROOT / "build" / "bundles" / "efficientnet-lite0"


def camera_shift_data(path: Path, shift: str, seed: int) -> dict:
    """A camera shift as the shift suite deals it (`shifts.camera_cell_data`): the frames it
    publishes (commissioned and shifted), a tenth of them for validation, the shift's held-out
    frames to test on; the bundle's model input (resize, crop, normalise) and a seeded head."""
    import numpy as np
    import torch
    from safetensors.torch import save_file
    from shifts import camera_cell_data, camera_inputs

    parts = camera_cell_data(shift, np.random.default_rng(seed))
    frames = parts["before"][0] + parts["after"][0]
    names = parts["before"][1] + parts["after"][1]
    classes = sorted(set(names))
    labels = torch.tensor([classes.index(n) for n in names])
    order = torch.tensor(np.random.default_rng(seed).permutation(len(frames)))
    n_val = len(frames) // 10
    images = camera_inputs(frames)
    gen = torch.Generator().manual_seed(seed)
    save_file({
        "train_image": images[order[n_val:]].contiguous(), "train_y": labels[order[n_val:]].contiguous(),
        "val_image": images[order[:n_val]].contiguous(), "val_y": labels[order[:n_val]].contiguous(),
        "test_image": camera_inputs(parts["test"][0]).contiguous(), "test_y": torch.tensor([classes.index(n) for n in parts["test"][1]]),
        "head_weight": torch.randn(len(classes), 1280, generator=gen) * 0.02, "head_bias": torch.zeros(len(classes)),
    }, str(path))
    return {"classes": len(classes), "train": len(frames) - n_val, "validation": n_val, "test": len(parts["test"][0])}


def camera(tmp: Path, args, threads: list[str]) -> None:
    from shifts import CAMERA_SHIFTS
    # The daemon's recipe (config/adaptd.toml): LoRA at learning_rate 1e-3, LoReFT at
    # loreft_learning_rate 5e-3, the head at 5e-3; fewer epochs than its 30 (early stopping ends
    # its camera jobs near 10), the same for every side. LoReFT also at LoRA's rate, which the
    # daemon trained it at before it had a rate of its own.
    common = [*threads, "--epochs", "10", "--head-lr", "5e-3", "--cut", "1", "--bundle", str(CAMERA_BUNDLE)]
    sides = {
        "adaptd LoRA r=8 (7 slots)": ["--adapter", "lora", "--rank", "8", "--lr", "1e-3"],
        "adaptd LoReFT r=4, lr 1e-3": ["--adapter", "loreft", "--rank", "4", "--lr", "1e-3"],
        "adaptd LoReFT r=4, shipped lr 5e-3": ["--adapter", "loreft", "--rank", "4", "--lr", "5e-3"],
    }
    summary = []
    for shift in (args.shifts.split(",") if args.shifts else CAMERA_SHIFTS):
        rows: dict[str, list[dict]] = {name: [] for name in sides}
        for seed in range(args.runs):
            data = tmp / f"camera-{shift}-{seed}.safetensors"
            sizes = camera_shift_data(data, shift, seed)
            for name, side in sides.items():
                r = adaptd(data, [*common, *side, "--seed", str(seed)])
                rows[name].append(r)
                print(f"  {shift} seed {seed} {name:<34} test {100 * r['test']:5.1f}%  {r['samples_per_second']:6.1f} samples/s", flush=True)
            data.unlink()
        # Peak RSS here is the frames' (each process holds the file and its splits), not training's.
        m = table(f"LoReFT (outputs of blocks 13-15) on the camera shift {shift!r}, EfficientNet-Lite0 at 224x224 ({sizes}), 10 epochs, above the cut, "
                  f"mean over {args.runs} seeds:", rows)
        lora, *lorefts = m.values()
        summary.append((shift, lora, lorefts))
        for ours in lorefts:
            print(f"  LoReFT / LoRA: accuracy {100 * (ours['test'] - lora['test']):+.2f} points (goal: within 1), parameters "
                  f"1/{lora['params'] / ours['params']:.0f}, files 1/{lora['file_bytes'] / ours['file_bytes']:.0f}, "
                  f"samples/s {ours['samples_per_second'] / lora['samples_per_second']:.2f}x", flush=True)
    print(f"\n| camera shift, mean of {args.runs} seeds | LoRA r=8 | LoReFT r=4, lr 1e-3 | LoReFT r=4, lr 5e-3 (shipped) |")
    print("| --- | --- | --- | --- |")
    for shift, lora, lorefts in summary:
        print(f"| {shift} | {100 * lora['test']:.1f} | " + " | ".join(f"{100 * o['test']:.1f} ({100 * (o['test'] - lora['test']):+.1f})" for o in lorefts) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", choices=["text", "digits", "camera"])
    p.add_argument("--shifts", default="", metavar="SHIFT,SHIFT", help="with the camera: only these shifts")
    args = p.parse_args()
    if not PYREFT_PYTHON.exists() and args.only in (None, "text"):
        raise SystemExit(f"{PYREFT_PYTHON} is missing: run `make setup`")
    subprocess.run(["cargo", "build", "-q", "--release", "-p", "adaptd", "--bench", "training"], cwd=ROOT, check=True)
    threads = ["--threads", str(args.threads)]
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "text"):
            text(Path(tmp), args, threads)
        if args.only in (None, "digits"):
            digits(Path(tmp), args, threads)
        if args.only in (None, "camera"):
            camera(Path(tmp), args, threads)
    print(json.dumps({"done": True}))


def text(tmp: Path, args, threads: list[str]) -> None:
    data = tmp / "intents.safetensors"
    sizes = text_data(data)
    common = [*threads, "--epochs", "20", "--head-lr", "5e-3"]
    sides = {
        "adaptd LoRA r=8, above the cut": lambda s: adaptd(data, [*common, "--cut", "1", "--adapter", "lora", "--rank", "8", "--lr", "1e-3", "--seed", s]),
        "adaptd LoReFT r=4, above the cut": lambda s: adaptd(data, [*common, "--cut", "1", "--adapter", "loreft", "--rank", "4", "--lr", "1e-2",
                                                                   "--layers", "bert.encoder.layer.4,bert.encoder.layer.5", "--seed", s]),
        "adaptd LoReFT r=4, whole graph": lambda s: adaptd(data, [*common, "--adapter", "loreft", "--rank", "4", "--lr", "1e-2",
                                                                 "--layers", "bert.encoder.layer.4,bert.encoder.layer.5", "--seed", s]),
        "pyreft LoReFT r=4": lambda s: pyreft(data, [*common, "--layers", "4,5", "--rank", "4", "--positions", "f1+l1", "--lr", "1e-2", "--seed", s]),
    }
    rows: dict[str, list[dict]] = {name: [] for name in sides}
    for seed in range(args.runs):
        for name, run in sides.items():
            r = run(str(seed))
            rows[name].append(r)
            print(f"  seed {seed} {name:<34} test {100 * r['test']:5.1f}%  {r['samples_per_second']:6.1f} samples/s  "
                  f"peak RSS {r['peak_rss_bytes'] / 2**20:5.0f} MB", flush=True)
    m = table(f"LoReFT on few-shot intents, all-MiniLM-L6-v2 ({sizes}), 20 epochs, {args.threads} threads, mean over {args.runs} seeds:", rows)
    lora, ours, whole, theirs = (m[k] for k in sides)
    print(f"  LoReFT / LoRA (adaptd): accuracy {100 * (ours['test'] - lora['test']):+.2f} points (goal: within 1), "
          f"parameters 1/{lora['params'] / ours['params']:.0f}, files 1/{lora['file_bytes'] / ours['file_bytes']:.0f} (goal: <= 1/10)")
    print(f"  adaptd / pyreft (LoReFT): accuracy {100 * (ours['test'] - theirs['test']):+.2f} points (goal: within 1 or better), "
          f"throughput {ours['samples_per_second'] / theirs['samples_per_second']:.2f}x above the cut, "
          f"{whole['samples_per_second'] / theirs['samples_per_second']:.2f}x on the whole graph (goal: >= 2x), "
          f"peak RSS {ours['peak_rss_bytes'] / theirs['peak_rss_bytes']:.2f}x and {whole['peak_rss_bytes'] / theirs['peak_rss_bytes']:.2f}x (goal: <= 0.5x)")


def digits(tmp: Path, args, threads: list[str]) -> None:
    data = tmp / "digits.safetensors"
    sizes = quality_data(data)
    common = [*threads, "--epochs", "30", "--head-lr", "5e-3"]
    rows = {"adaptd LoRA r=8 (conv1, conv2, fc1)": [], "adaptd LoReFT r=4 (conv2, fc1)": []}
    for seed in range(max(args.runs, 5)):
        rows["adaptd LoRA r=8 (conv1, conv2, fc1)"].append(adaptd(data, [*common, "--adapter", "lora", "--rank", "8", "--lr", "2e-3", "--seed", str(seed)]))
        rows["adaptd LoReFT r=4 (conv2, fc1)"].append(adaptd(data, [*common, "--adapter", "loreft", "--rank", "4", "--lr", "4e-3", "--seed", str(seed)]))
    m = table(f"LoReFT on sideways digits, digits-cnn ({sizes}), 30 epochs, mean over {max(args.runs, 5)} seeds:", rows)
    lora, ours = m.values()
    print(f"  LoReFT / LoRA: accuracy {100 * (ours['test'] - lora['test']):+.2f} points, parameters 1/{lora['params'] / ours['params']:.0f}: "
          "a rotation moves what every filter sees, which edits of a few directions of a layer's output do not undo")


if __name__ == "__main__":
    main()
