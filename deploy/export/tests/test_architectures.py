"""Real mobile architectures export: batch norm frozen in both graphs, depthwise convolutions
refused as slots with the reason, TensorFlow-style 'same' padding, squeeze-and-excitation; and the
command line makes a bundle from a module factory."""

import json
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from adaptd_export import ExportError, export_bundle, list_modules  # noqa: E402


class SamePadConv(nn.Conv2d):
    """TensorFlow's 'same' padding done in forward, as EfficientNet ports do it."""

    def forward(self, x):
        kh, kw = self.weight.shape[-2:]
        ph, pw = max(kh - self.stride[0], 0), max(kw - self.stride[1], 0)
        return super().forward(F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2]))


class MbBlock(nn.Module):
    """An inverted residual block: 1x1 expand, BN, ReLU6, 3x3 depthwise, BN, squeeze-and-excite,
    1x1 project, BN, skip."""

    def __init__(self, c: int, expand: int = 4):
        super().__init__()
        e = c * expand
        self.expand = nn.Conv2d(c, e, 1, bias=False)
        self.bn0 = nn.BatchNorm2d(e)
        self.depthwise = SamePadConv(e, e, 3, groups=e, bias=False)
        self.bn1 = nn.BatchNorm2d(e)
        self.se_reduce = nn.Conv2d(e, 4, 1)
        self.se_expand = nn.Conv2d(4, e, 1)
        self.project = nn.Conv2d(e, c, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        h = F.relu6(self.bn0(self.expand(x)))
        h = F.hardswish(self.bn1(self.depthwise(h)))
        s = torch.sigmoid(self.se_expand(F.silu(self.se_reduce(h.mean((2, 3), keepdim=True)))))
        return x + self.bn2(self.project(h * s))


class MobileNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = SamePadConv(3, 8, 3, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.blocks = nn.Sequential(MbBlock(8), MbBlock(8))
        self.head = nn.Conv2d(8, 16, 1)

    def forward(self, image):
        h = self.blocks(F.relu6(self.bn(self.stem(image))))
        return F.relu6(self.head(h)).mean((2, 3))


def mobilenet() -> MobileNet:
    """The factory the command line test names: batch-norm statistics that are not the identity."""
    torch.manual_seed(0)
    model = MobileNet()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


TARGETS = ["blocks.0.expand", "blocks.0.project", "blocks.1.expand", "blocks.1.project", "head"]


def export(out, targets=TARGETS, cut_after=None):
    return export_bundle(
        mobilenet(), {"image": torch.zeros(2, 3, 32, 32)}, list(targets), out, name="mobile", version="0.1.0", rank_max=4,
        output_names=["embedding"], dynamic_axes={"image": {0: "batch"}, "embedding": {0: "batch"}}, cut_after=cut_after,
    )


class ArchitectureTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.out = Path(self.tmp.name) / "bundle"

    def tearDown(self):
        self.tmp.cleanup()

    def test_batch_norm_is_frozen_and_both_graphs_agree_with_and_without_lora(self):
        import onnxruntime as ort

        export(self.out, cut_after="blocks.0")
        manifest = json.loads((self.out / "manifest.json").read_text())
        slots = manifest["lora"]["slots"]
        session = ort.InferenceSession(str(self.out / "model.onnx"), providers=["CPUExecutionProvider"])
        train = torch.jit.load(str(self.out / "train.pt"))
        # A training graph put in train mode must still use the running statistics: batch norm
        # is part of the frozen base, whatever mode the trainer's module is in.
        train.train()
        x = torch.randn(3, 3, 32, 32)
        reference = mobilenet()
        for scale in (0.0, 0.1):
            lora = [torch.randn(*s[k]) * scale for s in slots for k in ("a_shape", "b_shape")]
            feeds = {"image": x.numpy(), **{n: t.numpy() for n, t in zip([s[k] for s in slots for k in ("a_input", "b_input")], lora)}}
            onnx_out = session.run(None, feeds)[0]
            with torch.no_grad():
                torch_out = train(x, *lora, torch.tensor(1.0))[0].numpy()
                single = train(x[:1], *lora, torch.tensor(1.0))[0].numpy()
            self.assertLess(np.abs(onnx_out - torch_out).max(), 1e-4, f"LoRA scale {scale}")
            # Eval-mode batch norm: a row's output does not depend on the rest of its batch.
            self.assertLess(np.abs(single[0] - torch_out[0]).max(), 1e-5)
            if scale == 0.0:
                with torch.no_grad():
                    self.assertLess(np.abs(reference(x).numpy() - onnx_out).max(), 1e-4)
        # The cut halves compose to the whole with the same slots.
        prefix, suffix = torch.jit.load(str(self.out / "prefix.pt")), torch.jit.load(str(self.out / "suffix.pt"))
        lora = [torch.randn(*s[k]) * 0.1 for s in slots for k in ("a_shape", "b_shape")]
        with torch.no_grad():
            activation = prefix(x, *lora)
            whole = train(x, *lora, torch.tensor(1.0))[0]
            halves = suffix(x, activation, *lora, torch.tensor(1.0))[0]
        self.assertLess((whole - halves).abs().max().item(), 1e-5)
        self.assertEqual(manifest["cut"]["activation"]["shape"], [-1, 8, 16, 16])

    def test_a_depthwise_convolution_is_refused_as_a_slot_naming_the_layer_and_what_to_do(self):
        with self.assertRaises(ExportError) as e:
            export(self.out, targets=["blocks.0.depthwise"])
        message = str(e.exception)
        self.assertIn("'blocks.0.depthwise'", message)
        self.assertIn("depthwise convolution", message)
        self.assertIn("groups=32", message)
        self.assertIn("pointwise (1x1)", message)
        self.assertFalse(self.out.exists())

    def test_a_convolution_that_pads_its_input_itself_takes_a_slot_only_at_1x1(self):
        with self.assertRaises(ExportError) as e:
            export(self.out, targets=["stem"])
        self.assertIn("'stem'", str(e.exception))
        self.assertIn("pads its input itself", str(e.exception))
        with self.assertRaises(ExportError) as e:
            export(self.out, targets=["bn"])
        self.assertIn("is a BatchNorm2d", str(e.exception))

    def test_list_modules_says_where_slots_can_go(self):
        lines = {line.split("\t")[0]: line for line in list_modules(mobilenet())}
        self.assertIn("slot ok", lines["blocks.0.expand"])
        self.assertIn("no slot: is a depthwise convolution", lines["blocks.0.depthwise"])
        self.assertIn("no slot", lines["stem"])

    def test_the_command_line_exports_a_factory_and_refuses_with_the_layer_named(self):
        run = lambda *args: subprocess.run(  # noqa: E731
            [sys.executable, str(HERE.parent / "adaptd_export.py"), "--factory", "test_architectures:mobilenet", "--python-path", str(HERE), *args],
            capture_output=True, text=True)
        pre = json.dumps({"kind": "image", "height": 32, "width": 32, "channels": 3, "pixel_scale": 1 / 255,
                          "resize": "shorter_side", "resize_to": 36, "mean": [0.5] * 3, "std": [0.25] * 3})
        ok = run("--input", "image:f32:1x3x32x32", "--targets", ",".join(TARGETS), "--cut-after", "blocks.0",
                 "--preprocessing", pre, "--name", "mobile", str(self.out))
        self.assertEqual(ok.returncode, 0, ok.stderr)
        manifest = json.loads((self.out / "manifest.json").read_text())
        self.assertEqual(manifest["preprocessing"]["resize"], "shorter_side")
        self.assertEqual(manifest["metadata"]["factory"], "test_architectures:mobilenet")
        self.assertEqual(len(manifest["lora"]["slots"]), len(TARGETS))
        self.assertEqual(manifest["inputs"][0]["shape"], [-1, 3, 32, 32])
        refused = run("--input", "image:f32:1x3x32x32", "--targets", "depthwise", "--name", "m", str(Path(self.tmp.name) / "other"))
        self.assertEqual(refused.returncode, 2)
        self.assertIn("'blocks.0.depthwise' is a depthwise convolution", refused.stderr)
        bad_input = run("--input", "image:f32:3by224", "--targets", "head", "--name", "m", str(Path(self.tmp.name) / "other"))
        self.assertEqual(bad_input.returncode, 2)
        self.assertIn("--input 'image:f32:3by224'", bad_input.stderr)
        listing = run("--list-modules")
        self.assertEqual(listing.returncode, 0, listing.stderr)
        self.assertIn("blocks.1.project", listing.stdout)


if __name__ == "__main__":
    unittest.main()
