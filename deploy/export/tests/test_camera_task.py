"""The camera task's frames are a pure function of (domain, index), of the size and class their
file says, and each shift changes what it claims to change."""

import io
import sys
import tempfile
import unittest
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import camera_task  # noqa: E402


def pixels(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.float32)


class CameraTaskTest(unittest.TestCase):
    def test_a_frame_is_the_same_bytes_every_time_and_a_320x240_jpeg_of_its_class(self):
        for domain in camera_task.DOMAINS:
            a, label = camera_task.render(domain, 13)
            b, _ = camera_task.render(domain, 13)
            self.assertEqual(a, b, domain)
            self.assertEqual(label, 13 % len(camera_task.CLASSES))
            self.assertEqual(Image.open(io.BytesIO(a)).size, (camera_task.WIDTH, camera_task.HEIGHT))
        self.assertNotEqual(camera_task.render("base", 13)[0], camera_task.render("base", 25)[0])

    def test_the_evening_light_is_darker_and_warmer_and_the_new_lens_blurs(self):
        frames = lambda domain: np.stack([pixels(camera_task.render(domain, i)[0]) for i in range(24)])  # noqa: E731
        base, evening, blurred = frames("base"), frames("lighting"), frames("lens_blur")
        self.assertLess(evening.mean(), 0.7 * base.mean())
        self.assertGreater(evening[..., 0].mean() / evening[..., 2].mean(), base[..., 0].mean() / base[..., 2].mean())
        # Edges, measured on 2x2 means: sensor noise (added after the lens) would swamp them at full size.
        pooled = lambda x: x.reshape(len(x), x.shape[1] // 2, 2, x.shape[2] // 2, 2, 3).mean((2, 4))  # noqa: E731
        edges = lambda x: np.abs(np.diff(pooled(x), axis=2)).mean()  # noqa: E731
        self.assertLess(edges(blurred), 0.85 * edges(base))

    def test_the_file_holds_every_domain_and_class_and_reads_back(self):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "camera.safetensors"
            stats = camera_task.build(out, per_class=1)
            data = camera_task.load(out)
        n = len(camera_task.DOMAINS) * len(camera_task.CLASSES)
        self.assertEqual(stats["frames"], n)
        self.assertEqual(len(data["frames"]), n)
        self.assertEqual(data["classes"], camera_task.CLASSES)
        for d in range(len(camera_task.DOMAINS)):
            self.assertEqual(sorted(data["labels"][data["domain"] == d].tolist()), list(range(len(camera_task.CLASSES))))
        self.assertEqual(data["frames"][5], camera_task.render(camera_task.DOMAINS[0], 5)[0])


if __name__ == "__main__":
    unittest.main()
