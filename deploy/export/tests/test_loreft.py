"""LoReFT intervention slots: the serving graph (ONNX Runtime), the training graph (TorchScript)
and a plain PyTorch reference of the formula, row by row, agree; no values is no edit."""

import json
import sys
import tempfile
import unittest
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adaptd_export import ExportError, export_bundle  # noqa: E402

D, VOCAB = 16, 50


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, D)

    def forward(self, h, mask):
        mixed = (h * mask.unsqueeze(-1)).sum(1, keepdim=True) / mask.sum(1, keepdim=True).unsqueeze(-1)
        return (torch.tanh(self.fc(h) + mixed),)  # a tuple, as transformer layers return


class TinyText(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.layers = nn.ModuleList([Layer(), Layer()])

    def forward(self, ids, mask):
        h = self.embed(ids)
        m = mask.to(torch.float32)
        for layer in self.layers:
            h = layer(h, m)[0]
        return (h * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True)


class TinyImage(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 16, 8)

    def forward(self, x):
        return torch.relu(self.fc(torch.relu(self.conv(x)).flatten(1)))


def orthonormal_rows(r: int, d: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, r, generator=gen))
    return q.t().contiguous()


def reference_edit(h: torch.Tensor, rotate, weight, bias) -> torch.Tensor:
    """h + R^T (W h + b - R h) for one vector h, written out as the paper does."""
    return h + rotate.t() @ (weight @ h + bias - rotate @ h)


class LoreftExportTest(unittest.TestCase):
    def setUp(self):
        torch.manual_seed(0)
        self.tmp = tempfile.TemporaryDirectory()
        self.gen = torch.Generator().manual_seed(7)

    def tearDown(self):
        self.tmp.cleanup()

    def text_bundle(self, **kw):
        ids = torch.randint(0, VOCAB, (2, 6))
        mask = torch.ones(2, 6, dtype=torch.int64)
        out = Path(self.tmp.name) / "text"
        self.text_model = TinyText().eval()
        export_bundle(
            self.text_model, {"ids": ids, "mask": mask}, ["layers.0.fc"], out, name="tiny-text", version="0.1.0",
            rank_max=2, output_names=["embedding"],
            dynamic_axes={"ids": {0: "batch", 1: "seq"}, "mask": {0: "batch", 1: "seq"}, "embedding": {0: "batch"}},
            reft_layers=["layers.0", "layers.1"], reft_rank_max=4, reft_mask_input="mask", **kw,
        )
        return out

    def random_reft(self, manifest, rank):
        """Random LoReFT values at `rank`, zero-padded to rank_max as slots take them."""
        r_max = manifest["reft"]["rank_max"]
        values = []
        for slot in manifest["reft"]["slots"]:
            d = slot["dim"]
            rotate = torch.zeros(r_max, d)
            rotate[:rank] = orthonormal_rows(rank, d, self.gen)
            weight = torch.zeros(r_max, d)
            weight[:rank] = torch.randn(rank, d, generator=self.gen) * 0.3
            bias = torch.zeros(r_max)
            bias[:rank] = torch.randn(rank, generator=self.gen) * 0.3
            values.append((rotate, weight, bias))
        return values

    def test_text_slots_edit_the_first_and_last_real_tokens_in_padded_batches(self):
        out = self.text_bundle()
        manifest = json.loads((out / "manifest.json").read_text())
        self.assertEqual([s["module"] for s in manifest["reft"]["slots"]], ["layers.0", "layers.1"])
        self.assertEqual([s["kind"] for s in manifest["reft"]["slots"]], ["sequence", "sequence"])
        self.assertEqual(manifest["reft"]["positions_input"], "reft.positions")
        self.assertEqual(manifest["reft"]["mask_input"], "mask")
        self.assertEqual(manifest["reft"]["merge"]["graph"], "reft.onnx")
        self.assertIn("reft.onnx", manifest["files"])
        self.assertEqual(len(manifest["reft"]["merge"]["offsets"]), 7, "R, W, b of two slots and the positions")
        import onnxruntime as ort

        serving = ort.InferenceSession(str(out / "model.onnx"))
        names = [i.name for i in serving.get_inputs()]
        self.assertEqual(names[:4], ["ids", "mask", "layers.0.fc.lora_A", "layers.0.fc.lora_B"])
        self.assertEqual(names[4:], ["layers.0.reft_R", "layers.0.reft_W", "layers.0.reft_b",
                                     "layers.1.reft_R", "layers.1.reft_W", "layers.1.reft_b", "reft.positions"])
        train = torch.jit.load(str(out / "train.pt"))
        # Rows of different lengths, padded on the right and (one row) on the left.
        ids = torch.randint(0, VOCAB, (3, 7), generator=self.gen)
        mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1, 1]])
        lora = [torch.zeros(2, D), torch.zeros(D, 2)]
        reft = self.random_reft(manifest, rank=3)
        flat = [t for triple in reft for t in triple]
        for first, last in [(1, 1), (2, 0), (0, 3), (100, 0)]:
            positions = torch.tensor([first, last])
            feeds = dict(zip(names, [ids.numpy(), mask.numpy()] + [t.numpy() for t in lora + flat] + [positions.numpy()]))
            onnx_out = serving.run(None, feeds)[0]
            with torch.no_grad():
                ts_out = train(ids, mask, *lora, *flat, positions, torch.tensor(1.0))[0].numpy()
            self.assertLess(np.abs(onnx_out - ts_out).max(), 1e-4, f"positions {first}+{last}")
            # The reference: the same module, each layer's output edited vector by vector at
            # the positions counted among each row's real tokens.
            want = self.reference(ids, mask, reft, first, last)
            self.assertLess(np.abs(onnx_out - want).max(), 1e-4, f"positions {first}+{last} vs the reference")
            # Merged LoReFT: the graph with edits only, these values written over its markers
            # where the manifest says, answers as the slotted graph does.
            merged = ort.InferenceSession(self.merged_reft(out, manifest, flat + [positions]))
            merged_out = merged.run(None, {"ids": ids.numpy(), "mask": mask.numpy()})[0]
            self.assertLess(np.abs(merged_out - onnx_out).max(), 1e-5, f"merged, positions {first}+{last}")
        self.assertEqual([i.name for i in merged.get_inputs()], ["ids", "mask"], "the merged copy takes the model's inputs alone")
        # All zero: no edit, the plain graph's answer.
        zeros = [torch.zeros_like(t) for t in flat]
        feeds = dict(zip(names, [ids.numpy(), mask.numpy()] + [t.numpy() for t in lora + zeros] + [np.array([1, 1])]))
        plain = ort.InferenceSession(str(out / "plain.onnx")).run(None, {"ids": ids.numpy(), "mask": mask.numpy()})[0]
        self.assertLess(np.abs(serving.run(None, feeds)[0] - plain).max(), 1e-6)

    @staticmethod
    def merged_reft(out: Path, manifest: dict, values: list[torch.Tensor]) -> bytes:
        """The bytes of `reft.onnx` with `values` (R, W, b per slot, then positions) written at
        the manifest's offsets, as serving writes them."""
        merge = manifest["reft"]["merge"]
        blob = bytearray((out / merge["graph"]).read_bytes())
        for offset, value in zip(merge["offsets"], values, strict=True):
            raw = value.numpy().astype(value.numpy().dtype.newbyteorder("<")).tobytes()
            blob[offset:offset + len(raw)] = raw
        return bytes(blob)

    def reference(self, ids, mask, reft, first, last):
        """The exported module's forward, editing each layer's output by hand."""
        model = self.text_model
        m = mask.to(torch.float32)
        with torch.no_grad():
            h = model.embed(ids)
            for li, layer in enumerate(model.layers):
                h = layer(h, m)[0].clone()
                rotate, weight, bias = reft[li]
                for row in range(h.shape[0]):
                    real = [p for p in range(h.shape[1]) if mask[row, p]]
                    picked = set(real[:first]) | set(real[len(real) - last:] if last else [])
                    for p in picked:
                        h[row, p] = reference_edit(h[row, p], rotate, weight, bias)
            return ((h * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True)).numpy()

    def test_feature_map_and_vector_slots_edit_every_position(self):
        out = Path(self.tmp.name) / "image"
        model = TinyImage().eval()
        export_bundle(
            model, {"x": torch.zeros(2, 1, 4, 4)}, ["fc"], out, name="tiny-image", version="0.1.0", rank_max=2,
            output_names=["embedding"], dynamic_axes={"x": {0: "batch"}, "embedding": {0: "batch"}},
            reft_layers=["conv", "fc"], reft_rank_max=3, cut_after="conv",
        )
        manifest = json.loads((out / "manifest.json").read_text())
        self.assertEqual([(s["kind"], s["dim"]) for s in manifest["reft"]["slots"]], [("feature_map", 6), ("vector", 8)])
        self.assertIsNone(manifest["reft"]["positions_input"])
        # The conv's own output is what the prefix caches: its edit is below the cut.
        self.assertEqual(manifest["cut"]["reft_above"], [1])
        import onnxruntime as ort

        serving = ort.InferenceSession(str(out / "model.onnx"))
        names = [i.name for i in serving.get_inputs()]
        x = torch.randn(3, 1, 4, 4, generator=self.gen)
        lora = [torch.randn(2, 6 * 16, generator=self.gen) * 0.1, torch.randn(8, 2, generator=self.gen) * 0.1]
        reft = self.random_reft(manifest, rank=2)
        flat = [t for triple in reft for t in triple]
        feeds = dict(zip(names, [x.numpy()] + [t.numpy() for t in lora + flat]))
        onnx_out = serving.run(None, feeds)[0]
        train = torch.jit.load(str(out / "train.pt"))
        with torch.no_grad():
            ts_out = train(x, *lora, *flat, torch.tensor(1.0))[0].numpy()
            # Prefix then suffix: the same function, with the conv's edit in the prefix.
            prefix = torch.jit.load(str(out / "prefix.pt"))
            suffix = torch.jit.load(str(out / "suffix.pt"))
            activation = prefix(x, *lora, *flat)
            halves = suffix(x, activation, *lora, *flat, torch.tensor(1.0))[0].numpy()
        self.assertLess(np.abs(onnx_out - ts_out).max(), 1e-4)
        self.assertLess(np.abs(halves - ts_out).max(), 1e-5)
        # The reference: every pixel's channel vector edited, then the vector after fc.
        with torch.no_grad():
            h = model.conv(x)
            edited = h.clone()
            for n in range(3):
                for i in range(4):
                    for j in range(4):
                        edited[n, :, i, j] = reference_edit(h[n, :, i, j], *reft[0])
            flat_in = torch.relu(edited).flatten(1)
            y = model.fc(flat_in) + flat_in @ lora[0].t() @ lora[1].t()
            y = torch.stack([reference_edit(row, *reft[1]) for row in y])
            want = torch.relu(y).numpy()
        self.assertLess(np.abs(onnx_out - want).max(), 1e-4)
        # Merged LoReFT (no LoRA): the edits-only graph with the values written in answers as the
        # slotted graph with the same values and zero LoRA.
        zero_lora = [torch.zeros_like(t) for t in lora]
        slotted = serving.run(None, dict(zip(names, [x.numpy()] + [t.numpy() for t in zero_lora + flat])))[0]
        merged = ort.InferenceSession(self.merged_reft(out, manifest, flat)).run(None, {"x": x.numpy()})[0]
        self.assertLess(np.abs(merged - slotted).max(), 1e-5)

    def test_refusals_name_the_layer(self):
        with self.assertRaisesRegex(ExportError, "LoReFT layer 'nope' matches no module"):
            export_bundle(TinyImage(), {"x": torch.zeros(2, 1, 4, 4)}, ["fc"], Path(self.tmp.name) / "a", name="t", version="0",
                          rank_max=2, output_names=["embedding"], reft_layers=["nope"])
        with self.assertRaisesRegex(ExportError, "rank_max 9 is above the width 8 of layer 'fc'"):
            export_bundle(TinyImage(), {"x": torch.zeros(2, 1, 4, 4)}, ["fc"], Path(self.tmp.name) / "b", name="t", version="0",
                          rank_max=2, output_names=["embedding"], reft_layers=["fc"], reft_rank_max=9)
        with self.assertRaisesRegex(ExportError, "reft_mask_input 'm' is not among the inputs"):
            export_bundle(TinyImage(), {"x": torch.zeros(2, 1, 4, 4)}, ["fc"], Path(self.tmp.name) / "c", name="t", version="0",
                          rank_max=2, output_names=["embedding"], reft_layers=["fc"], reft_mask_input="m")


if __name__ == "__main__":
    unittest.main()
