"""Shifts: does adaptd, left to its shipped defaults, end up better than what a person would train
offline on the same samples? (`make bench`; `--quick` runs one shift, in `make test`.)

    python benches/shifts.py [--only NAME[,NAME]] [--quick] [--daemon PATH]

For each shift of the digits (geometry, blur, noise, pixel dropout, contrast, occlusion and
combinations, and a cell whose traffic still holds upright digits), the real daemon runs with
the shipped configuration (only the broker, the bundle, the state directory and the task set),
a real Mosquitto broker carries the training samples at QoS 1, and the daemon decides alone
when to train, what to train, and whether to promote. Once it has settled (no job running or
due), its final adapter is measured on held-out shifted digits through its HTTP API. The same
training samples then train offline references on raw pixels (logistic regression, an MLP, an
RBF SVM; scikit-learn) and a full fine-tune of the same network (PyTorch). Also reported: the
base model's accuracy, upright (base-domain) accuracy before and after, the share of
base-domain traffic the daemon measured, and the time from the last sample's PUBACK to the
final promotion.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BUNDLE = ROOT / "build" / "bundles" / "digits-cnn"
TEST_SHARE = 0.3


def rotate(images: np.ndarray, degrees: float) -> np.ndarray:
    from scipy.ndimage import rotate as nd_rotate
    return nd_rotate(images, degrees, axes=(3, 2), reshape=False, order=1, mode="constant").clip(0, 1)


def shift_images(name: str, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`images` [N, 1, 8, 8] in [0, 1]; the shifted copy."""
    from scipy.ndimage import gaussian_filter
    if name == "rotate90":
        return np.rot90(images, k=-1, axes=(2, 3)).copy()
    if name == "rotate30":
        return rotate(images, 30)
    if name == "blur":
        return gaussian_filter(images, sigma=(0, 0, 0.9, 0.9)).clip(0, 1)
    if name == "noise":
        return (images + rng.normal(0, 0.35, images.shape)).clip(0, 1)
    if name == "dropout":
        return images * (rng.random(images.shape) > 0.35)
    if name == "invert":
        return 1.0 - images
    if name == "occlusion":
        out = images.copy()
        for i in range(len(out)):
            r, c = rng.integers(0, 5, size=2)
            out[i, :, r:r + 4, c:c + 4] = 0
        return out
    if name == "rotate90+noise":
        return shift_images("noise", shift_images("rotate90", images, rng), rng)
    if name == "blur+dropout":
        return shift_images("dropout", shift_images("blur", images, rng), rng)
    raise ValueError(name)


# The cell "mixed" keeps a third of its traffic upright: its base-domain accuracy must hold.
SHIFTS = ["rotate90", "rotate30", "blur", "noise", "dropout", "invert", "occlusion", "rotate90+noise", "blur+dropout", "mixed"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mosquitto(directory: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    conf = directory / "mosquitto.conf"
    user = "user root\n" if os.getuid() == 0 else ""
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 0\n{user}")
    binary = next(p for p in ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"] if Path(p).exists())
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 5
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.02)
    raise RuntimeError("mosquitto did not start")


def http(method: str, url: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read() or b"null")


class Daemon:
    """The real daemon on the shipped configuration: only where things are is set."""

    def __init__(self, binary: Path, directory: Path, broker_port: int, overrides: dict[str, dict[str, str]]):
        self.http_port = free_port()
        self.base = f"http://127.0.0.1:{self.http_port}"
        config = directory / "adaptd.toml"
        config.write_text(
            f'bundle = "{BUNDLE}"\nstate_dir = "{directory / "state"}"\n[http]\nlisten = "127.0.0.1:{self.http_port}"\n'
            f'[mqtt]\nhost = "127.0.0.1"\nport = {broker_port}\ndevice_id = "cell"\ninference_api = false\n[ingest]\ntasks = ["sorter"]\n'
            + "".join(f"[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items()) for section, keys in overrides.items())
        )
        self.log = open(directory / "daemon.log", "w")
        self.proc = subprocess.Popen([str(binary), "serve", "--config", str(config)], stdout=subprocess.DEVNULL, stderr=self.log,
                                     env={**os.environ, "ADAPTD_LOG": "warn"})
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                metrics = urllib.request.urlopen(f"{self.base}/metrics", timeout=1).read().decode()
                if "adaptd_ingest_connected 1" in metrics:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the daemon did not come up; see {directory / 'daemon.log'}")

    def predict(self, images: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(images), 64):
            chunk = images[start:start + 64]
            r = http("POST", f"{self.base}/v1/tasks/sorter/predict",
                     {"inputs": {"image": {"shape": list(chunk.shape), "data": [round(float(v), 4) for v in chunk.ravel()]}}})
            out += [int(p["label"]) for p in r["predictions"]]
        return np.array(out)

    def status(self) -> dict:
        return http("GET", f"{self.base}/v1/tasks/sorter/status")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def publish(port: int, lines: list[str]) -> float:
    """At QoS 1; returns when the broker has acknowledged the last one."""
    p = subprocess.run(["mosquitto_pub", "-p", str(port), "-q", "1", "-t", "adaptd/v1/cell/samples/sorter", "-l"],
                       input="\n".join(lines) + "\n", text=True, capture_output=True)
    if p.returncode != 0:
        raise RuntimeError(p.stderr)
    return time.time()


def settle(daemon: Daemon, journal: Path, idle_s: float, timeout_s: float) -> list[dict]:
    """Wait until no job runs or is due for `idle_s` (or `timeout_s` passes); the journal then."""
    started, quiet_since, last_jobs = time.time(), time.time(), None
    while time.time() - started < timeout_s:
        s = daemon.status()
        state = s["scheduler"]["state"]
        jobs = json.dumps(s["jobs"], sort_keys=True)
        if state in ("training", "validating") or jobs != last_jobs:
            quiet_since, last_jobs = time.time(), jobs
        elif time.time() - quiet_since > idle_s:
            break
        time.sleep(0.25)
    if not journal.exists():
        return []
    return [json.loads(line) for line in journal.read_text().splitlines() if line.strip()]


def base_predict(images: np.ndarray) -> np.ndarray:
    import onnxruntime as ort
    session = ort.InferenceSession(str(BUNDLE / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {i.name: np.zeros([d if isinstance(d, int) else 0 for d in i.shape], np.float32) for i in session.get_inputs() if i.name != "image"}
    feeds["image"] = images.astype(np.float32)
    embedding, logits = session.run(["embedding", "logits"], feeds)
    return logits.argmax(1)


def references(train_x, train_y, test_x, test_y, retention_x, retention_y, seed: int) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.svm import SVC
    flat = lambda x: x.reshape(len(x), -1)  # noqa: E731
    out = {}
    for name, model in [("logreg", LogisticRegression(max_iter=2000, C=1.0)),
                        ("mlp", MLPClassifier(hidden_layer_sizes=(128,), max_iter=800, random_state=seed)),
                        ("svm_rbf", SVC(kernel="rbf", C=10, gamma="scale"))]:
        model.fit(flat(train_x), train_y)
        out[name] = float((model.predict(flat(test_x)) == test_y).mean())
    out["full_finetune"], out["full_finetune_upright"] = full_finetune(train_x, train_y, test_x, test_y, retention_x, retention_y, seed)
    return out


def full_finetune(train_x, train_y, test_x, test_y, retention_x, retention_y, seed: int) -> tuple[float, float]:
    """Every weight of the same pre-trained CNN, AdamW with warm-up and cosine decay, best epoch by
    a 10 % validation split of the same training samples."""
    import torch
    sys.path.insert(0, str(ROOT / "benches"))
    from peft_reference import digits_model, fit  # the reference harness compare_training uses
    torch.manual_seed(seed)
    n_val = max(1, len(train_x) // 10)
    order = np.random.default_rng(seed).permutation(len(train_x))
    val, tr = order[:n_val], order[n_val:]
    t = lambda a: torch.tensor(np.ascontiguousarray(a), dtype=torch.float32)  # noqa: E731
    l = lambda a: torch.tensor(a, dtype=torch.int64)  # noqa: E731, E741
    model = digits_model()
    logits = lambda x: model(x)[1]  # noqa: E731
    head = list(model.classifier.parameters())
    body = [p for n, p in model.named_parameters() if not n.startswith("classifier.")]
    fit(model, logits, [{"params": head, "lr": 5e-3}, {"params": body, "lr": 1e-3}], ((t(train_x[tr]),), l(train_y[tr])), ((t(train_x[val]),), l(train_y[val])), 30, seed=seed)
    model.eval()
    with torch.no_grad():
        test = (logits(t(test_x)).argmax(1).numpy() == test_y).mean()
        upright = (logits(t(retention_x)).argmax(1).numpy() == retention_y).mean()
    return float(test), float(upright)


def sample_lines(prefix: str, images: np.ndarray, labels: np.ndarray) -> list[str]:
    return [json.dumps({"key": f"{prefix}:{i}", "task": "sorter", "label": str(int(y)),
                        "input": {"shape": [1, 1, 8, 8], "data": [round(float(v), 4) for v in x.ravel()]}})
            for i, (x, y) in enumerate(zip(images, labels))]


def run_shift(name: str, binary: Path, data: dict, seed: int, quick: bool, overrides: dict[str, dict[str, str]], keep: bool = False) -> dict:
    rng = np.random.default_rng(seed)
    images, labels, retention = data["images"], data["labels"], data["retention"].astype(bool)
    pool = np.where(~retention)[0]
    pool = pool[rng.permutation(len(pool))]
    if quick:
        pool = pool[:700]
    n_test = int(TEST_SHARE * len(pool))
    test, train = pool[:n_test], pool[n_test:]
    shift = "rotate90" if name == "mixed" else name
    train_x = shift_images(shift, images[train], rng).astype(np.float32)
    test_x = shift_images(shift, images[test], rng).astype(np.float32)
    # Base-domain accuracy on upright digits of the test split: the bundle's retention set is what
    # the daemon checks forgetting (and routes) by, so it would flatter the figure.
    upright_x, upright_y = images[test].astype(np.float32), labels[test]
    train_y, test_y = labels[train], labels[test]
    if name == "mixed":
        # A third of the cell's cameras still upright: samples (and traffic) of both views.
        upright = np.arange(len(train)) % 3 == 2
        train_x[upright] = images[train][upright]
    directory = Path(tempfile.mkdtemp(prefix=f"adaptd-shift-{name}-"))
    broker, port = mosquitto(directory)
    daemon = Daemon(binary, directory, port, overrides)
    try:
        # The base model measured on the side (ONNX Runtime on the bundle's graph): requests to the
        # daemon would count as its traffic, and this traffic is the cell's, not the bench's.
        base_test = float((base_predict(test_x) == test_y).mean())
        base_upright = float((base_predict(upright_x) == upright_y).mean())
        last_puback = publish(port, sample_lines(name, train_x, train_y))
        records = settle(daemon, directory / "state" / "journal" / "sorter.jsonl", idle_s=12.0, timeout_s=240.0)
        final_test = float((daemon.predict(test_x) == test_y).mean())
        final_upright = float((daemon.predict(upright_x) == upright_y).mean())
        jobs = [r for r in records if r.get("event") == "job"]
        promoted = [r for r in jobs if r.get("promote")]
        last_promotion = max((r["time_ms"] / 1000 for r in promoted), default=None)
        shares = [r["evidence"].get("base_traffic_share") for r in jobs if r["evidence"].get("base_traffic_share")]
        result = {
            "shift": name, "train": len(train), "test": len(test),
            "base": base_test, "adaptd": final_test, "serving_version": daemon.status()["serving_version"],
            "jobs": len(jobs), "promoted": len(promoted),
            "kinds": [r.get("kind") for r in promoted], "rejections": [r["summary"][:160] for r in jobs if not r.get("promote")],
            "seconds_to_final": None if last_promotion is None else max(0.0, last_promotion - last_puback),
            "upright_before": base_upright, "upright_after": final_upright,
            "base_traffic_share": shares[-1][0] if shares else None,
        }
    finally:
        daemon.stop()
        broker.terminate()
        broker.wait()
    result.update(references(train_x, train_y, test_x, test_y, upright_x, upright_y, seed))
    best_offline = max(result["logreg"], result["mlp"], result["svm_rbf"])
    result["beats_raw_references"] = result["adaptd"] >= best_offline
    result["vs_full_finetune"] = result["adaptd"] / result["full_finetune"] if result["full_finetune"] else None
    if keep:
        print(f"{name}: kept {directory}", file=sys.stderr)
    else:
        shutil.rmtree(directory, ignore_errors=True)
    return result


def table(results: list[dict]) -> str:
    pct = lambda v: "–" if v is None else f"{100 * v:5.1f}"  # noqa: E731
    lines = ["| shift | base | adaptd | s to final | logreg | MLP | SVM | full FT | adaptd/full FT | upright before → after | base traffic | promoted (kinds) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        seconds = "–" if r["seconds_to_final"] is None else f"{r['seconds_to_final']:.0f}"
        lines.append(
            f"| {r['shift']} | {pct(r['base'])} | **{pct(r['adaptd'])}** | {seconds} | {pct(r['logreg'])} | {pct(r['mlp'])} | {pct(r['svm_rbf'])} "
            f"| {pct(r['full_finetune'])} | {r['vs_full_finetune']:.2f} | {pct(r['upright_before'])} → {pct(r['upright_after'])} "
            f"| {pct(r['base_traffic_share'])} | {r['promoted']}/{r['jobs']} ({', '.join(k or '?' for k in r['kinds'])}) |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="")
    ap.add_argument("--quick", action="store_true", help="one shift, fewer samples: the check `make test` runs")
    ap.add_argument("--daemon", default=str(ROOT / "target" / "release" / "adaptd"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="")
    ap.add_argument("--keep", action="store_true", help="keep each cell's state directory (journal, adapters) to look into")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="for tuning experiments only: a configuration key other than the shipped one (TOML value)")
    args = ap.parse_args()
    binary = Path(args.daemon)
    if not binary.exists():
        sys.exit(f"{binary} does not exist: cargo build --release -p adaptd (or pass --daemon)")
    from safetensors.numpy import load_file
    data = load_file(str(ROOT / "build" / "data" / "digits.safetensors"))
    overrides: dict[str, dict[str, str]] = {}
    for item in args.set:
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        overrides.setdefault(section, {})[name] = value
    if overrides:
        print(f"NOT the shipped configuration: {args.set}")
    names = ["rotate90"] if args.quick else [n for n in (args.only.split(",") if args.only else SHIFTS)]
    results = []
    for name in names:
        started = time.time()
        r = run_shift(name, binary, data, args.seed, args.quick, overrides, args.keep)
        results.append(r)
        print(f"{name}: base {r['base']:.3f} → adaptd {r['adaptd']:.3f} (best raw-pixel reference {max(r['logreg'], r['mlp'], r['svm_rbf']):.3f}, "
              f"full fine-tune {r['full_finetune']:.3f}); upright {r['upright_before']:.3f} → {r['upright_after']:.3f}; "
              f"{r['promoted']}/{r['jobs']} jobs promoted; {time.time() - started:.0f} s", flush=True)
        for why in r["rejections"]:
            print(f"  rejected: {why}")
    print()
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.quick:
        r = results[0]
        assert r["promoted"] >= 1, f"the daemon promoted nothing on {r['shift']}: {r['rejections']}"
        assert r["adaptd"] >= r["base"] + 0.3, f"adapted {r['adaptd']:.3f} vs base {r['base']:.3f}"
        print("quick shift check: passed")


if __name__ == "__main__":
    main()
