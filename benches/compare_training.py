"""adaptd's training recipe against PEFT + PyTorch, side by side in one run (`make bench`).

    python benches/compare_training.py [--runs N] [--threads T] [--only throughput|camera|quality|text|time-to-accuracy]

1. Throughput and peak RSS: LoRA r=8 on query/value of all-MiniLM-L6-v2 plus a linear head,
   sequences of 64 real tokens (and of 16, a command's length), batch 16, the same threads.
   adaptd trains through the bundle's TorchScript graph in Rust (`benches/training.rs`, the
   daemon's own `fit`); PEFT trains the Hugging Face model in Python (`benches/peft_reference.py`),
   BERT's own dropout off as in adaptd's graph. Each side is its own process, run in turn, N
   times; medians and ratios are printed (the machine is shared and noisy).
   The camera model too: EfficientNet-Lite0 at 224x224 (the camera task's frames, preprocessed
   as the bundle says), LoRA r=8 on the bundle's slots plus a head, batch 16. adaptd once through
   the whole training graph (PEFT's way: the frozen blocks run forward every step) and once above
   the bundle's cut, as the daemon trains it: the frozen prefix once per sample, its time counted.
2. Learning quality: the digits CNN on sideways (rotated) digits it never saw, LoRA r=8 on
   the bundle's slots (conv1, conv2, fc1) plus the classifier, 100 upright digits replayed; the same split, hyper-parameters and
   seed on both sides. Accuracy of the frozen base, of each side's adapter, and of an offline full
   fine-tune (PyTorch), on a sideways test set and on upright digits (forgetting).
3. Learning quality on text: all-MiniLM-L6-v2 on few-shot intent classification (Home Assistant's
   English intent sentences, 20 intents, 16 examples each), a head on the frozen backbone, LoRA
   r=8 query/value + head on both sides, and an offline full fine-tune; test accuracy, and
   nearest-centroid accuracy on 8 intents never trained on (forgetting).
4. Time to accuracy on the intents of 3: PEFT LoRA r=8 q/v on every layer (the reference a user
   would run), adaptd the same, and adaptd trained above cuts of the model (after BERT layer 1,
   layer 3 and layer 4: LoRA on every linear map of the layers above, as the reference bundle has
   it, and after layer 4 on query/value only; on activations computed once per sample, that
   computation counted); the same on sideways digits, cut after conv1 and conv2; for each, the seconds until validation accuracy first reaches PEFT's
   final validation accuracy minus 0.5 points, the final test accuracy and the peak RSS. Medians
   over seeds, ratios to PEFT.
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
    """Operator commands in three intents, each followed by context long enough that every row
    holds `seq` real tokens (cut there): no padding for either side to skip."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer

    verbs = [("go to", 0), ("drive to", 0), ("navigate to", 0), ("pick up", 1), ("place", 1), ("grab", 1),
             ("report on", 2), ("check", 2), ("what is the state of", 2)]
    things = ["the loading dock", "the blue box", "the charging station", "aisle seven", "the red shelf",
              "the wrench on the bench", "the pallet near the north entrance", "the battery"]
    texts, labels = [], []
    for i in range(n):
        verb, label = verbs[i % len(verbs)]
        context = ", ".join(f"then {v} {things[(i + k) % len(things)]}" for k, (v, _) in enumerate(verbs))
        texts.append(f"please {verb} {things[(i // len(verbs)) % len(things)]} now, {context}")
        labels.append(label)
    tok = Tokenizer.from_file(str(ROOT / "build" / "bundles" / "minilm" / "tokenizer.json"))
    tok.enable_truncation(seq)
    tok.enable_padding(length=seq)
    enc = tok.encode_batch(texts)
    assert all(sum(e.attention_mask) == seq for e in enc), "every row fills the sequence"
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


# Commands a voice assistant or an operator gives a device, in confusable pairs (on/off, pause/
# resume, set/get...), from Home Assistant's intent sentences; 16 examples of each to learn from.
TEXT_INTENTS = ["HassTurnOn", "HassTurnOff", "HassLightSet", "HassGetState", "HassClimateGetTemperature",
                "HassClimateSetTemperature", "HassMediaPause", "HassMediaUnpause", "HassMediaNext", "HassMediaPrevious",
                "HassSetVolume", "HassSetVolumeRelative", "HassStartTimer", "HassCancelTimer", "HassPauseTimer",
                "HassUnpauseTimer", "HassTimerStatus", "HassIncreaseTimer", "HassDecreaseTimer", "HassGetWeather"]
# Intents the adapter never trains on: nearest-centroid accuracy on them, with each backbone's own
# embeddings, says whether adaptation damaged what the base model knew (forgetting).
OTHER_INTENTS = ["HassFanSetSpeed", "HassSetPosition", "HassClimateSetFanMode", "HassMediaPlayerMute",
                 "HassMediaPlayerUnmute", "HassVacuumCleanArea", "HassCancelAllTimers", "HassLawnMowerDock"]


def intent_pools(names: list[str], per_template: int = 30) -> dict[str, list[list[str]]]:
    """Distinct English sentences per intent, grouped by the template they come from: up to
    `per_template` expansions of each, with a few areas, devices and floors filled in."""
    import itertools
    import logging

    import home_assistant_intents
    from hassil.intents import Intents, TextSlotList
    from hassil.sample import sample_sentence

    logging.getLogger("hassil").setLevel(logging.ERROR)
    raw = json.loads((Path(home_assistant_intents.__file__).parent / "data" / "en.json").read_text())
    intents = Intents.from_dict(raw)
    lists = {**intents.slot_lists,
             "area": TextSlotList.from_strings(["kitchen", "living room", "garage", "office", "bedroom", "hallway", "workshop"]),
             "name": TextSlotList.from_strings(["ceiling light", "desk lamp", "front door", "heater", "robot arm", "conveyor", "speaker"]),
             "floor": TextSlotList.from_strings(["ground floor", "first floor", "basement"])}
    out: dict[str, list[list[str]]] = {}
    for name in names:
        seen: set[str] = set()
        groups: list[list[str]] = []
        for data in intents.intents[name].data:
            rules = {**intents.expansion_rules, **data.expansion_rules}
            for template in data.sentences:
                if any(n in data.wildcard_list_names for n in template.list_names(rules)):
                    continue
                group = []
                for text in itertools.islice(sample_sentence(template, lists, rules, language="en"), per_template):
                    text = " ".join(text.split())
                    if text not in seen:
                        seen.add(text)
                        group.append(text)
                if group:
                    groups.append(group)
        out[name] = groups
    return out


def intent_sentences(names: list[str], per_template: int = 30) -> dict[str, list[str]]:
    """Distinct English sentences per intent, every template's in turn."""
    return {name: [t for group in groups for t in group] for name, groups in intent_pools(names, per_template).items()}


def text_data(path: Path, shots: int = 16, val: int = 8, test: int = 60, other_shots: int = 8, other_test: int = 40) -> dict:
    """Few-shot intent classification on MiniLM: `shots` train and `val` validation sentences per
    intent, `test` held out; plus the other intents for the forgetting check. Tokenized by the
    bundle's tokenizer, padded to the longest sentence (both sides see the same tensors)."""
    import logging
    import random

    from safetensors.torch import save_file
    from tokenizers import Tokenizer

    logging.getLogger("hassil").setLevel(logging.ERROR)
    rng = random.Random(7)
    pools = intent_sentences(TEXT_INTENTS + OTHER_INTENTS)
    splits: dict[str, tuple[list[str], list[int]]] = {k: ([], []) for k in ("train", "val", "test", "other_ref", "other_test")}
    for label, name in enumerate(TEXT_INTENTS):
        pool = rng.sample(pools[name], shots + val + test)
        for split, part in (("train", pool[:shots]), ("val", pool[shots:shots + val]), ("test", pool[shots + val:])):
            splits[split][0].extend(part)
            splits[split][1].extend([label] * len(part))
    for label, name in enumerate(OTHER_INTENTS):
        pool = rng.sample(pools[name], min(len(pools[name]), other_shots + other_test))
        for split, part in (("other_ref", pool[:other_shots]), ("other_test", pool[other_shots:])):
            splits[split][0].extend(part)
            splits[split][1].extend([label] * len(part))
    tok = Tokenizer.from_file(str(ROOT / "build" / "bundles" / "minilm" / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(64)
    longest = max(len(e.ids) for texts, _ in splits.values() for e in tok.encode_batch(texts))
    tok.enable_padding(length=longest)
    tensors = {}
    for split, (texts, labels) in splits.items():
        enc = tok.encode_batch(texts)
        tensors[f"{split}_ids"] = torch.tensor([e.ids for e in enc], dtype=torch.int64)
        tensors[f"{split}_mask"] = torch.tensor([e.attention_mask for e in enc], dtype=torch.int64)
        tensors[f"{split}_y"] = torch.tensor(labels, dtype=torch.int64)
    gen = torch.Generator().manual_seed(0)
    tensors["head_weight"] = torch.randn(len(TEXT_INTENTS), 384, generator=gen) * 0.02
    tensors["head_bias"] = torch.zeros(len(TEXT_INTENTS))
    save_file(tensors, str(path))
    return {"intents": len(TEXT_INTENTS), "train": len(splits["train"][1]), "validation": len(splits["val"][1]),
            "test": len(splits["test"][1]), "other intents": len(OTHER_INTENTS), "tokens": longest}


def camera_data(path: Path, n: int = 128) -> None:
    """`n` frames of the camera task's commissioned domain, as the bundle's model input (resize,
    centre crop, normalise), with their labels and a seeded head."""
    import numpy as np
    from safetensors.torch import save_file
    from shifts import CAMERA_DATA, camera_inputs, camera_module

    data = camera_module().load(CAMERA_DATA)
    rows = np.where(data["domain"] == data["domains"].index("base"))[0][:n]
    images = camera_inputs([data["frames"][i] for i in rows])
    gen = torch.Generator().manual_seed(0)
    classes = len(data["classes"])
    save_file({
        "image": images.contiguous(),
        "labels": torch.tensor(data["labels"][rows], dtype=torch.int64),
        "head_weight": torch.randn(classes, 1280, generator=gen) * 0.02,
        "head_bias": torch.zeros(classes),
    }, str(path))


def camera_throughput(tmp: Path, args) -> None:
    data = tmp / "camera.safetensors"
    camera_data(data)
    bundle = ROOT / "build" / "bundles" / "efficientnet-lite0"
    extra = ["--threads", str(args.threads), "--epochs", "2", "--rank", "8", "--lr", "1e-3", "--head-lr", "5e-3"]
    ours = ["--bundle", str(bundle), "--inputs", "image"]
    sides = {
        "adaptd, whole graph": lambda: run_adaptd("throughput", data, [*extra, *ours]),
        "adaptd above the cut": lambda: run_adaptd("throughput", data, [*extra, *ours, "--cut", "1"]),
        "peft": lambda: run_peft("camera-throughput", data, extra),
    }
    runs = {side: [] for side in sides}
    for i in range(args.runs):
        for side, fn in sides.items():
            r = fn()
            runs[side].append(r)
            print(f"  camera run {i + 1} {side:<22} {r['samples_per_second']:7.1f} samples/s  peak RSS {r['peak_rss_bytes'] / 2**20:6.0f} MiB  "
                  f"loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}", flush=True)
    med = {s: (statistics.median(r["samples_per_second"] for r in rs), statistics.median(r["peak_rss_bytes"] for r in rs)) for s, rs in runs.items()}
    print(f"\nLoRA training, EfficientNet-Lite0 at 224x224, r=8 on the bundle's 7 slots + head, 128 frames, 2 epochs, batch 16, "
          f"{args.threads} threads, median of {args.runs} (samples/s over the whole job: above the cut, the prefix's time counted):")
    print(f"  {'':<22} {'samples/s':>10} {'peak RSS':>10} {'vs PEFT':>18}")
    for side, (sps, rss) in med.items():
        print(f"  {side:<22} {sps:>10.1f} {rss / 2**20:>6.0f} MiB   {sps / med['peft'][0]:5.2f}x, {rss / med['peft'][1]:4.2f}x RSS")
    print("  targets: throughput >= 1.0x PEFT's, peak RSS <= 0.5x\n")


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
    p.add_argument("--only", choices=["throughput", "camera", "quality", "text", "time-to-accuracy"])
    args = p.parse_args()
    subprocess.run(["cargo", "build", "-q", "--release", "-p", "adaptd", "--bench", "training"], cwd=ROOT, check=True)
    with tempfile.TemporaryDirectory() as tmp:
        # PEFT trains query/value of every layer; adaptd's side gets a bundle with exactly those
        # slots (the reference bundle also has slots on every linear map above its cut).
        qv = qv_minilm(Path(tmp))
        if args.only in (None, "throughput"):
            # The shape (64 tokens) and the length of a spoken or typed command (16).
            for seq in (64, 16):
                data = Path(tmp) / f"minilm-{seq}.safetensors"
                throughput_data(data, seq=seq)
                extra = ["--threads", str(args.threads), "--epochs", "2", "--rank", "8", "--lr", "5e-4", "--head-lr", "5e-3"]
                runs = {"adaptd": [], "peft": []}
                for i in range(args.runs):
                    for side, fn in (("adaptd", run_adaptd), ("peft", run_peft)):
                        r = fn("throughput", data, [*extra, "--bundle", str(qv)] if side == "adaptd" else extra)
                        runs[side].append(r)
                        print(f"  seq {seq} run {i + 1} {side:<6} {r['samples_per_second']:7.1f} samples/s  peak RSS {r['peak_rss_bytes'] / 2**20:6.0f} MiB  loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}", flush=True)
                med = {s: (statistics.median(r["samples_per_second"] for r in rs), statistics.median(r["peak_rss_bytes"] for r in rs)) for s, rs in runs.items()}
                print(f"\nLoRA training, all-MiniLM-L6-v2, r=8 query/value, seq {seq}, batch 16, {args.threads} threads, median of {args.runs}:")
                print(f"  {'':<8} {'samples/s':>10} {'peak RSS':>10}")
                for side, (sps, rss) in med.items():
                    print(f"  {side:<8} {sps:>10.1f} {rss / 2**20:>8.0f} MiB")
                print(f"  ratio adaptd/PEFT: throughput {med['adaptd'][0] / med['peft'][0]:.2f}x (target >= 1.5x), "
                      f"peak RSS {med['adaptd'][1] / med['peft'][1]:.2f}x (target <= 0.6x)\n")
        if args.only in (None, "camera"):
            camera_throughput(Path(tmp), args)
        if args.only in (None, "quality"):
            data = Path(tmp) / "digits.safetensors"
            sizes = quality_data(data)
            base = ["--threads", str(args.threads), "--epochs", "30", "--rank", "8", "--lr", "2e-3", "--head-lr", "5e-3"]
            # Initialisation and shuffling differ between the two RNGs: compare over seeds, not one draw.
            seeds = range(max(args.runs, 5))
            results = [(run_adaptd("quality", data, [*base, "--seed", str(s)]), run_peft("quality", data, [*base, "--seed", str(s)])) for s in seeds]
            def stat(values):
                return f"{100 * statistics.mean(values):5.1f}% ± {100 * statistics.stdev(values):3.1f}"
            print(f"Learning quality, digits-cnn on sideways digits ({sizes}), LoRA r=8 conv1/conv2/fc1 + head, 30 epochs, "
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

        if args.only in (None, "text"):
            data = Path(tmp) / "intents.safetensors"
            sizes = text_data(data)
            base = ["--threads", str(args.threads), "--epochs", "20", "--rank", "8", "--lr", "1e-3", "--head-lr", "5e-3"]
            seeds = range(max(args.runs, 3))
            results = []
            for s in seeds:
                ours = run_adaptd("text", data, [*base, "--bundle", str(qv), "--seed", str(s)])
                theirs = run_peft("text", data, [*base, "--full-lr", "5e-5", "--seed", str(s)])
                results.append((ours, theirs))
                print(f"  seed {s}: adaptd LoRA {100 * ours['lora']['test']:.1f}%, PEFT LoRA {100 * theirs['lora']['test']:.1f}%", flush=True)

            def stat(values):
                return f"{100 * statistics.mean(values):5.1f}% ± {100 * statistics.stdev(values):3.1f}"
            print(f"\nLearning quality, all-MiniLM-L6-v2 on few-shot intents ({sizes}), 20 epochs, best by "
                  f"validation loss; mean ± stdev over {len(seeds)} seeds:")
            print(f"  {'':<34} {'test':>13} {'untrained intents':>18} {'seconds':>8}")
            rows = [("frozen base + head (adaptd head)", [a["head"] for a, _ in results]),
                    ("adaptd LoRA r=8 q/v + head", [a["lora"] for a, _ in results]),
                    ("PEFT LoRA r=8 q/v + head", [r["lora"] for _, r in results]),
                    ("full fine-tune (PyTorch)", [r["full_finetune"] for _, r in results])]
            for name, ms in rows:
                print(f"  {name:<34} {stat([m['test'] for m in ms]):>13} {stat([m['other'] for m in ms]):>18} "
                      f"{statistics.median(m['seconds'] for m in ms):>8.1f}")
            gap = 100 * (statistics.mean(a["lora"]["test"] for a, _ in results) - statistics.mean(r["lora"]["test"] for _, r in results))
            print(f"  adaptd - PEFT on the test set: {gap:+.1f} points (target: within 1 point)")
            print("  untrained intents: nearest-centroid accuracy with each backbone's own embeddings (forgetting)")

        if args.only in (None, "time-to-accuracy"):
            time_to_accuracy(Path(tmp), args, qv)


def qv_minilm(tmp: Path) -> Path:
    """The minilm bundle uncut, with LoRA slots on query and value of every layer only."""
    sys.path.insert(0, str(ROOT / "deploy" / "export"))
    from reference_bundles import build_minilm

    out = tmp / "minilm-qv"
    build_minilm(tmp, cut_after=None, out=out, targets=("query", "value"))
    return out


# Where each task's model is cut for training above a frozen prefix: MiniLM after BERT layers 1, 3
# and 4 (of 0-5), with LoRA on every linear map above the cut as the reference bundle has it, and
# after layer 4 with query/value only (the slots PEFT trains); the digits CNN after its stem (conv1)
# and after conv2. Each: (row label, cut, LoRA targets; None: the bundle builder's default).
CUTS = {
    "intents": (("above layer.1", "bert.encoder.layer.1", None), ("above layer.3", "bert.encoder.layer.3", None),
                ("above layer.4", "bert.encoder.layer.4", None), ("above layer.4, q/v only", "bert.encoder.layer.4", ("query", "value"))),
    "digits": (("above conv1", "conv1", None), ("above conv2", "conv2", None)),
}


def time_to_accuracy(tmp: Path, args, qv: Path) -> None:
    sys.path.insert(0, str(ROOT / "deploy" / "export"))
    from reference_bundles import build_digits, build_minilm

    tasks = {
        "intents": ("all-MiniLM-L6-v2 on few-shot intents", text_data, build_minilm, "LoRA r=8 q/v + head, 20 epochs",
                    ["--epochs", "20", "--rank", "8", "--lr", "1e-3", "--head-lr", "5e-3"]),
        "digits": ("digits-cnn on sideways digits", quality_data, build_digits, "LoRA r=8 conv1/conv2/fc1 + head, 30 epochs",
                   ["--epochs", "30", "--rank", "8", "--lr", "2e-3", "--head-lr", "5e-3"]),
    }
    for task, (what, make_data, build, recipe, flags) in tasks.items():
        data = tmp / f"{task}.safetensors"
        sizes = make_data(data)
        bundles = {}
        for i, (label, cut, targets) in enumerate(CUTS[task]):
            bundles[label] = tmp / f"{task}-cut{i}"
            build(tmp, cut_after=cut, out=bundles[label], **({"targets": targets} if targets else {}))
        base = ["--threads", str(args.threads), *flags]
        sides = ["PEFT", "adaptd"] + [f"adaptd {label}" for label, _, _ in CUTS[task]]
        rows: dict[str, list[tuple[float | None, float, int]]] = {s: [] for s in sides}
        for seed in range(max(args.runs, 3)):
            extra = [*base, "--seed", str(seed)]
            peft = run_peft("time-to-accuracy", data, extra)
            target = peft["curve"][-1][1] - 0.005
            # adaptd uncut: the same slots as PEFT (digits: the reference bundle's, conv1/conv2/fc1).
            same = ["--bundle", str(qv)] if task == "intents" else []
            runs = {"PEFT": peft, "adaptd": run_adaptd("time-to-accuracy", data, [*extra, *same])}
            for (label, _, _), side in zip(CUTS[task], sides[2:]):
                runs[side] = run_adaptd("time-to-accuracy", data, [*extra, "--bundle", str(bundles[label]), "--cut", "1"])
            for side, r in runs.items():
                reached = next((t for t, acc in r["curve"] if acc >= target), None)
                rows[side].append((reached, r["test"], r["peak_rss_bytes"]))
                when = f"{reached:6.2f} s" if reached is not None else "  never"
                print(f"  {task} seed {seed} {side:<30} to {100 * target:.1f}% validation: {when}; test {100 * r['test']:.1f}%; "
                      f"run {r['seconds']:.1f} s; peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB", flush=True)

        def median(values):
            values = [v for v in values if v is not None]
            return statistics.median(values) if values else None

        peft_time = median(t for t, _, _ in rows["PEFT"])
        peft_test = statistics.median(a for _, a, _ in rows["PEFT"])
        peft_rss = statistics.median(m for _, _, m in rows["PEFT"])
        print(f"\nTime to accuracy, {what} ({sizes}), {recipe}, {args.threads} threads; target: PEFT's final "
              f"validation accuracy - 0.5 points; medians over {len(rows['PEFT'])} seeds:")
        print(f"  {'':<30} {'to target':>10} {'x PEFT':>7} {'test':>7} {'- PEFT':>7} {'peak RSS':>9} {'x PEFT':>7}")
        for side, rs in rows.items():
            t, test, rss = median(r[0] for r in rs), statistics.median(r[1] for r in rs), statistics.median(r[2] for r in rs)
            ratio = f"{t / peft_time:6.2f}x" if t is not None and peft_time else "      -"
            shown = f"{t:8.2f} s" if t is not None else "     never"
            print(f"  {side:<30} {shown:>10} {ratio:>7} {100 * test:6.1f}% {100 * (test - peft_test):+6.1f} "
                  f"{rss / 2**20:6.0f} MiB {rss / peft_rss:6.2f}x")
        print("  goals (intents): time to PEFT's accuracy <= 0.33x PEFT's, test within 0.5 points, peak RSS <= 0.4x PEFT's\n")


if __name__ == "__main__":
    main()
