"""The export tool refuses what cannot make a bundle, with a message that says why."""

import json
import sys
import tempfile
import unittest
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adaptd_export import ExportError, export_bundle  # noqa: E402


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.LayerNorm(16)
        self.fc = nn.Linear(4 * 16, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(2)
        emb = torch.relu(self.fc(self.norm(h).flatten(1)))
        return emb, self.head(emb)


def export(out, targets=("fc",), rank_max=4, model=None):
    return export_bundle(
        model or Tiny(), {"x": torch.zeros(2, 1, 4, 4)}, list(targets), out, name="tiny", version="0.1.0",
        rank_max=rank_max, output_names=["embedding", "logits"], logits_output="logits", labels=["a", "b", "c"],
        dynamic_axes={"x": {0: "batch"}, "embedding": {0: "batch"}, "logits": {0: "batch"}},
    )


class ExportTest(unittest.TestCase):
    def setUp(self):
        torch.manual_seed(0)
        self.tmp = tempfile.TemporaryDirectory()
        self.out = Path(self.tmp.name) / "bundle"

    def tearDown(self):
        self.tmp.cleanup()

    def test_writes_a_bundle_with_linear_and_conv_slots(self):
        export(self.out, targets=("conv", "fc"))
        manifest = json.loads((self.out / "manifest.json").read_text())
        slots = {s["module"]: s for s in manifest["lora"]["slots"]}
        self.assertEqual(slots["fc"]["a_shape"], [4, 64])
        self.assertEqual(slots["fc"]["b_shape"], [8, 4])
        self.assertEqual(slots["conv"]["a_shape"], [4, 1, 3, 3])
        self.assertEqual(slots["conv"]["b_shape"], [4, 4, 1, 1])
        self.assertEqual(set(manifest["files"]), {"model.onnx", "plain.onnx", "train.pt"})
        self.assertEqual(manifest["plain_graph"], "plain.onnx")
        import onnxruntime as ort
        names = [i.name for i in ort.InferenceSession(str(self.out / "model.onnx")).get_inputs()]
        self.assertEqual(names, ["x", "conv.lora_A", "conv.lora_B", "fc.lora_A", "fc.lora_B"])
        # The graph without slots takes only the model's own inputs and answers as the slotted graph
        # does with every slot zero.
        plain = ort.InferenceSession(str(self.out / "plain.onnx"))
        self.assertEqual([i.name for i in plain.get_inputs()], ["x"])
        probe = torch.randn(3, 1, 4, 4).numpy()
        zeros = {n: torch.zeros(*slots[n.split(".")[0]]["a_shape" if n.endswith("A") else "b_shape"]).numpy() for n in names[1:]}
        slotted = ort.InferenceSession(str(self.out / "model.onnx")).run(None, {"x": probe, **zeros})
        for want, got in zip(slotted, plain.run(None, {"x": probe})):
            self.assertLess(abs(want - got).max(), 1e-6)
        # The training graph takes the LoRA dropout keep probability last: 1 is the serving graph's
        # function exactly; below 1 the LoRA path (and only it) is dropped at random.
        self.assertEqual(manifest["lora"]["dropout_input"], "lora.keep")
        train = torch.jit.load(str(self.out / "train.pt"))
        x = torch.randn(2, 1, 4, 4)
        lora = [torch.randn(*slots[m][k]) * 0.1 for m in ("conv", "fc") for k in ("a_shape", "b_shape")]
        serving = ort.InferenceSession(str(self.out / "model.onnx"))
        feeds = dict(zip(names, [x.numpy()] + [t.numpy() for t in lora]))
        with torch.no_grad():
            kept = train(x, *lora, torch.tensor(1.0))[0]
            dropped = [train(x, *lora, torch.tensor(0.5))[0] for _ in range(2)]
            no_lora = train(x, *[torch.zeros_like(t) for t in lora], torch.tensor(0.5))[0]
            base = train(x, *[torch.zeros_like(t) for t in lora], torch.tensor(1.0))[0]
        self.assertLess((kept - torch.from_numpy(serving.run(None, feeds)[0])).abs().max().item(), 1e-5)
        self.assertGreater((dropped[0] - dropped[1]).abs().max().item(), 1e-4)
        self.assertEqual((no_lora - base).abs().max().item(), 0.0)

    def test_a_cut_splits_the_training_graph_into_a_frozen_prefix_and_a_suffix(self):
        export_bundle(
            Tiny(), {"x": torch.zeros(2, 1, 4, 4)}, ["conv", "fc"], self.out, name="tiny", version="0.1.0",
            rank_max=4, output_names=["embedding", "logits"], logits_output="logits", labels=["a", "b", "c"],
            dynamic_axes={"x": {0: "batch"}, "embedding": {0: "batch"}, "logits": {0: "batch"}}, cut_after="norm",
        )
        manifest = json.loads((self.out / "manifest.json").read_text())
        cut = manifest["cut"]
        self.assertEqual((cut["after"], cut["slots_above"]), ("norm", [1]), "fc runs above the cut, conv below")
        self.assertEqual(cut["activation"]["shape"], [-1, 4, 16])
        self.assertEqual(set(manifest["files"]), {"model.onnx", "plain.onnx", "train.pt", "prefix.pt", "suffix.pt"})
        train, prefix, suffix = (torch.jit.load(str(self.out / f)) for f in ("train.pt", "prefix.pt", "suffix.pt"))
        x = torch.randn(5, 1, 4, 4)
        lora = [torch.randn(s, requires_grad=True) for slot in manifest["lora"]["slots"] for s in (slot["a_shape"], slot["b_shape"])]
        keep = torch.tensor(1.0)
        with torch.no_grad():
            activation = prefix(x, *lora)
        self.assertEqual(list(activation.shape), [5, 4, 16])
        split = suffix(x, activation, *lora, keep)
        for whole, part in zip(train(x, *lora, keep), split):
            torch.testing.assert_close(part, whole, rtol=0, atol=1e-6)
        # Each half is frozen: it holds only the weights its own graph reads, not the model's.
        self.assertEqual((list(prefix.parameters()), list(suffix.parameters())), ([], []))
        # Each half computes only its own side of the cut.
        kinds = lambda graph: {n.kind() for n in graph.inlined_graph.nodes()}
        self.assertFalse({k for k in kinds(suffix) if "conv" in k}, "the suffix recomputes the prefix")
        self.assertNotIn("aten::linear", kinds(prefix), "the prefix runs past the cut")
        # LoRA above the cut trains through the suffix; the slot below gets no gradient from it.
        split[1].sum().backward()
        self.assertTrue(all(t.grad is not None and t.grad.abs().sum() > 0 for t in lora[2:]))
        self.assertTrue(all(t.grad is None for t in lora[:2]))

    def test_a_cut_after_a_module_that_does_not_exist_is_refused(self):
        with self.assertRaisesRegex(ExportError, "cut_after 'trunk'"):
            export_bundle(
                Tiny(), {"x": torch.zeros(2, 1, 4, 4)}, ["fc"], self.out, name="tiny", version="0.1.0",
                rank_max=4, output_names=["embedding", "logits"], cut_after="trunk",
            )

    def test_unknown_target_module(self):
        with self.assertRaisesRegex(ExportError, r"target module 'attention' matches no module"):
            export(self.out, targets=("attention",))
        self.assertFalse(self.out.exists(), "nothing is written for a refused export")

    def test_target_that_is_not_linear_or_conv(self):
        with self.assertRaisesRegex(ExportError, r"'norm' is a LayerNorm; LoRA slots need nn.Linear or nn.Conv2d"):
            export(self.out, targets=("norm",))

    def test_rank_must_be_positive(self):
        for bad in (0, -3, 2.5, True):
            with self.assertRaisesRegex(ExportError, "rank_max must be a positive integer"):
                export(self.out, rank_max=bad)

    def test_same_bundle_again_is_a_no_op_and_a_different_one_is_refused(self):
        model = Tiny()
        export(self.out, model=model)
        stamp = (self.out / "manifest.json").stat().st_mtime_ns
        export(self.out, model=model)  # same weights, same settings
        self.assertEqual((self.out / "manifest.json").stat().st_mtime_ns, stamp)
        with self.assertRaisesRegex(ExportError, r"already holds a different bundle \(tiny 0.1.0"):
            export(self.out, model=Tiny())  # other weights

    def test_directory_with_other_content_is_refused(self):
        self.out.mkdir()
        (self.out / "notes.txt").write_text("mine")
        with self.assertRaisesRegex(ExportError, "not empty and holds no bundle"):
            export(self.out)
        self.assertEqual((self.out / "notes.txt").read_text(), "mine")


if __name__ == "__main__":
    unittest.main()
