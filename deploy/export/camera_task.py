"""The camera task: a parts-sorting station's camera, made only from what installed packages ship.

    python camera_task.py OUT.safetensors [--per-class N] [--preview DIR]

Twelve kinds of small parts (nuts, washers, bolts, screws, gears, springs, brackets, bearings,
cable ties, resistors, capacitors, fuses) lie on a work surface under a camera. Each frame is a
320x240 JPEG, as a cheap USB camera gives it:

- the surface is a random crop of a photograph that scikit-image or scikit-learn ships (brick,
  gravel, grass, a page of text, coffee, a cat, a rocket, a temple, ...), rotated, rescaled and
  tinted, so no two backgrounds repeat and the background carries no class information;
- the part is drawn procedurally at twice the resolution (anti-aliased), in a finish of its kind
  (zinc, steel, black oxide, beige resistor bodies, blue capacitor sleeves), with its own size,
  rotation, position, a shading gradient and a soft cast shadow; a third of the frames have a
  second object (a glove, a scrap of cardboard, a stray part's edge) over part of it;
- then the camera: a perspective view of the plane, lighting (gain, colour temperature, gamma),
  sensor noise (Gaussian read noise plus signal-dependent shot noise) and JPEG compression.

Similar kinds are what makes it a task: a hex nut, a square nut and a washer differ in outline
only; a bolt and a screw in the head; a resistor and a fuse in body and bands. ImageNet features
see "small metal object on a surface" in all of them: a linear probe on them is far from perfect,
and adaptation is what closes the gap.

The domains are the shifts a fixed camera really meets:
  base          the station as commissioned: daylight-white light, camera above the bench;
  lighting      the evening shift: half the light, a warm (tungsten) cast, and the noise a
                camera's gain brings with it;
  camera_moved  the camera knocked: a steeper view of the bench, parts smaller and further off;
  lens_blur     a replaced lens, slightly out of focus (defocus blur) with vignetting;
  new_variants  a new supplier: the same kinds in finishes and proportions never seen (brass,
                anodised colours, nylon; thinner washers, finer gears, longer bolts).

Every frame is a pure function of (domain, index): the same seed gives the same bytes.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

CLASSES = ["hex_nut", "washer", "square_nut", "bolt", "screw", "gear", "spring", "bracket", "bearing", "cable_tie",
           "resistor", "fuse"]
DOMAINS = ["base", "lighting", "camera_moved", "lens_blur", "new_variants"]
WIDTH, HEIGHT = 320, 240
SUPER = 2  # parts are drawn at twice the resolution and downsampled: anti-aliased edges
JPEG_QUALITY = 90
SEED = 20261206


@lru_cache(maxsize=None)
def backgrounds() -> list[np.ndarray]:
    """The photographs that ship inside scikit-image's and scikit-learn's wheels, as RGB uint8."""
    import skimage.data as data
    from sklearn.datasets import load_sample_images

    out = []
    for name in ["brick", "gravel", "grass", "page", "text", "camera", "coins", "moon", "coffee", "chelsea",
                 "astronaut", "rocket", "hubble_deep_field", "logo", "horse"]:
        img = np.asarray(getattr(data, name)())
        if img.dtype == bool:
            img = img.astype(np.uint8) * 255
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        out.append(np.ascontiguousarray(img[..., :3].astype(np.uint8)))
    out.extend(np.asarray(i, dtype=np.uint8) for i in load_sample_images().images)
    return out


def surface(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    photos = backgrounds()
    src = photos[int(rng.integers(len(photos)))]
    # A random crop of a third to two thirds of the photo's shorter side, turned to any angle
    # (cut a little larger first, so the turned corners stay inside), stretched over the frame.
    side = int(min(src.shape[:2]) * rng.uniform(0.35, 0.7))
    big = int(side * 1.45)
    pad = max(0, big - min(src.shape[:2]))
    if pad:
        src = np.pad(src, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    y0 = int(rng.integers(0, src.shape[0] - big + 1))
    x0 = int(rng.integers(0, src.shape[1] - big + 1))
    patch = Image.fromarray(src[y0:y0 + big, x0:x0 + big]).rotate(float(rng.uniform(0, 360)), resample=Image.BILINEAR)
    m = (big - side) // 2
    cut_h = side * h // w
    img = patch.crop((m, m, m + side, m + cut_h)).resize((w, h), Image.BILINEAR)
    # Tint and flatten it towards a bench's mid-grey: a surface, not a scene.
    arr = np.asarray(img, dtype=np.float32)
    tint = rng.uniform(0.75, 1.15, size=3)
    mix = rng.uniform(0.35, 0.6)
    arr = (arr * tint) * mix + 128 * (1 - mix)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


# Finishes: (RGB, shine) of what each kind is made of; `new_variants` uses the second table.
METALS = {"zinc": (190, 192, 196), "steel": (150, 152, 158), "black_oxide": (55, 55, 60)}
NEW_FINISHES = {"brass": (200, 160, 70), "blue_anodised": (60, 90, 190), "red_anodised": (180, 50, 50), "nylon": (235, 232, 215)}
RESISTOR_BODY = (210, 180, 130)
FUSE_GLASS = (200, 215, 220)
BAND_COLOURS = [(0, 0, 0), (120, 70, 20), (220, 30, 30), (240, 130, 20), (240, 220, 30), (40, 160, 60), (40, 60, 200),
                (140, 60, 170), (128, 128, 128), (245, 245, 245), (200, 170, 60)]


def finish(rng: np.random.Generator, kind: str, variants: bool) -> tuple[int, int, int]:
    if variants:
        base = list(NEW_FINISHES.values())[int(rng.integers(len(NEW_FINISHES)))]
    elif kind in ("resistor",):
        base = RESISTOR_BODY
    elif kind == "fuse":
        base = FUSE_GLASS
    elif kind == "cable_tie":
        base = (240, 240, 235) if rng.random() < 0.5 else (30, 30, 30)
    else:
        base = list(METALS.values())[int(rng.integers(len(METALS)))]
    jitter = rng.uniform(0.9, 1.1, size=3)
    return tuple(int(min(255, c * j)) for c, j in zip(base, jitter))


def polygon(cx: float, cy: float, r: float, n: int, phase: float) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(phase + 2 * math.pi * i / n), cy + r * math.sin(phase + 2 * math.pi * i / n)) for i in range(n)]


def draw_part(kind: str, size: int, colour: tuple[int, int, int], rng: np.random.Generator, variants: bool) -> Image.Image:
    """One part on a transparent square of `size` pixels, centred, axis-aligned (rotated later)."""
    img = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    c = size / 2
    dark = tuple(int(v * 0.55) for v in colour) + (255,)
    fill = colour + (255,)
    hole = (0, 0, 0, 0)
    r = size * rng.uniform(0.30, 0.38)
    line = max(2, size // 60)
    if kind == "hex_nut":
        d.polygon(polygon(c, c, r, 6, 0), fill=fill, outline=dark, width=line)
        d.ellipse([c - r * 0.5, c - r * 0.5, c + r * 0.5, c + r * 0.5], fill=hole, outline=dark, width=line)
    elif kind == "square_nut":
        d.polygon(polygon(c, c, r, 4, math.pi / 4), fill=fill, outline=dark, width=line)
        d.ellipse([c - r * 0.45, c - r * 0.45, c + r * 0.45, c + r * 0.45], fill=hole, outline=dark, width=line)
    elif kind == "washer":
        inner = rng.uniform(0.55, 0.7) if variants else rng.uniform(0.4, 0.5)
        d.ellipse([c - r, c - r, c + r, c + r], fill=fill, outline=dark, width=line)
        d.ellipse([c - r * inner, c - r * inner, c + r * inner, c + r * inner], fill=hole, outline=dark, width=line)
    elif kind in ("bolt", "screw"):
        length = size * (rng.uniform(0.7, 0.85) if variants else rng.uniform(0.55, 0.7))
        shank = size * (0.10 if kind == "bolt" else 0.07)
        top = c - length / 2
        head = size * (0.13 if kind == "bolt" else 0.12)
        d.rectangle([c - shank / 2, top + head, c + shank / 2, top + length], fill=fill, outline=dark, width=line)
        pitch = size * (0.035 if kind == "bolt" else 0.05)
        y = top + head * 2.2
        while y < top + length - pitch:
            d.line([c - shank / 2, y, c + shank / 2, y + pitch * 0.6], fill=dark, width=max(1, line // 2))
            y += pitch
        if kind == "bolt":  # a hexagonal head seen from the side: a wide block with two facets
            d.rectangle([c - head * 1.2, top, c + head * 1.2, top + head * 1.1], fill=fill, outline=dark, width=line)
            for dx in (-0.4, 0.4):
                d.line([c + dx * head, top, c + dx * head, top + head * 1.1], fill=dark, width=line)
        else:  # a round (pan) head with a slot, and a pointed tip
            d.pieslice([c - head * 1.1, top - head * 0.2, c + head * 1.1, top + head * 1.9], 180, 360, fill=fill, outline=dark, width=line)
            d.line([c, top, c, top + head * 0.8], fill=dark, width=line * 2)
            d.polygon([(c - shank / 2, top + length), (c + shank / 2, top + length), (c, top + length + shank * 1.5)], fill=fill, outline=dark)
    elif kind == "gear":
        teeth = int(rng.integers(18, 26)) if variants else int(rng.integers(8, 13))
        pts = []
        for i in range(teeth * 2):
            a = 2 * math.pi * i / (teeth * 2)
            rr = r if i % 2 == 0 else r * 0.8
            pts += [(c + rr * math.cos(a - 0.12 / teeth * 6), c + rr * math.sin(a - 0.12 / teeth * 6)),
                    (c + rr * math.cos(a + 0.12 / teeth * 6), c + rr * math.sin(a + 0.12 / teeth * 6))]
        d.polygon(pts, fill=fill, outline=dark)
        d.ellipse([c - r * 0.25, c - r * 0.25, c + r * 0.25, c + r * 0.25], fill=hole, outline=dark, width=line)
    elif kind == "spring":
        coils = int(rng.integers(5, 9))
        length, width = size * 0.7, size * rng.uniform(0.14, 0.22)
        top = c - length / 2
        pts = [(c + (width / 2) * (1 if i % 2 else -1), top + length * i / (coils * 2)) for i in range(coils * 2 + 1)]
        d.line(pts, fill=fill, width=line * 3, joint="curve")
        d.line(pts, fill=dark, width=max(1, line // 2))
    elif kind == "bracket":
        arm, t = size * 0.6, size * 0.14
        x0, y0 = c - arm / 2, c - arm / 2
        d.polygon([(x0, y0), (x0 + t, y0), (x0 + t, y0 + arm - t), (x0 + arm, y0 + arm - t), (x0 + arm, y0 + arm), (x0, y0 + arm)],
                  fill=fill, outline=dark, width=line)
        for hx, hy in ((x0 + t / 2, y0 + arm * 0.3), (x0 + arm * 0.7, y0 + arm - t / 2)):
            d.ellipse([hx - t * 0.25, hy - t * 0.25, hx + t * 0.25, hy + t * 0.25], fill=hole)
    elif kind == "bearing":
        d.ellipse([c - r, c - r, c + r, c + r], fill=fill, outline=dark, width=line)
        d.ellipse([c - r * 0.78, c - r * 0.78, c + r * 0.78, c + r * 0.78], fill=dark)
        balls = int(rng.integers(7, 11))
        for i in range(balls):
            a = 2 * math.pi * i / balls
            bx, by, br = c + r * 0.62 * math.cos(a), c + r * 0.62 * math.sin(a), r * 0.13
            d.ellipse([bx - br, by - br, bx + br, by + br], fill=fill)
        d.ellipse([c - r * 0.48, c - r * 0.48, c + r * 0.48, c + r * 0.48], fill=fill, outline=dark, width=line)
        d.ellipse([c - r * 0.32, c - r * 0.32, c + r * 0.32, c + r * 0.32], fill=hole)
    elif kind == "cable_tie":
        length, t = size * 0.8, size * 0.045
        d.rectangle([c - t / 2, c - length / 2 + t * 3, c + t / 2, c + length / 2], fill=fill, outline=dark)
        d.rectangle([c - t * 1.6, c - length / 2, c + t * 1.6, c - length / 2 + t * 3], fill=fill, outline=dark, width=line)
        for y in np.arange(c - length / 2 + t * 4, c + length / 2, t * 1.2):
            d.line([c - t / 2, y, c + t / 2, y], fill=dark, width=1)
    elif kind in ("resistor", "fuse"):
        body_l = size * (0.32 if kind == "resistor" else 0.4)
        body_w = size * (0.11 if kind == "resistor" else 0.13)
        lead = (150, 150, 155, 255)
        d.line([c, c - size * 0.45, c, c + size * 0.45], fill=lead, width=max(2, size // 80))
        if kind == "resistor":
            d.rounded_rectangle([c - body_w / 2, c - body_l / 2, c + body_w / 2, c + body_l / 2], radius=body_w / 2.5, fill=fill, outline=dark, width=line)
            for k in range(4):
                y = c - body_l / 2 + body_l * (0.2 + 0.17 * k)
                band = BAND_COLOURS[int(rng.integers(len(BAND_COLOURS)))] + (255,)
                d.rectangle([c - body_w / 2, y, c + body_w / 2, y + body_l * 0.08], fill=band)
        else:  # a glass cartridge fuse: two metal caps and a wire inside
            d.rectangle([c - body_w / 2, c - body_l / 2, c + body_w / 2, c + body_l / 2], fill=fill[:3] + (200,), outline=dark, width=line)
            d.line([c - body_w * 0.2, c - body_l / 2, c + body_w * 0.2, c + body_l / 2], fill=(90, 90, 90, 255), width=max(1, line // 2))
            cap = (185, 185, 190, 255)
            for y in (c - body_l / 2, c + body_l / 2 - body_l * 0.18):
                d.rectangle([c - body_w * 0.55, y, c + body_w * 0.55, y + body_l * 0.18], fill=cap, outline=dark)
    else:
        raise ValueError(kind)
    # Shading: light from one side, as a bench lamp gives it.
    arr = np.asarray(img, dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size] / size
    a = rng.uniform(0, 2 * math.pi)
    shade = 0.8 + 0.4 * ((xx - 0.5) * math.cos(a) + (yy - 0.5) * math.sin(a) + 0.5)
    arr[..., :3] *= shade[..., None]
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8), "RGBA")


def occluder(rng: np.random.Generator, size: int) -> Image.Image:
    """A glove's fingertip, a scrap of cardboard or a stray part's edge."""
    img = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    kind = int(rng.integers(3))
    if kind == 0:
        colour = [(60, 100, 200), (230, 230, 230), (40, 40, 40)][int(rng.integers(3))]
        d.rounded_rectangle([size * 0.3, -size * 0.2, size * 0.7, size * 0.6], radius=size * 0.2, fill=colour + (255,))
    elif kind == 1:
        d.polygon([tuple(rng.uniform(0, size, 2)) for _ in range(5)], fill=(170, 130, 85, 255))
    else:
        d.rectangle([0, size * 0.4, size, size * 0.55], fill=(120, 120, 125, 255))
    return img.rotate(float(rng.uniform(0, 360)), resample=Image.BILINEAR)


def perspective_coeffs(src: list[tuple[float, float]], dst: list[tuple[float, float]]) -> list[float]:
    """PIL's PERSPECTIVE data: the map from output pixel (dst) to input pixel (src)."""
    a = []
    for (x, y), (u, v) in zip(dst, src):
        a.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        a.append([0, 0, 0, x, y, 1, -v * x, -v * y])
    b = np.array(src, dtype=np.float64).reshape(8)
    return np.linalg.solve(np.array(a, dtype=np.float64), b).tolist()


def render(domain: str, index: int, seed: int = SEED) -> tuple[bytes, int]:
    """Frame `index` of `domain`: (JPEG bytes, class index)."""
    rng = np.random.default_rng([seed, DOMAINS.index(domain), index])
    label = index % len(CLASSES)
    kind = CLASSES[label]
    variants = domain == "new_variants"
    w, h = WIDTH * SUPER, HEIGHT * SUPER
    frame = surface(rng, w, h)

    # The part: its size on the bench, then where the camera sees it.
    far = domain == "camera_moved"
    size = int(h * (rng.uniform(0.45, 0.6) if far else rng.uniform(0.6, 0.85)))
    part = draw_part(kind, size, finish(rng, kind, variants), rng, variants).rotate(float(rng.uniform(0, 360)), resample=Image.BICUBIC)
    cx = w / 2 + rng.uniform(-0.12, 0.12) * w
    cy = h / 2 + rng.uniform(-0.1, 0.1) * h
    pos = (int(cx - size / 2), int(cy - size / 2))
    alpha = part.getchannel("A")
    shadow = Image.new("RGBA", part.size, (0, 0, 0, 0))
    shadow.putalpha(alpha.point(lambda v: int(v * 0.45)).filter(ImageFilter.GaussianBlur(size / 40)))
    offset = (int(size * rng.uniform(0.02, 0.05)), int(size * rng.uniform(0.02, 0.05)))
    frame.paste(shadow, (pos[0] + offset[0], pos[1] + offset[1]), shadow)
    frame.paste(part, pos, part)
    if rng.random() < 1 / 3:
        occ_size = int(size * rng.uniform(0.4, 0.6))
        occ = occluder(rng, occ_size)
        ox = int(cx + rng.choice([-1, 1]) * size * rng.uniform(0.25, 0.4) - occ_size / 2)
        oy = int(cy + rng.choice([-1, 1]) * size * rng.uniform(0.25, 0.4) - occ_size / 2)
        frame.paste(occ, (ox, oy), occ)

    # The camera's view of the bench plane: corners pulled in by the tilt.
    tilt = rng.uniform(0.12, 0.22) if far else rng.uniform(0.0, 0.06)
    side = rng.choice([-1, 1])
    frame = frame.resize((WIDTH, HEIGHT), Image.LANCZOS)
    w, h = WIDTH, HEIGHT
    dx, dy = tilt * w, tilt * h * 0.5
    corners = [(0, 0), (w, 0), (w, h), (0, h)]
    if side > 0:
        seen = [(dx, dy), (w - dx, dy), (w, h), (0, h)]
    else:
        seen = [(0, 0), (w, 0), (w - dx, h - dy), (dx, h - dy)]
    # Pulled inwards only: the view never reaches past the edge of the bench.
    jitter = [(min(max(x + rng.uniform(-0.02, 0.02) * w, 0), w), min(max(y + rng.uniform(-0.02, 0.02) * h, 0), h)) for x, y in seen]
    frame = frame.transform((w, h), Image.PERSPECTIVE, perspective_coeffs(jitter, corners), resample=Image.BILINEAR)

    # Optics and sensor.
    if domain == "lens_blur":
        frame = frame.filter(ImageFilter.GaussianBlur(rng.uniform(1.6, 2.4)))
    arr = np.asarray(frame, dtype=np.float32) / 255.0
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    if domain == "lens_blur":
        r2 = ((xx - WIDTH / 2) / (WIDTH / 2)) ** 2 + ((yy - HEIGHT / 2) / (HEIGHT / 2)) ** 2
        arr *= (1 - 0.35 * r2 / 2)[..., None]
    if domain == "lighting":
        gain, cast, read_noise = rng.uniform(0.4, 0.55), np.array([1.15, 0.95, 0.65]), rng.uniform(0.03, 0.05)
    else:
        gain, cast, read_noise = rng.uniform(0.9, 1.1), rng.uniform(0.95, 1.05, size=3), rng.uniform(0.005, 0.015)
    arr = arr * gain * cast
    arr = arr ** (1 / rng.uniform(0.9, 1.1))
    shot = np.sqrt(np.clip(arr, 0, 1) / 255.0) * 0.5
    arr = arr + rng.normal(0, 1, arr.shape) * (read_noise + shot)
    img = Image.fromarray((arr.clip(0, 1) * 255 + 0.5).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue(), label


def _render_job(job: tuple[str, int, int]) -> tuple[bytes, int]:
    return render(*job)


def build(out: Path, per_class: int, seed: int = SEED) -> dict[str, int]:
    """Every domain's frames into one safetensors file: `jpeg` (all frames' bytes, concatenated),
    `offsets` [N+1], `labels` [N], `domain` [N] (index into DOMAINS), `index` [N] (the frame's
    index within its domain); class and domain names in the metadata."""
    import json

    from safetensors.numpy import save_file

    from concurrent.futures import ProcessPoolExecutor

    jobs = [(domain, i, seed) for domain in DOMAINS for i in range(per_class * len(CLASSES))]
    with ProcessPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        frames = list(pool.map(_render_job, jobs, chunksize=32))
    blobs = [np.frombuffer(jpeg, dtype=np.uint8) for jpeg, _ in frames]
    labels = [label for _, label in frames]
    domains = [DOMAINS.index(domain) for domain, _, _ in jobs]
    indices = [i for _, i, _ in jobs]
    offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(b) for b in blobs])
    tensors = {"jpeg": np.concatenate(blobs), "offsets": offsets, "labels": np.array(labels, dtype=np.int64),
               "domain": np.array(domains, dtype=np.uint8), "index": np.array(indices, dtype=np.int64)}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file(tensors, str(tmp), metadata={"classes": json.dumps(CLASSES), "domains": json.dumps(DOMAINS), "seed": str(seed),
                                           "width": str(WIDTH), "height": str(HEIGHT), "made_by": "deploy/export/camera_task.py"})
    os.replace(tmp, out)
    return {"frames": len(blobs), "bytes": int(offsets[-1])}


def load(path: Path) -> dict:
    """The file `build` wrote: frames as JPEG bytes with their labels and domains."""
    import json

    from safetensors import safe_open
    from safetensors.numpy import load_file

    t = load_file(str(path))
    with safe_open(str(path), "np") as f:
        meta = f.metadata()
    off = t["offsets"]
    frames = [t["jpeg"][off[i]:off[i + 1]].tobytes() for i in range(len(off) - 1)]
    return {"frames": frames, "labels": t["labels"], "domain": t["domain"], "index": t["index"],
            "classes": json.loads(meta["classes"]), "domains": json.loads(meta["domains"])}


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--per-class", type=int, default=40, help="frames per class and domain")
    ap.add_argument("--preview", default="", help="also write a contact sheet of each domain (PNG) into this directory")
    args = ap.parse_args(argv)
    stats = build(Path(args.out), args.per_class)
    print(f"camera task: {stats['frames']} frames of {len(CLASSES)} classes in {len(DOMAINS)} domains, {stats['bytes'] / 1e6:.1f} MB of JPEG")
    if args.preview:
        preview = Path(args.preview)
        preview.mkdir(parents=True, exist_ok=True)
        for domain in DOMAINS:
            sheet = Image.new("RGB", (WIDTH * 6, HEIGHT * 4))
            for i in range(24):
                frame = Image.open(io.BytesIO(render(domain, i)[0]))
                sheet.paste(frame, ((i % 6) * WIDTH, (i // 6) * HEIGHT))
            sheet.save(preview / f"{domain}.png")


if __name__ == "__main__":
    main(sys.argv[1:])
