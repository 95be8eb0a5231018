"""Label-free normalisation statistics on the camera task: would a Tent/BN-adapt candidate help?

    python benches/norm_statistics.py [--only lighting,lens_blur] [--threads 2]

The camera bundle (EfficientNet-Lite0, 49 batch norms, folded into the convolutions at export)
is the one reference bundle with batch norm. Before the daemon grows a candidate that re-estimates
normalisation statistics from unlabelled traffic, this measures what such a candidate could give,
on the frozen backbone in PyTorch (the same weights the bundle exports), per camera shift:

- `eval`: the frozen backbone as the bundle serves it (ImageNet running statistics);
- `BN-adapt`: every batch norm's statistics re-estimated on the shift's unlabelled frames, as
  Tent and BN-adapt (Schneider et al., 2020) do: the features are normalised to ImageNet's unit
  scale again, but from the shift's statistics;
- `aligned`: each batch norm's input re-standardised from the shift's statistics to the
  statistics it had on the frames the device was commissioned on (the head was trained on those),
  layer by layer in one pass: every layer, or only the layers above the bundle's cut (there the
  daemon's kept prefix activations would still hold).

Two heads read the features (logistic regression, scikit-learn): one trained on half of the
commissioned frames (a device that has seen no label of the shift yet), one on half of the shifted
frames (a device with labels of the shift). The statistics come from 120 of the shifted
frames, without their labels; every head is scored on the other half of the shifted frames.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "deploy" / "export"))
import camera_task  # noqa: E402
import reference_bundles  # noqa: E402

CAMERA_DATA = ROOT / "build" / "data" / "camera.safetensors"
# Unlabelled frames the statistics are estimated on: one batch, as a job would take them from the
# traffic it keeps.
STATISTICS_FRAMES = 120


class Renormalised(torch.nn.Module):
    """A frozen batch norm whose input can be re-standardised: `record` accumulates the input's
    per-channel moments (the commissioned frames), `estimate` takes the batch's moments as the
    shift's and applies them, `apply` applies the last estimate; `tent` normalises with the shift's
    moments instead of ImageNet's, `align` maps them onto the recorded ones."""

    def __init__(self, bn: torch.nn.BatchNorm2d, name: str) -> None:
        super().__init__()
        self.bn, self.name = bn, name
        self.mode, self.how, self.enabled = "eval", "align", True
        self.sum = self.sum_sq = None
        self.count = 0
        self.mean = self.var = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "record":
            m, v, k = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False), x.shape[0]
            self.sum = m * k if self.sum is None else self.sum + m * k
            self.sum_sq = (v + m * m) * k if self.sum_sq is None else self.sum_sq + (v + m * m) * k
            self.count += k
            return self.bn(x)
        if self.mode == "eval" or not self.enabled:
            return self.bn(x)
        if self.mode == "estimate":
            self.mean, self.var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
        shape = (1, -1, 1, 1)
        if self.how == "tent":
            return torch.nn.functional.batch_norm(x, self.mean, self.var, self.bn.weight, self.bn.bias, False, 0.0, self.bn.eps)
        ref_mean = self.sum / self.count
        ref_var = self.sum_sq / self.count - ref_mean * ref_mean
        x = (x - self.mean.view(shape)) / (self.var.view(shape) + self.bn.eps).sqrt()
        return self.bn(x * (ref_var.view(shape) + self.bn.eps).sqrt() + ref_mean.view(shape))


def wrap(module: torch.nn.Module, prefix: str = "") -> list[Renormalised]:
    found = []
    for name, child in module.named_children():
        if isinstance(child, torch.nn.BatchNorm2d):
            wrapped = Renormalised(child, prefix + name)
            setattr(module, name, wrapped)
            found.append(wrapped)
        else:
            found += wrap(child, prefix + name + ".")
    return found


def main() -> None:
    from PIL import Image
    from sklearn.linear_model import LogisticRegression

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="lighting,camera_moved,lens_blur,new_variants")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    data = camera_task.load(CAMERA_DATA)
    preprocessing = reference_bundles.EFFICIENTNET_PREPROCESSING
    model = reference_bundles.efficientnet_lite0()
    norms = wrap(model)
    # The batch norms above the bundle's cut: those after the cut module's last one (`wrap` finds
    # them in the order the model registers, and runs, them).
    last_below = max(i for i, n in enumerate(norms) if n.name.startswith(reference_bundles.EFFICIENTNET_CUT + "."))
    above_cut = {n.name for n in norms[last_below + 1:]}
    domain, labels = np.asarray(data["domain"]), np.asarray(data["labels"])

    def frames(name: str) -> tuple[torch.Tensor, np.ndarray]:
        k = data["domains"].index(name)
        # Shuffled: the frames are stored class by class.
        idx = np.random.default_rng(k).permutation(np.where(domain == k)[0])
        x = torch.cat([reference_bundles.imagenet_input(np.asarray(Image.open(io.BytesIO(data["frames"][i])).convert("RGB")), preprocessing) for i in idx])
        return x, labels[idx]

    def features(x: torch.Tensor, mode: str) -> np.ndarray:
        for n in norms:
            n.mode = mode
        with torch.no_grad():
            return torch.cat([model(x[i:i + 64]) for i in range(0, len(x), 64)]).numpy()

    def estimate(x: torch.Tensor, how: str, layers) -> None:
        for n in norms:
            n.how, n.enabled, n.mode = how, layers(n.name), "estimate"
        with torch.no_grad():
            model(x[:2 * STATISTICS_FRAMES:2])

    def head(f: np.ndarray, y: np.ndarray):
        return LogisticRegression(max_iter=3000).fit(f, y)

    base_x, base_y = frames("base")
    features(base_x[::2], "record")
    base_head = head(features(base_x[::2], "eval"), base_y[::2])
    held_out = base_head.score(features(base_x[1::2], "eval"), base_y[1::2])
    variants = [("BN-adapt", "tent", lambda _: True), ("aligned", "align", lambda _: True),
                ("aligned above the cut", "align", lambda n: n in above_cut)]
    print(f"{len(norms)} batch norms; commissioned frames: head trained on {len(base_y[::2])}, held out {held_out:.3f}", flush=True)
    rows = []
    for shift in args.only.split(","):
        x, y = frames(shift)
        train, test = slice(0, None, 2), slice(1, None, 2)
        f = features(x, "eval")
        row = {"shift": shift, "eval": (base_head.score(f[test], y[test]), head(f[train], y[train]).score(f[test], y[test]))}
        for label, how, layers in variants:
            estimate(x, how, layers)
            f = features(x, "apply")
            row[label] = (base_head.score(f[test], y[test]), head(f[train], y[train]).score(f[test], y[test]))
        for n in norms:
            n.enabled = True
        rows.append(row)
        print(shift, {k: tuple(round(v, 3) for v in vals) for k, vals in row.items() if k != "shift"}, flush=True)
    columns = ["eval"] + [label for label, _, _ in variants]
    print()
    print("Test accuracy: head trained on commissioned frames / on labelled shifted frames")
    print("| shift | " + " | ".join(columns) + " |")
    print("| --- " * (len(columns) + 1) + "|")
    for row in rows:
        print(f"| {row['shift']} | " + " | ".join(f"{100 * row[c][0]:.1f} / {100 * row[c][1]:.1f}" for c in columns) + " |")
    print(f"\n{time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
