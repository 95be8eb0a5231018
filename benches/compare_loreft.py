"""LoReFT in adaptd against adaptd's LoRA and against pyreft, side by side in one run (`make bench`).

    python benches/compare_loreft.py [--runs N] [--threads T]

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if not PYREFT_PYTHON.exists():
        raise SystemExit(f"{PYREFT_PYTHON} is missing: run `make setup`")
    subprocess.run(["cargo", "build", "-q", "--release", "-p", "adaptd", "--bench", "training"], cwd=ROOT, check=True)
    threads = ["--threads", str(args.threads)]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "intents.safetensors"
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

        data = Path(tmp) / "digits.safetensors"
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
    print(json.dumps({"done": True}))


if __name__ == "__main__":
    main()
