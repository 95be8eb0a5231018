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

The text shifts (MiniLM on Home Assistant's intents) and the camera shifts (EfficientNet-Lite0 on
the parts-sorting camera task, frames as JPEG over MQTT and raw RGB over HTTP) follow the same
story: the device learns the base domain first, then the shift; their references are described
beside TEXT_SHIFTS and CAMERA_SHIFTS below.
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

    def __init__(self, binary: Path, directory: Path, broker_port: int, overrides: dict[str, dict[str, str]], bundle: Path = BUNDLE, task: str = "sorter"):
        self.http_port = free_port()
        self.base = f"http://127.0.0.1:{self.http_port}"
        self.task = task
        config = directory / "adaptd.toml"
        config.write_text(
            f'bundle = "{bundle}"\nstate_dir = "{directory / "state"}"\n[http]\nlisten = "127.0.0.1:{self.http_port}"\n'
            f'[mqtt]\nhost = "127.0.0.1"\nport = {broker_port}\ndevice_id = "cell"\ninference_api = false\n[ingest]\ntasks = ["{task}"]\n'
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

    def predict_text(self, texts: list[str]) -> list[str]:
        out: list[str] = []
        for start in range(0, len(texts), 32):
            r = http("POST", f"{self.base}/v1/tasks/{self.task}/predict", {"text": texts[start:start + 32]})
            out += [p["label"] for p in r["predictions"]]
        return out

    def status(self) -> dict:
        return http("GET", f"{self.base}/v1/tasks/{self.task}/status")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


# Labels flipped at random before publishing (`--flip`): each sample, with this probability, goes
# out under another of the labels its batch uses, chosen uniformly. Test labels stay true. With
# `withhold`, the shift's flipped samples are not published at all: what a perfect search for wrong
# labels could give, which is all that leaving them out can.
FLIP = {"fraction": 0.0, "seed": 0, "flipped": 0, "published": 0, "no_references": False, "binary": None, "withhold": False}


def flip_labels(lines: list[str], shift: bool = False) -> list[str]:
    """The lines to publish, some flipped; `shift`: these are the shift's samples (not the
    base-domain ones a text cell publishes first), whose flips `withhold` keeps back."""
    if FLIP["fraction"] <= 0:
        return lines
    rng = np.random.default_rng(FLIP["seed"] + FLIP["published"])
    samples = [json.loads(line) for line in lines]
    labels = sorted({s["label"] for s in samples})
    for s in samples:
        # The sender's name says which went out flipped, so the suspects' listing shows the
        # search's precision and recall by source.
        s["source"] = "true"
        if len(labels) > 1 and rng.random() < FLIP["fraction"]:
            s["label"] = str(rng.choice([label for label in labels if label != s["label"]]))
            s["source"] = "flipped"
            FLIP["flipped"] += 1
    FLIP["published"] += len(samples)
    if shift and FLIP["withhold"]:
        samples = [s for s in samples if s["source"] != "flipped"]
    return [json.dumps(s) for s in samples]


def publish(port: int, lines: list[str], task: str = "sorter", shift: bool = False) -> float:
    """At QoS 1; returns when the broker has acknowledged the last one. `shift`: see `flip_labels`."""
    lines = flip_labels(lines, shift)
    p = subprocess.run(["mosquitto_pub", "-p", str(port), "-q", "1", "-t", f"adaptd/v1/cell/samples/{task}", "-l"],
                       input="\n".join(lines) + "\n", text=True, capture_output=True)
    if p.returncode != 0:
        raise RuntimeError(p.stderr)
    return time.time()


def settle(daemon: Daemon, journal: Path, idle_s: float, timeout_s: float, collecting_is_busy: bool = False) -> list[dict]:
    """Wait until no job runs or is due for `idle_s` (or `timeout_s` passes); the journal then.
    With `collecting_is_busy`, a task collecting samples for a job (arrivals not yet settled)
    counts as busy too: on a loaded machine that job can start later than an idle time allows."""
    started, quiet_since, last_jobs = time.time(), time.time(), None
    while time.time() - started < timeout_s:
        s = daemon.status()
        state = s["scheduler"]["state"]
        jobs = json.dumps(s["jobs"], sort_keys=True)
        busy = ("training", "validating", "collecting") if collecting_is_busy else ("training", "validating")
        if state in busy or jobs != last_jobs:
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


def digits_split(name: str, data: dict, seed: int, quick: bool = False):
    """The shift's training and test digits: indices into `data`, and the images shifted."""
    rng = np.random.default_rng(seed)
    pool = np.where(~data["retention"].astype(bool))[0]
    pool = pool[rng.permutation(len(pool))]
    if quick:
        pool = pool[:700]
    n_test = int(TEST_SHARE * len(pool))
    test, train = pool[:n_test], pool[n_test:]
    shift = "rotate90" if name == "mixed" else name
    train_x = shift_images(shift, data["images"][train], rng).astype(np.float32)
    test_x = shift_images(shift, data["images"][test], rng).astype(np.float32)
    return train, test, train_x, test_x, rng


def run_shift(name: str, binary: Path, data: dict, seed: int, quick: bool, overrides: dict[str, dict[str, str]], keep: bool = False) -> dict:
    images, labels = data["images"], data["labels"]
    train, test, train_x, test_x, _ = digits_split(name, data, seed, quick)
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
        last_puback = publish(port, sample_lines(name, train_x, train_y), shift=True)
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
    refs = NO_REFERENCES if FLIP["no_references"] else references(train_x, train_y, test_x, test_y, upright_x, upright_y, seed)
    return with_references(result, refs, directory, keep)


# The label-noise table compares the daemon with itself: no offline references.
NO_REFERENCES = {"logreg": 0.0, "mlp": 0.0, "svm_rbf": 0.0, "full_finetune": None}


def suspect_figures(directory: Path) -> dict:
    """How the search for wrong labels did, by the senders `flip_labels` names: suspects among
    the flipped samples (recall) and among the true ones (false alarms)."""
    state = directory / "state"
    if not (state / "samples.db").exists() or not FLIP["binary"]:
        return {}
    out = subprocess.run([str(FLIP["binary"]), "samples", "suspects", "--json", "--state-dir", str(state)], capture_output=True, text=True)
    if out.returncode != 0:
        return {}
    tasks = json.loads(out.stdout)
    import sqlite3
    db = sqlite3.connect(str(state / "samples.db"))
    totals = dict(db.execute("SELECT source, COUNT(*) FROM samples WHERE source IS NOT NULL GROUP BY source").fetchall())
    db.close()
    doubted = {"flipped": 0, "true": 0}
    for t in tasks:
        for sus in t["suspects"]:
            if sus["suggested"] is not None and sus["source"] in doubted:
                doubted[sus["source"]] += 1
    return {"suspects_flipped": doubted["flipped"], "flipped": totals.get("flipped", 0),
            "suspects_true": doubted["true"], "true": totals.get("true", 0)}


def with_references(result: dict, refs: dict, directory: Path, keep: bool) -> dict:
    """The cell's result with the offline references beside it; its state directory kept or gone."""
    result.update(refs)
    result.update(suspect_figures(directory))
    best_offline = max(result["logreg"], result["mlp"], result["svm_rbf"])
    result["beats_raw_references"] = result["adaptd"] >= best_offline
    result["vs_full_finetune"] = result["adaptd"] / result["full_finetune"] if result["full_finetune"] else None
    if keep:
        print(f"{result['shift']}: kept {directory}", file=sys.stderr)
    else:
        shutil.rmtree(directory, ignore_errors=True)
    return result


# Text: all-MiniLM-L6-v2 (the `minilm` bundle: embeddings, no classifier of its own) learning
# Home Assistant's English intents. The device first learns 20 intents from clean sentences; then
# what it hears moves, and it must follow:
#   typos        the same intents, typed in a hurry (characters dropped, doubled, swapped)
#   phrasings    the same intents, said with the other half of each intent's sentence templates
#   new_intents  eight intents it never had, among the old ones
TEXT_SHIFTS = ["typos", "phrasings", "new_intents"]
MINILM = ROOT / "build" / "bundles" / "minilm"


def typo(text: str, rng: np.random.Generator) -> str:
    """About every third word of more than three letters gets one slip of the finger."""
    words = text.split()
    for i, w in enumerate(words):
        if len(w) > 3 and rng.random() < 0.35:
            j = int(rng.integers(1, len(w) - 1))
            kind = rng.integers(0, 3)
            words[i] = w[:j] + w[j + 1:] if kind == 0 else w[:j] + w[j] + w[j:] if kind == 1 else w[:j - 1] + w[j] + w[j - 1] + w[j + 1:]
    return " ".join(words)


def text_lines(prefix: str, texts: list[str], labels: list[str], task: str) -> list[str]:
    return [json.dumps({"key": f"{prefix}:{i}", "task": task, "label": y, "text": t}) for i, (t, y) in enumerate(zip(texts, labels))]


def text_cell_data(name: str, rng: np.random.Generator) -> dict:
    """(texts, labels) for: `before` (what the device learnt first), `after` (what it hears once
    things moved: published as samples), `test` (held out, moved), `old_test` (held out, as before)."""
    sys.path.insert(0, str(ROOT / "benches"))
    from compare_training import OTHER_INTENTS, TEXT_INTENTS, intent_pools
    pools = intent_pools(TEXT_INTENTS + OTHER_INTENTS, per_template=40)
    parts: dict[str, tuple[list[str], list[str]]] = {k: ([], []) for k in ("before", "after", "test", "old_test")}

    def add(part: str, texts: list[str], label: str) -> None:
        parts[part][0].extend(texts)
        parts[part][1].extend([label] * len(texts))

    for intent in TEXT_INTENTS + (OTHER_INTENTS if name == "new_intents" else []):
        groups = pools[intent]
        if name == "phrasings" and len(groups) >= 2:
            # Even templates are how the intent was said before, odd ones how it is said now.
            old = [t for g in groups[0::2] for t in g]
            new = [t for g in groups[1::2] for t in g]
        else:
            old = [t for g in groups for t in g]
            new = old
        old, new = [str(t) for t in rng.permutation(old)], [str(t) for t in rng.permutation(new)]
        is_new_intent = intent in OTHER_INTENTS
        if not is_new_intent:
            add("before", old[:10], intent)
            add("old_test", old[10:25], intent)
        seen = set(old[:25])
        fresh = [t for t in new if t not in seen]
        moved = [typo(t, rng) for t in fresh] if name == "typos" else fresh
        after_n = 25 if is_new_intent or name != "new_intents" else 6
        add("after", moved[:after_n], intent)
        add("test", moved[after_n:after_n + 15], intent)
    return parts


def text_references(train: tuple[list[str], list[str]], test: tuple[list[str], list[str]], seed: int) -> dict:
    """Offline models on the same samples: word and character n-gram TF-IDF (the raw text) with
    logistic regression, an MLP and an RBF SVM, and a full fine-tune of MiniLM plus a head."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline, make_union
    from sklearn.svm import SVC
    out = {}
    for name, model in [("logreg", LogisticRegression(max_iter=3000, C=10.0)),
                        ("mlp", MLPClassifier(hidden_layer_sizes=(128,), max_iter=800, random_state=seed)),
                        ("svm_rbf", SVC(kernel="rbf", C=10, gamma="scale"))]:
        features = make_union(TfidfVectorizer(analyzer="word", ngram_range=(1, 2)), TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4)))
        pipe = make_pipeline(features, model).fit(train[0], train[1])
        out[name] = float(np.mean(np.array(pipe.predict(test[0])) == np.array(test[1])))
    out["full_finetune"] = text_full_finetune(train, test, seed)
    return out


def text_full_finetune(train: tuple[list[str], list[str]], test: tuple[list[str], list[str]], seed: int) -> float:
    """Every weight of MiniLM and a new head, AdamW with warm-up and cosine decay (learning rates
    as compare_training's text reference), best epoch by a 10 % validation split."""
    import torch
    from tokenizers import Tokenizer
    sys.path.insert(0, str(ROOT / "benches"))
    from peft_reference import fit, minilm
    labels = sorted(set(train[1]))
    index = {l: i for i, l in enumerate(labels)}
    tok = Tokenizer.from_file(str(MINILM / "tokenizer.json"))
    tok.enable_truncation(64)
    tok.enable_padding()

    def encode(texts: list[str]):
        enc = tok.encode_batch(texts)
        return torch.tensor([e.ids for e in enc]), torch.tensor([e.attention_mask for e in enc])

    torch.manual_seed(seed)
    order = np.random.default_rng(seed).permutation(len(train[0]))
    n_val = max(1, len(order) // 10)
    pick = lambda idx: ([train[0][i] for i in idx], torch.tensor([index[train[1][i]] for i in idx]))  # noqa: E731
    (tr_x, tr_y), (va_x, va_y) = pick(order[n_val:]), pick(order[:n_val])
    body, head = minilm(), torch.nn.Linear(384, len(labels))
    model = torch.nn.ModuleDict({"body": body, "head": head})
    forward = lambda ids, mask: head(body(ids, mask))  # noqa: E731
    fit(model, forward, [{"params": list(head.parameters()), "lr": 5e-3}, {"params": list(body.parameters()), "lr": 5e-5}],
        (encode(tr_x), tr_y), (encode(va_x), va_y), 10, seed=seed)
    model.eval()
    with torch.no_grad():
        ids, mask = encode(test[0])
        predicted = [labels[i] for i in forward(ids, mask).argmax(1).tolist()]
    return float(np.mean(np.array(predicted) == np.array(test[1])))


def run_text_shift(name: str, binary: Path, seed: int, overrides: dict[str, dict[str, str]], keep: bool = False, bundle: Path = MINILM) -> dict:
    parts = text_cell_data(name, np.random.default_rng(seed))
    task = "assistant"
    result, directory = run_before_after(name, binary, overrides, bundle, task, parts, lambda key: text_lines(key, *parts[key], task),
                                         lambda daemon, texts: daemon.predict_text(texts))
    train = (parts["before"][0] + parts["after"][0], parts["before"][1] + parts["after"][1])
    refs = NO_REFERENCES if FLIP["no_references"] else text_references(train, parts["test"], seed)
    return with_references(result, refs, directory, keep)


def run_before_after(name: str, binary: Path, overrides: dict[str, dict[str, str]], bundle: Path, task: str, parts: dict,
                     lines, predict) -> tuple[dict, Path]:
    """The device learns `parts["before"]` (published as `lines("before")`), then the shift
    (`lines("after")`); accuracy on `test` (the shift) and `old_test` (as before) through
    `predict(daemon, inputs)` before and after. "Upright" here: the old domain as it was."""
    directory = Path(tempfile.mkdtemp(prefix=f"adaptd-shift-{name}-"))
    broker, port = mosquitto(directory)
    daemon = Daemon(binary, directory, port, overrides, bundle=bundle, task=task)
    journal = directory / "state" / "journal" / f"{task}.jsonl"
    accuracy = lambda inputs, labels: float(np.mean(np.array(predict(daemon, inputs)) == np.array(labels)))  # noqa: E731
    try:
        # A task collecting samples is busy here: on a loaded machine its job can start more than
        # the idle time after the last sample, and measuring before it would score no adapter
        # (a bundle without a classifier refuses) or the one from before the shift.
        publish(port, lines("before"), task)
        before = settle(daemon, journal, idle_s=15.0, timeout_s=900.0, collecting_is_busy=True)
        v_before = daemon.status()["serving_version"]
        base, old_before = accuracy(*parts["test"]), accuracy(*parts["old_test"])
        last_puback = publish(port, lines("after"), task, shift=True)
        records = settle(daemon, journal, idle_s=15.0, timeout_s=1200.0, collecting_is_busy=True)
        final, old_after = accuracy(*parts["test"]), accuracy(*parts["old_test"])
        jobs = [r for r in records[len(before):] if r.get("event") == "job"]
        promoted = [r for r in jobs if r.get("promote")]
        last_promotion = max((r["time_ms"] / 1000 for r in promoted), default=None)
        result = {
            "shift": name, "train": len(parts["before"][0]) + len(parts["after"][0]), "test": len(parts["test"][0]),
            "base": base, "adaptd": final, "serving_version": daemon.status()["serving_version"], "version_before": v_before,
            "jobs": len(jobs), "promoted": len(promoted),
            "kinds": [r.get("kind") for r in promoted], "rejections": [r["summary"][:160] for r in jobs if not r.get("promote")],
            "seconds_to_final": None if last_promotion is None else max(0.0, last_promotion - last_puback),
            "upright_before": old_before, "upright_after": old_after, "base_traffic_share": None,
        }
    finally:
        daemon.stop()
        broker.terminate()
        broker.wait()
    return result, directory


# Camera: EfficientNet-Lite0 (the `efficientnet-lite0` bundle: ImageNet features, no classifier
# for the task's classes) learning the parts-sorting station's twelve kinds of parts from 320x240
# JPEG frames (deploy/export/camera_task.py). The device first learns the parts as commissioned
# (`base`); then the camera sees one of the shifts a fixed camera really meets, and must follow:
#   lighting      the evening shift: half the light, a tungsten cast, gain noise
#   camera_moved  the camera knocked: a steeper view, parts smaller and further off
#   lens_blur     a replaced lens, slightly out of focus, with vignetting
#   new_variants  a new supplier: brass, anodised and nylon parts, other proportions
# The references train on the same frames: a linear probe, an MLP and an RBF SVM on the frozen
# ImageNet features (in the logreg / MLP / SVM columns), PEFT LoRA at adaptd's rank on the same
# layers plus a head, and a full fine-tune of the same backbone plus a head.
CAMERA_SHIFTS = ["lighting", "camera_moved", "lens_blur", "new_variants"]
CAMERA = ROOT / "build" / "bundles" / "efficientnet-lite0"
CAMERA_DATA = ROOT / "build" / "data" / "camera.safetensors"
# Per class: frames the device learns first, base frames held out, shifted frames published, shifted held out.
# 17 x 12 = 204 frames first: the shipped scheduler trains once 200 new samples are in.
CAMERA_SPLIT = {"before": 17, "old_test": 15, "after": 20, "test": 20}


def camera_module():
    sys.path.insert(0, str(ROOT / "deploy" / "export"))
    import camera_task
    return camera_task


def camera_cell_data(name: str, rng: np.random.Generator) -> dict:
    """(frames, labels) for `before`, `old_test` (base domain) and `after`, `test` (the shift)."""
    camera_task = camera_module()
    data = camera_task.load(CAMERA_DATA)
    classes = data["classes"]
    parts: dict[str, tuple[list[bytes], list[str]]] = {k: ([], []) for k in CAMERA_SPLIT}
    for domain, keys in (("base", ("before", "old_test")), (name, ("after", "test"))):
        d = data["domains"].index(domain)
        for c, label in enumerate(classes):
            rows = np.where((data["domain"] == d) & (data["labels"] == c))[0]
            rows = rows[rng.permutation(len(rows))]
            start = 0
            for key in keys:
                take = rows[start:start + CAMERA_SPLIT[key]]
                start += len(take)
                parts[key][0].extend(data["frames"][i] for i in take)
                parts[key][1].extend([label] * len(take))
    return parts


def camera_lines(prefix: str, frames: list[bytes], labels: list[str], task: str) -> list[str]:
    import base64
    return [json.dumps({"key": f"{prefix}:{i}", "task": task, "label": y, "image": base64.b64encode(f).decode()})
            for i, (f, y) in enumerate(zip(frames, labels))]


def decoded(frames: list[bytes]) -> np.ndarray:
    """The frames as raw RGB arrays [N, H, W, 3], as a camera driver hands them."""
    import io

    from PIL import Image
    return np.stack([np.asarray(Image.open(io.BytesIO(f)).convert("RGB")) for f in frames])


def predict_frames(daemon: "Daemon", frames: list[bytes]) -> list[str]:
    """Raw RGB frames, 4 a request (safetensors U8 [N, H, W, 3], 0.9 MB: the shipped request
    limit is 1 MiB): the daemon resizes, crops and normalises them as the bundle says."""
    from safetensors.numpy import save
    out: list[str] = []
    raw = decoded(frames)
    for start in range(0, len(raw), 4):
        body = save({"image": np.ascontiguousarray(raw[start:start + 4])})
        req = urllib.request.Request(f"{daemon.base}/v1/tasks/{daemon.task}/predict", data=body, method="POST",
                                     headers={"content-type": "application/x-safetensors"})
        with urllib.request.urlopen(req, timeout=120) as r:
            out += [p["label"] for p in json.loads(r.read())["predictions"]]
    return out


def camera_inputs(frames: list[bytes]):
    """The model inputs the bundle's preprocessing makes of `frames` (PIL's resize), as a tensor."""
    import io

    import torch
    from PIL import Image
    sys.path.insert(0, str(ROOT / "deploy" / "export"))
    from reference_bundles import EFFICIENTNET_PREPROCESSING, imagenet_input
    return torch.cat([imagenet_input(np.asarray(Image.open(io.BytesIO(f)).convert("RGB")), EFFICIENTNET_PREPROCESSING) for f in frames])


def camera_references(train: tuple[list[bytes], list[str]], test: tuple[list[bytes], list[str]], seed: int, rank: int) -> dict:
    """On the same frames: probes on the frozen ImageNet features (logistic regression, an MLP, an
    RBF SVM), PEFT LoRA at `rank` on the bundle's slots plus a head, and a full fine-tune plus a head."""
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC
    sys.path.insert(0, str(ROOT / "benches"))
    sys.path.insert(0, str(ROOT / "deploy" / "export"))
    from peft_reference import efficientnet_peft, fit
    from reference_bundles import efficientnet_lite0
    labels = sorted(set(train[1]))
    index = {l: i for i, l in enumerate(labels)}
    x_train, x_test = camera_inputs(train[0]), camera_inputs(test[0])
    y_train = torch.tensor([index[l] for l in train[1]])
    y_test = np.array([index[l] for l in test[1]])
    out = {}
    with torch.no_grad():
        base = efficientnet_lite0()
        f_train, f_test = base(x_train).numpy(), base(x_test).numpy()
    scaler = StandardScaler().fit(f_train)
    for name, model in [("logreg", LogisticRegression(max_iter=3000, C=1.0)),
                        ("mlp", MLPClassifier(hidden_layer_sizes=(256,), max_iter=800, random_state=seed)),
                        ("svm_rbf", SVC(kernel="rbf", C=10, gamma="scale"))]:
        model.fit(scaler.transform(f_train), y_train.numpy())
        out[name] = float((model.predict(scaler.transform(f_test)) == y_test).mean())

    order = np.random.default_rng(seed).permutation(len(y_train))
    n_val = max(1, len(order) // 10)
    val, tr = torch.tensor(order[:n_val]), torch.tensor(order[n_val:])

    def run(body, trainable, lr: float, epochs: int) -> float:
        torch.manual_seed(seed)
        head = torch.nn.Linear(1280, len(labels))
        model = torch.nn.ModuleDict({"body": body, "head": head})
        forward = lambda x: head(body(x))  # noqa: E731
        fit(model, forward, [{"params": list(head.parameters()), "lr": 5e-3}, {"params": trainable, "lr": lr}],
            ((x_train[tr],), y_train[tr]), ((x_train[val],), y_train[val]), epochs, seed=seed)
        model.eval()
        with torch.no_grad():
            return float((forward(x_test).argmax(1).numpy() == y_test).mean())

    peft_body = efficientnet_peft(rank)
    out["peft_lora"] = run(peft_body, [p for p in peft_body.parameters() if p.requires_grad], 1e-3, 10)
    # The full fine-tune trains as a person would: batch norm and stochastic depth in train mode.
    full = efficientnet_lite0()
    out["full_finetune"] = run(full, list(full.parameters()), 1e-4, 10)
    return out


def run_camera_shift(name: str, binary: Path, seed: int, overrides: dict[str, dict[str, str]], keep: bool = False) -> dict:
    parts = camera_cell_data(name, np.random.default_rng(seed))
    task = "parts"
    result, directory = run_before_after(name, binary, overrides, CAMERA, task, parts, lambda key: camera_lines(key, *parts[key], task), predict_frames)
    train = (parts["before"][0] + parts["after"][0], parts["before"][1] + parts["after"][1])
    rank = int(overrides.get("training", {}).get("lora_rank", "8"))
    refs = NO_REFERENCES if FLIP["no_references"] else camera_references(train, parts["test"], seed, rank)
    return with_references(result, refs, directory, keep)


def table(results: list[dict]) -> str:
    pct = lambda v: "–" if v is None else f"{100 * v:5.1f}"  # noqa: E731
    lines = ["| shift | base | adaptd | s to final | logreg | MLP | SVM | PEFT LoRA | full FT | adaptd/full FT | upright before → after | base traffic | promoted (kinds) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        seconds = "–" if r["seconds_to_final"] is None else f"{r['seconds_to_final']:.0f}"
        lines.append(
            f"| {r['shift']} | {pct(r['base'])} | **{pct(r['adaptd'])}** | {seconds} | {pct(r['logreg'])} | {pct(r['mlp'])} | {pct(r['svm_rbf'])} "
            f"| {pct(r.get('peft_lora'))} | {pct(r['full_finetune'])} | {r['vs_full_finetune']:.2f} | {pct(r['upright_before'])} → {pct(r['upright_after'])} "
            f"| {pct(r['base_traffic_share'])} | {r['promoted']}/{r['jobs']} ({', '.join(k or '?' for k in r['kinds'])}) |")
    return "\n".join(lines)


# Labels where they matter (`--label-count`): for a digits shift, the accuracy the daemon reaches
# on the shipped defaults with N labels, got two ways. Random: N samples of the shift, drawn at
# random, labelled and published. Requests: the shift's inputs served as traffic (HTTP, batches of
# 16 drawn at random) while a labeller answers the daemon's label requests with the true label,
# until N are answered; the quotas are raised so the run takes seconds, not hours (the rate is a
# deployment's choice; what is asked is not). Beside them, every sample of the shift labelled.
LABEL_BUDGETS = [50, 100, 200, 400]
# Random labels with the device's traffic as pseudo-labels (shipped), the same without them,
# and label requests.
MODES = ("random", "random, no pseudo", "requests")


def traffic_rows(kind: str, train_y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The rows of the training split the device serves as traffic: each once ("shift", and
    "mixed", whose split already holds upright rows), or 80 % digit 1 ("skewed": a line that
    mostly sorts one part, the stream under which label-free adaptation collapses)."""
    rows = np.arange(len(train_y))
    if kind != "skewed":
        return rows
    ones, others = rows[train_y == 1], rows[train_y != 1]
    n = len(rows)
    return np.concatenate([rng.choice(ones, size=int(0.8 * n)), rng.choice(others, size=n - int(0.8 * n), replace=False)])


def run_label_budget(name: str, binary: Path, data: dict, seed: int, overrides: dict, mode: str, budget: int, traffic: str = "shift") -> dict:
    import threading
    train, test, train_x, test_x, rng = digits_split(name, data, seed)
    train_y, test_y = data["labels"][train], data["labels"][test]
    upright_x, upright_y = data["images"][test].astype(np.float32), test_y
    if traffic == "mixed":
        # A third of the cameras still upright, as in the "mixed" cell: labels and traffic both.
        upright = np.arange(len(train)) % 3 == 2
        train_x[upright] = data["images"][train][upright]
    served = traffic_rows(traffic, train_y, np.random.default_rng(seed + 1))
    directory = Path(tempfile.mkdtemp(prefix=f"adaptd-labels-{name}-"))
    broker, port = mosquitto(directory)
    fast = {"requests_per_minute": "100000", "requests_per_hour": "100000", "requests_per_day": "100000"}
    daemon = Daemon(binary, directory, port, {**overrides, "labels": {**overrides.get("labels", {}), **fast}})
    answered, sub = 0, None
    try:
        if mode.startswith("random"):
            # The device serves the shift meanwhile, as a deployed one would (8 inputs a request,
            # so the daemon's traffic window fills): the pseudo-labels' unlabelled source.
            for start in range(0, len(served), 8):
                daemon.predict(train_x[served[start:start + 8]])
            chosen = rng.choice(len(train_x), size=min(budget, len(train_x)), replace=False)
            publish(port, sample_lines(f"{name}-random", train_x[chosen], train_y[chosen]))
            answered = len(chosen)
        else:
            flat = train_x.reshape(len(train_x), -1)
            sub = subprocess.Popen(["mosquitto_sub", "-p", str(port), "-q", "1", "-t", "adaptd/v1/cell/label_requests/sorter"],
                                   stdout=subprocess.PIPE, text=True)
            requests: list[dict] = []
            reader = threading.Thread(target=lambda: [requests.append(json.loads(line)) for line in sub.stdout], daemon=True)
            reader.start()
            time.sleep(0.3)
            seen, deadline = 0, time.time() + 600
            while answered < budget and time.time() < deadline:
                batch = rng.choice(len(train_x), size=16, replace=False)
                daemon.predict(train_x[batch])
                lines = []
                for r in requests[seen:]:
                    if answered + len(lines) >= budget:
                        break
                    # The request carries the input as served (rounded to 4 decimals): the
                    # nearest of the shift's inputs is the one asked about.
                    x = np.array(r["input"]["data"], dtype=np.float32)
                    nearest = int(np.argmin(((flat - x) ** 2).sum(1)))
                    label = int(train_y[nearest]) if ((flat[nearest] - x) ** 2).max() < 1e-6 else None
                    if label is not None:
                        lines.append(json.dumps({"key": f"answer:{r['id']}", "task": "sorter", "label": str(label),
                                                 "input": r["input"], "request_id": r["id"], "source": "labeller"}))
                seen = len(requests)
                if lines:
                    publish(port, lines)
                    answered += len(lines)
                time.sleep(0.05)
        # Fewer labels than schedule.min_new_samples train once arrivals settle (schedule.settle_s,
        # 60 s as shipped); the task is "collecting" until then, which settle waits out.
        records = settle(daemon, directory / "state" / "journal" / "sorter.jsonl", idle_s=20.0, timeout_s=400.0, collecting_is_busy=True)
        accuracy = float((daemon.predict(test_x) == test_y).mean())
        upright_accuracy = float((daemon.predict(upright_x) == upright_y).mean())
        jobs = [r for r in records if r.get("event") == "job"]
        promoted = [r for r in jobs if r.get("promote")]
        return {"shift": name, "mode": mode, "budget": budget, "traffic": traffic, "labels": answered, "adaptd": accuracy, "upright": upright_accuracy,
                "promoted": len(promoted), "jobs": len(jobs),
                "kinds": [r.get("kind") for r in promoted], "pseudo": pseudo_figures(records)}
    finally:
        if sub is not None:
            sub.terminate()
        daemon.stop()
        broker.terminate()
        broker.wait()
        shutil.rmtree(directory, ignore_errors=True)


def pseudo_figures(records: list[dict]) -> dict:
    """What the pseudo-label steps of a run did: candidates trained, refused on validation, and
    the gate's decisions on the rest."""
    attempts = [r for r in records if r.get("event") == "training_attempt" and "pseudo-labels" in r.get("kind", "")]
    gated = [r for r in records if r.get("event") == "job" and any(n.startswith("pseudo-labels by") for n in r.get("notes", []))]
    return {"trained": len(attempts), "refused_on_validation": sum(not r["best_so_far"] for r in attempts),
            "gate_promoted": sum(bool(r.get("promote")) for r in gated), "gate_refused": sum(not r.get("promote") for r in gated)}


def label_count_table(args, binary: Path, data: dict, overrides: dict) -> None:
    global BUDGETS
    BUDGETS = [int(b) for b in args.budgets.split(",")] if args.budgets else LABEL_BUDGETS
    names = args.only.split(",") if args.only else ["rotate90", "blur", "noise", "occlusion"]
    modes = [m for m in MODES if m in [m.strip() for m in args.modes.split(";")]] if args.modes else list(MODES)
    rows = []
    for name in names:
        everything = run_shift(name, binary, data, args.seed, False, overrides)
        FLIP["no_references"] = True
        row = {"shift": name, "all": everything["adaptd"], "all_labels": everything["train"]}
        print(f"{name}, all {everything['train']} labels: adaptd {everything['adaptd']:.3f}", flush=True)
        for budget in BUDGETS:
            for mode in modes:
                settings = {**overrides, "labels": {**overrides.get("labels", {}), "pseudo": "false"}} if mode == "random, no pseudo" else overrides
                # A requests cell depends on timing (which adapter serves when each request goes
                # out, how many jobs run before the labels run out): --repeats runs each cell
                # again and keeps the median.
                runs = []
                for _ in range(args.repeats):
                    started = time.time()
                    r = run_label_budget(name, binary, data, args.seed, settings, mode, budget, args.traffic)
                    runs.append(r["adaptd"])
                    print(f"{name}, {mode} {budget}: {r['labels']} labels, adaptd {r['adaptd']:.3f} (upright {r['upright']:.3f}), {r['promoted']}/{r['jobs']} jobs promoted "
                          f"({', '.join(k or '?' for k in r['kinds'])}); pseudo-labels {r['pseudo']}; {time.time() - started:.0f} s", flush=True)
                row[f"{mode} {budget}"] = float(np.median(runs))
                row[f"{mode} {budget} runs"] = runs
        target = 0.95 * row["all"]
        for mode in modes:
            row[f"{mode} needs"] = next((b for b in BUDGETS if row[f"{mode} {b}"] >= target), None)
        rows.append(row)
    pct = lambda v: f"{100 * v:5.1f}"  # noqa: E731
    print()
    print("| shift | all labels | " + " | ".join(f"{b}: " + " / ".join(modes) for b in BUDGETS) + " | labels to 95 % of all: " + " / ".join(modes) + " |")
    print("| --- " * (len(BUDGETS) + 3) + "|")
    for row in rows:
        need = lambda m: "> " + str(BUDGETS[-1]) if row[f"{m} needs"] is None else str(row[f"{m} needs"])  # noqa: E731
        print(f"| {row['shift']} | {pct(row['all'])} ({row['all_labels']}) | "
              + " | ".join(" / ".join(pct(row[f"{m} {b}"]) for m in modes) for b in BUDGETS)
              + " | " + " / ".join(need(m) for m in modes) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def run_any(name: str, binary: Path, data: dict, seed: int, overrides: dict, keep: bool, minilm: Path) -> dict:
    if name in TEXT_SHIFTS:
        return run_text_shift(name, binary, seed, overrides, keep, minilm)
    if name in CAMERA_SHIFTS:
        return run_camera_shift(name, binary, seed, overrides, keep)
    return run_shift(name, binary, data, seed, False, overrides, keep)


# Wrong labels (`--label-noise`): each shift with clean labels (the search for wrong labels on, as
# shipped, and off), then with 10 % and 30 % of its training samples published under another
# label at random, trained naively (search off) and as shipped (search on), and with the shift's
# flipped samples withheld (the ceiling of any search that leaves wrong labels out). Test labels
# are true.
NOISE_CELLS = [("clean", 0.0, True, False), ("clean, search off", 0.0, False, False), ("10 % naive", 0.1, False, False),
               ("10 %", 0.1, True, False), ("30 % naive", 0.3, False, False), ("30 %", 0.3, True, False),
               ("30 %, flips withheld", 0.3, True, True)]


def label_noise_table(args, binary: Path, data: dict, overrides: dict) -> None:
    FLIP["no_references"] = True
    names = args.only.split(",") if args.only else ["rotate90", "blur", "noise", "occlusion", "typos", "new_intents", "lighting"]
    rows = []
    for name in names:
        row = {"shift": name}
        for cell, fraction, search, withhold in NOISE_CELLS:
            FLIP.update(fraction=fraction, flipped=0, published=0, withhold=withhold)
            cell_overrides = {**overrides, "labels": {**overrides.get("labels", {}), "suspects": "true" if search else "false"}}
            started = time.time()
            r = run_any(name, binary, data, args.seed, cell_overrides, args.keep, Path(args.minilm))
            row[cell] = r["adaptd"]
            if fraction == 0.3 and search and not withhold:
                row["found"] = (r.get("suspects_flipped", 0), r.get("flipped", 0), r.get("suspects_true", 0), r.get("true", 0))
            print(f"{name}, {cell}: adaptd {r['adaptd']:.3f}, {r['promoted']}/{r['jobs']} jobs promoted ({', '.join(k or '?' for k in r['kinds'])}); "
                  f"suspects: {r.get('suspects_flipped', '-')} of {r.get('flipped', '-')} flipped, {r.get('suspects_true', '-')} of {r.get('true', '-')} true; "
                  f"{time.time() - started:.0f} s", flush=True)
        rows.append(row)
    pct = lambda v: f"{100 * v:5.1f}"  # noqa: E731
    print()
    print("| shift | " + " | ".join(c for c, *_ in NOISE_CELLS) + " | 30 %: drop naive / as shipped / withheld | 30 %: flipped found, true suspected |")
    print("| --- " * (len(NOISE_CELLS) + 3) + "|")
    for row in rows:
        f = row.get("found", (0, 0, 0, 0))
        print(f"| {row['shift']} | " + " | ".join(pct(row[c]) for c, *_ in NOISE_CELLS)
              + f" | {100 * (row['clean'] - row['30 % naive']):.1f} / {100 * (row['clean'] - row['30 %']):.1f}"
              + f" / {100 * (row['clean'] - row['30 %, flips withheld']):.1f}"
              + f" | {f[0]}/{f[1]} ({100 * f[0] / max(f[1], 1):.0f} %), {f[2]}/{f[3]} ({100 * f[2] / max(f[3], 1):.1f} %) |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="")
    ap.add_argument("--quick", action="store_true", help="one shift, fewer samples: the check `make test` runs")
    ap.add_argument("--daemon", default=str(ROOT / "target" / "release" / "adaptd"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="")
    ap.add_argument("--keep", action="store_true", help="keep each cell's state directory (journal, adapters) to look into")
    ap.add_argument("--minilm", default=str(MINILM), help="the text shifts' bundle (one exported with a cut, say)")
    ap.add_argument("--flip", type=float, default=0.0, metavar="FRACTION",
                    help="publish this share of the training samples under another label, at random (test labels stay true)")
    ap.add_argument("--label-noise", action="store_true",
                    help="for each shift (--only): clean labels, then 10 %% and 30 %% flipped, with and without the search for wrong labels, and 30 %% with the flipped samples withheld")
    ap.add_argument("--label-count", action="store_true",
                    help="for each digits shift (--only): accuracy against the number of labels, label requests vs random labelling")
    ap.add_argument("--traffic", default="shift", choices=["shift", "skewed", "mixed"],
                    help="with --label-count: what the device serves meanwhile (the pseudo-labels' source)")
    ap.add_argument("--modes", default="", metavar="MODE;MODE", help="with --label-count: only these (separated by ;) of " + ", ".join(repr(m) for m in MODES))
    ap.add_argument("--repeats", type=int, default=1, help="with --label-count: run each cell this many times; the table shows the median")
    ap.add_argument("--budgets", default="", metavar="N,N", help="with --label-count: these label counts instead of 50,100,200,400")
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
    FLIP.update(fraction=args.flip, seed=args.seed, binary=binary)
    if args.label_noise:
        label_noise_table(args, binary, data, overrides)
        return
    if args.label_count:
        label_count_table(args, binary, data, overrides)
        return
    if args.flip:
        print(f"labels flipped at random: {100 * args.flip:.0f} % of the training samples")
    names = ["rotate90"] if args.quick else [n for n in (args.only.split(",") if args.only else SHIFTS + TEXT_SHIFTS + CAMERA_SHIFTS)]
    results = []
    for name in names:
        started = time.time()
        if name in TEXT_SHIFTS:
            r = run_text_shift(name, binary, args.seed, overrides, args.keep, Path(args.minilm))
        elif name in CAMERA_SHIFTS:
            r = run_camera_shift(name, binary, args.seed, overrides, args.keep)
        else:
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
