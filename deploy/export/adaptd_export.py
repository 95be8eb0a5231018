"""Export a PyTorch module as an adaptd model bundle.

A bundle is a directory with
  - model.onnx   the serving graph (ONNX Runtime),
  - train.pt     the training graph (TorchScript, loaded by libtorch),
  - manifest.json  what both graphs take and give, their LoRA slots and file hashes.

Both graphs are traced from the same module in one call, so they compute the same function.
Every LoRA slot is a pair of *graph inputs* (A: [r_max, in], B: [out, r_max]; conv slots carry
PEFT's conv shapes); an adapter of smaller rank is zero-padded and "no adapter" is all zeros, so
swapping adapters at serving time never rebuilds the ONNX Runtime session. The slot adds
``B @ A @ x`` to the wrapped layer's output: the caller folds PEFT's ``alpha / r`` into B.
The training graph takes one more input after the slots, the LoRA dropout keep probability
(``lora.keep``, a 0-d float; 1 = no dropout); the serving graph has no dropout.

Usage as a library::

    export_bundle(module, {"image": torch.zeros(1, 1, 8, 8)}, ["fc1"], "out/dir",
                  name="digits-cnn", version="1.0.0", rank_max=16,
                  output_names=["embedding", "logits"], ...)
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

BUNDLE_FORMAT = 1
MANIFEST = "manifest.json"
SERVING_GRAPH = "model.onnx"
# The same model without LoRA slots (the model as its user would export it): what serves an
# adapter that changes no slot, at the original model's speed.
PLAIN_GRAPH = "plain.onnx"
REFT_GRAPH = "reft.onnx"
# A served LoRA is folded into a copy of the graph without slots (merged serving): the manifest's
# "merge" says where each slot's weight lies in it; this file holds the per-channel scales of the
# weights that had a batch norm folded in.
MERGE_SCALES = "merge_scales.safetensors"
TRAINING_GRAPH = "train.pt"
BASE_HEAD = "base_head.safetensors"
RETENTION = "retention.safetensors"
# With a cut: the frozen part below it, and the part above it that LoRA trains on cached activations.
PREFIX_GRAPH = "prefix.pt"
SUFFIX_GRAPH = "suffix.pt"
CUT_ACTIVATION_INPUT = "cut.activation"
ONNX_OPSET = 17
# The training graph's last input: the LoRA dropout keep probability (1 - lora_dropout).
LORA_DROPOUT_INPUT = "lora.keep"
# LoReFT's positions on a sequence: [first, last], the first and last real tokens it edits.
REFT_POSITIONS_INPUT = "reft.positions"


class ExportError(ValueError):
    """The module, its targets or the output directory cannot make a bundle."""


@dataclass
class SlotSpec:
    module: str
    kind: str  # "linear" | "conv2d"
    a_shape: list[int]
    b_shape: list[int]
    in_features: int
    out_features: int

    @property
    def a_input(self) -> str:
        return f"{self.module}.lora_A"

    @property
    def b_input(self) -> str:
        return f"{self.module}.lora_B"

    def to_json(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "kind": self.kind,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "a_input": self.a_input,
            "b_input": self.b_input,
            "a_shape": self.a_shape,
            "b_shape": self.b_shape,
        }


@torch.jit.script
def lora_dropout(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """PEFT's lora_dropout on a slot's input, with the keep probability as a graph input. Scripted
    so the branch survives tracing: at keep = 1 (evaluation, or no dropout) the input passes
    unchanged and no random numbers are drawn."""
    if bool(keep >= 1.0):
        return x
    return x * (torch.rand_like(x) < keep).to(x.dtype) / keep


class LoraSlot(nn.Module):
    """Wraps a frozen Linear/Conv2d and adds the low-rank update fed in as graph inputs."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        # Set by BundleGraph.forward right before the wrapped module runs; plain attributes,
        # so tracing records them as the graph inputs they came from.
        self.lora_a: torch.Tensor | None = None
        self.lora_b: torch.Tensor | None = None
        self.keep: torch.Tensor | None = None  # training graph only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        h = x if self.keep is None else lora_dropout(x, self.keep)
        if isinstance(self.base, nn.Conv2d):
            h = F.conv2d(h, self.lora_a, None, self.base.stride, self.base.padding, self.base.dilation)
            return y + F.conv2d(h, self.lora_b)
        return y + F.linear(F.linear(h, self.lora_a), self.lora_b)


@dataclass
class ReftSpec:
    """A LoReFT intervention slot on a module's output: h + R^T (W h + b - R h) at the edited
    positions, with R, W: [r_max, dim] and b: [r_max] as graph inputs (all zero: no edit)."""
    module: str
    kind: str  # "vector" [N, d] | "sequence" [N, S, d] | "feature_map" [N, d, H, W]
    dim: int
    rank_max: int

    @property
    def inputs(self) -> tuple[str, str, str]:
        return f"{self.module}.reft_R", f"{self.module}.reft_W", f"{self.module}.reft_b"

    def to_json(self) -> dict[str, Any]:
        r, w, b = self.inputs
        return {"module": self.module, "kind": self.kind, "dim": self.dim, "r_input": r, "w_input": w, "b_input": b}


def loreft_edit(h: torch.Tensor, rotate: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                where: torch.Tensor | None) -> torch.Tensor:
    """LoReFT (arXiv 2404.03592): h + R^T (W h + b - R h), on the last axis of `h` (the channel
    axis of a feature map is moved there and back). `where` ([N, S, 1], 0 or 1) picks a
    sequence's edited positions; None edits every position. (W - R) h is one product, not two."""
    feature_map = h.dim() == 4
    x = h.permute(0, 2, 3, 1) if feature_map else h
    delta = F.linear(F.linear(x, weight - rotate, bias), rotate.t())
    if where is not None:
        delta = delta * where
    return x.add(delta).permute(0, 3, 1, 2) if feature_map else x + delta


def reft_positions(mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[N, S, 1]: 1 at the first `positions[0]` and the last `positions[1]` real tokens of each
    row (real: mask 1), whichever side the padding is on; 0 elsewhere and on padding."""
    m = mask.to(torch.float32)
    index = torch.cumsum(m, dim=1) - 1.0  # each real token's place among the real ones
    count = m.sum(dim=1, keepdim=True)
    first = positions[0].to(torch.float32)
    last = positions[1].to(torch.float32)
    picked = (index < first) | (index >= count - last)
    return (m * picked.to(torch.float32)).unsqueeze(-1)


class _Intervention:
    """A forward hook that edits its module's output (the first element of a tuple output) with
    the LoReFT values BundleGraph.forward set for this call; no values, no edit."""

    def __init__(self, sequence: bool = False):
        self.sequence = sequence  # only a sequence's edits are picked by position
        self.values: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.where: torch.Tensor | None = None

    def __call__(self, _module, _inputs, output):
        if self.values is None:
            return None
        first = output[0] if isinstance(output, (tuple, list)) else output
        edited = loreft_edit(first, *self.values, self.where)
        if isinstance(output, (tuple, list)):
            return type(output)((edited, *output[1:]))
        return edited


class BundleGraph(nn.Module):
    """forward(*model_inputs, A_0, B_0, A_1, B_1, ..., R_0, W_0, b_0, ...[, positions][, keep])
    -> tuple of model outputs.

    LoRA slots first, then LoReFT slots (R, W, b each) and, where LoReFT edits a sequence, its
    positions ([first, last], i64). With `training` the last input is the LoRA dropout keep
    probability (a 0-d float tensor): the training graph takes it, the serving graph has no dropout."""

    def __init__(self, module: nn.Module, slots: list[LoraSlot], n_inputs: int, training: bool = False,
                 interventions: list[_Intervention] | None = None, mask_input: int | None = None):
        super().__init__()
        self.module = module
        self.slots = slots  # plain list: the slots are already submodules of `module`
        self.n_inputs = n_inputs
        self.training_graph = training
        self.interventions = interventions or []
        self.mask_input = mask_input  # the model input whose mask says which tokens are real

    def forward(self, *args: torch.Tensor):
        inputs, lora = args[: self.n_inputs], args[self.n_inputs :]
        keep = lora[-1] if self.training_graph else None
        for i, slot in enumerate(self.slots):
            slot.lora_a, slot.lora_b, slot.keep = lora[2 * i], lora[2 * i + 1], keep
        reft = lora[2 * len(self.slots) :]
        where = None
        if self.interventions and self.mask_input is not None:
            where = reft_positions(inputs[self.mask_input], reft[3 * len(self.interventions)])
        for i, intervention in enumerate(self.interventions):
            intervention.values = (reft[3 * i], reft[3 * i + 1], reft[3 * i + 2])
            intervention.where = where if intervention.sequence else None
        try:
            out = self.module(*inputs)
        finally:
            for intervention in self.interventions:
                intervention.values, intervention.where = None, None
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)


class _Cut:
    """A forward hook on the cut module: records its output, or replaces it with a given tensor.

    Tracing through it makes the two halves of a graph: the prefix returns what it recorded
    (every operation after the cut is dead code, which tracing drops), and the suffix computes
    on from the tensor it was given (every operation only the cut's output needed is dead)."""

    def __init__(self):
        self.seen: torch.Tensor | None = None
        self.replace_with: torch.Tensor | None = None

    def __call__(self, _module, _inputs, output):
        first = output[0] if isinstance(output, (tuple, list)) else output
        if not isinstance(first, torch.Tensor):
            raise ExportError("the cut module's output is not a tensor (nor a tuple starting with one)")
        self.seen = first
        if self.replace_with is None:
            return None
        if isinstance(output, (tuple, list)):
            return type(output)((self.replace_with, *output[1:]))
        return self.replace_with


class PrefixGraph(nn.Module):
    """forward(*model_inputs, A_0, B_0, ...) -> the cut module's output (frozen: no dropout)."""

    def __init__(self, graph: "BundleGraph", cut: _Cut):
        super().__init__()
        self.graph = graph
        self.cut = cut

    def forward(self, *args: torch.Tensor):
        self.cut.replace_with = None
        self.graph(*args)
        return self.cut.seen


class SuffixGraph(nn.Module):
    """forward(*model_inputs, activation, A_0, B_0, ..., keep) -> model outputs, computed from
    `activation` in place of the cut module's output (the training graph above the cut)."""

    def __init__(self, graph: "BundleGraph", cut: _Cut, n_inputs: int):
        super().__init__()
        self.graph = graph
        self.cut = cut
        self.n_inputs = n_inputs

    def forward(self, *args: torch.Tensor):
        inputs, activation, rest = args[: self.n_inputs], args[self.n_inputs], args[self.n_inputs + 1 :]
        self.cut.replace_with = activation
        try:
            return self.graph(*inputs, *rest)
        finally:
            self.cut.replace_with = None


def _keep_only_what_outputs_need(traced: torch.jit.ScriptModule) -> None:
    """Inline the traced submodule calls into forward and drop what no output uses: the half of
    the model on the other side of the cut (a call is kept whole otherwise, being opaque)."""
    graph = traced.graph
    torch._C._jit_pass_inline(graph)
    torch._C._jit_pass_dce(graph)


def run_hooked(graph: "BundleGraph", args: tuple, hooks: list) -> None:
    """Run `graph` once without gradients, then remove `hooks` (handles registered for this run)."""
    try:
        with torch.no_grad():
            graph(*args)
    finally:
        for h in hooks:
            h.remove()


def slots_after(module: nn.Module, graph: "BundleGraph", cut_after: str, args: tuple) -> list[int]:
    """Indices of the slots that run after the cut module has finished, found by running once."""
    order: list[str] = []
    hooks = [module.get_submodule(cut_after).register_forward_hook(lambda *_: order.append("cut"))]
    for i, slot in enumerate(graph.slots):
        hooks.append(slot.register_forward_pre_hook(lambda *_, i=i: order.append(i)))
    run_hooked(graph, args, hooks)
    if "cut" not in order:
        raise ExportError(f"cut_after {cut_after!r} never ran in the module's forward")
    after = order[order.index("cut") + 1 :]
    return sorted({i for i in after if isinstance(i, int)} - {i for i in order[: order.index("cut")] if isinstance(i, int)})


def reft_after(module: nn.Module, graph: "BundleGraph", cut_after: str, reft: Sequence["ReftSpec"], args: tuple) -> list[int]:
    """Indices of the LoReFT slots whose module finishes after the cut module has: their edits
    are above the cut (an edit of the cut module's own output is in the prefix, part of what it caches)."""
    order: list[Any] = []
    hooks = [module.get_submodule(cut_after).register_forward_hook(lambda *_: order.append("cut"))]
    for i, spec in enumerate(reft):
        if spec.module != cut_after:
            hooks.append(module.get_submodule(spec.module).register_forward_hook(lambda *_, i=i: order.append(i)))
    run_hooked(graph, args, hooks)
    if "cut" not in order:
        return []
    cut = order.index("cut")
    return sorted({i for i in order[cut + 1 :] if isinstance(i, int)} - set(order[:cut]))


def match_modules(module: nn.Module, wanted: Sequence[str], what: str) -> list[tuple[str, list[str]]]:
    """PEFT semantics: each name in `wanted` matches the modules whose full name equals it or ends
    with '.name'; one that matches none is refused, naming `what` it was asked for as."""
    names = [n for n, _ in module.named_modules() if n]
    found = []
    for name in wanted:
        hits = [n for n in names if n == name or n.endswith("." + name)]
        if not hits:
            sample = ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")
            raise ExportError(f"{what} {name!r} matches no module of {type(module).__name__} (modules: {sample})")
        found.append((name, hits))
    return found


def resolve_reft_layers(module: nn.Module, reft_layers: Sequence[str]) -> list[str]:
    """LoReFT layers by name or name suffix (as LoRA targets); each must be a module of the model."""
    matched: list[str] = []
    for _, hits in match_modules(module, reft_layers, "LoReFT layer"):
        matched.extend(h for h in hits if h not in matched)
    return matched


def reft_specs(module: nn.Module, graph: "BundleGraph", layers: Sequence[str], rank_max: int, args: tuple) -> list[ReftSpec]:
    """Each LoReFT layer's output, seen once: a vector [N, d], a sequence [N, S, d] or a feature
    map [N, d, H, W] (a tuple output: its first element). Anything else is refused by name."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [module.get_submodule(name).register_forward_hook(
        lambda _m, _i, out, name=name: seen.setdefault(name, out[0] if isinstance(out, (tuple, list)) else out)) for name in layers]
    run_hooked(graph, args, hooks)
    specs = []
    for name in layers:
        out = seen.get(name)
        if out is None:
            raise ExportError(f"LoReFT layer {name!r} never ran in the module's forward")
        if not isinstance(out, torch.Tensor) or out.dtype != torch.float32 or out.dim() not in (2, 3, 4):
            what = f"a {out.dim()}-d {out.dtype} tensor" if isinstance(out, torch.Tensor) else f"a {type(out).__name__}"
            raise ExportError(f"LoReFT layer {name!r} outputs {what}; LoReFT edits float [N, d], [N, S, d] or [N, d, H, W] outputs")
        kind = {2: "vector", 3: "sequence", 4: "feature_map"}[out.dim()]
        dim = int(out.shape[1] if kind == "feature_map" else out.shape[-1])
        if rank_max > dim:
            raise ExportError(f"LoReFT rank_max {rank_max} is above the width {dim} of layer {name!r}")
        specs.append(ReftSpec(name, kind, dim, rank_max))
    return specs


def resolve_targets(module: nn.Module, target_modules: Sequence[str]) -> list[str]:
    """PEFT semantics: a target matches a module whose full name equals it or ends with '.target'."""
    if not target_modules:
        raise ExportError("target_modules is empty: name at least one Linear/Conv2d module for LoRA")
    matched: list[str] = []
    for _, hits in match_modules(module, target_modules, "target module"):
        for name in hits:
            refusal = slot_refusal(module.get_submodule(name))
            if refusal:
                raise ExportError(f"target module {name!r} {refusal}")
            if name not in matched:
                matched.append(name)
    return matched


def slot_refusal(layer: nn.Module) -> str | None:
    """Why `layer` cannot carry a LoRA slot (None: it can). The slot adds the update computed
    from the layer's own input with the layer's own geometry, as PEFT's LoRA layers do."""
    kind = type(layer).__name__
    if not isinstance(layer, (nn.Linear, nn.Conv2d)):
        return f"is a {kind}; LoRA slots need nn.Linear or nn.Conv2d (batch norm, activations and pooling stay frozen)"
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            what = "a depthwise convolution" if layer.groups == layer.in_channels else "a grouped convolution"
            return (f"is {what} ({kind}, groups={layer.groups}): PEFT adapts these only at ranks divisible by the "
                    f"group count and cannot merge them, and a slot's zero-padded rank would mix the groups; "
                    f"target the pointwise (1x1) convolutions beside it instead")
        if layer.padding_mode != "zeros":
            return f"pads with {layer.padding_mode!r} ({kind}); LoRA slots take zero-padded convolutions"
        overrides_forward = type(layer).forward is not nn.Conv2d.forward
        if overrides_forward and tuple(layer.kernel_size) != (1, 1):
            return (f"is a {kind} with its own forward (it pads its input itself, as TensorFlow's 'same' "
                    f"padding does) and a {tuple(layer.kernel_size)} kernel: the slot would see the input unpadded "
                    f"and its output would not line up; only its 1x1 convolutions can take slots")
        if isinstance(layer.padding, str):
            return f"uses padding={layer.padding!r} ({kind}); export it with explicit padding"
    return None


def slot_spec(name: str, layer: nn.Module, rank_max: int) -> SlotSpec:
    if isinstance(layer, nn.Conv2d):
        kh, kw = layer.kernel_size
        return SlotSpec(name, "conv2d", [rank_max, layer.in_channels, kh, kw], [layer.out_channels, rank_max, 1, 1],
                        layer.in_channels, layer.out_channels)
    return SlotSpec(name, "linear", [rank_max, layer.in_features], [layer.out_features, rank_max],
                    layer.in_features, layer.out_features)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(module: nn.Module, config: dict[str, Any]) -> str:
    """Identity of what a bundle is made from: the weights and the export settings."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for key, tensor in sorted(module.state_dict().items()):
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def merge_map(plain_path: Path, targets: Sequence[str], layers: Sequence[nn.Module]) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]] | None:
    """Where each slot's weight W lies in the graph without slots: the one initializer that holds
    W, its transpose (a Linear exported as MatMul) or W scaled per output channel (a convolution
    with the batch norm after it folded in: a LoRA's update is then scaled alike), and the byte
    offset of its values in the file, where serving writes the merged weight before it loads a
    copy (overriding an initializer at load time would come after the optimizer has folded it).
    Returns the scales of the folded slots and, per slot, what the manifest says; None (with the
    reason printed) where a slot's weight is not found once, and the bundle then serves LoRA on
    its slotted graph only."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    blob = plain_path.read_bytes()
    graph = onnx.load(str(plain_path)).graph
    initializers = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    scales: dict[str, torch.Tensor] = {}
    slots: list[dict[str, Any]] = []
    for i, (target, layer) in enumerate(zip(targets, layers)):
        w = layer.weight.detach().numpy().astype(np.float32)
        rest = tuple(range(1, w.ndim))
        found = []
        for name, value in initializers.items():
            if value.dtype != np.float32:
                continue
            if value.shape == w.shape:
                scale = (value * w).sum(axis=rest) / np.maximum((w * w).sum(axis=rest), 1e-30)
                if np.allclose(value, w * scale.reshape(-1, *([1] * len(rest))), rtol=1e-5, atol=1e-7):
                    unscaled = bool(np.all(np.abs(scale - 1.0) <= 1e-6))
                    found.append((name, False, None if unscaled else scale.astype(np.float32)))
            if w.ndim == 2 and value.shape == w.T.shape and np.array_equal(value, w.T):
                found.append((name, True, None))
        if len(found) != 1:
            print(f"merge: {target}: its weight is in {len(found)} initializers of {plain_path.name}, not one; LoRA serves on the slotted graph only")
            return None
        name, transposed, scale = found[0]
        offset = _offset_once(blob, np.ascontiguousarray(initializers[name]).astype("<f4").tobytes())
        if offset is None:
            print(f"merge: {target}: the values of {name} are not stored once, in place, in {plain_path.name}; LoRA serves on the slotted graph only")
            return None
        if scale is not None:
            scales[f"{i}.scale"] = torch.from_numpy(scale)
        slots.append({"initializer": name, "offset": offset, "transposed": transposed, "scaled": scale is not None})
    return scales, slots


def reft_merge_graph(path: Path, names: Sequence[str]) -> list[int] | None:
    """Make the LoReFT inputs `names` of the graph at `path` (the model with LoReFT edits and no
    LoRA slots) initializers, each filled with marker values, and return the byte offset of each
    one's values in the rewritten file: serving writes an adapter's R, W, b and positions there
    before it loads a copy (merged LoReFT, as merged LoRA does with a weight). None (with the
    reason printed) where a marker is not found once; LoReFT then serves on the slotted graph."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    specs = {i.name: i for i in graph.input}
    rng = np.random.default_rng(0x5EF7)
    markers: list[np.ndarray] = []
    for name in names:
        tensor_type = specs[name].type.tensor_type
        shape = [d.dim_value for d in tensor_type.shape.dim]
        if tensor_type.elem_type == onnx.TensorProto.INT64:
            marker = rng.integers(1 << 40, 1 << 50, size=shape, dtype=np.int64)
        else:
            marker = rng.standard_normal(shape).astype(np.float32)
        markers.append(marker)
        graph.initializer.append(numpy_helper.from_array(marker, name))
        graph.input.remove(specs[name])
    onnx.save(model, str(path))
    blob = path.read_bytes()
    offsets = []
    for name, marker in zip(names, markers):
        offset = _offset_once(blob, marker.astype(marker.dtype.newbyteorder("<")).tobytes())
        if offset is None:
            print(f"reft merge: the values of {name} are not stored once, in place, in {path.name}; LoReFT serves on the slotted graph only")
            return None
        offsets.append(offset)
    return offsets


def _offset_once(blob: bytes, raw: bytes) -> int | None:
    """Where `raw` lies in `blob`, if it lies there exactly once (a merge map must name one place)."""
    offset = blob.find(raw)
    return None if offset < 0 or blob.find(raw, offset + 1) >= 0 else offset


def _set_parent(module: nn.Module, name: str, child: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = module.get_submodule(parent_name) if parent_name else module
    setattr(parent, attr, child)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def export_bundle(
    module: nn.Module,
    example_inputs: dict[str, torch.Tensor],
    target_modules: Sequence[str],
    out_dir: str | os.PathLike,
    *,
    name: str,
    version: str,
    rank_max: int,
    output_names: Sequence[str],
    dynamic_axes: dict[str, dict[int, str]] | None = None,
    embedding_output: str = "embedding",
    logits_output: str | None = None,
    labels: Sequence[str] | None = None,
    preprocessing: dict[str, Any] | None = None,
    extra_files: dict[str, str | os.PathLike] | None = None,
    metadata: dict[str, Any] | None = None,
    base_head: str | None = None,
    retention: tuple[dict[str, torch.Tensor], torch.Tensor] | None = None,
    cut_after: str | None = None,
    reft_layers: Sequence[str] = (),
    reft_rank_max: int = 8,
    reft_mask_input: str | None = None,
) -> Path:
    """Trace `module` into a bundle at `out_dir`; returns the bundle path.

    An existing bundle made from the same weights and settings is left as it is (idempotent);
    a directory holding anything else is refused rather than overwritten.

    `base_head` names the nn.Linear that maps the embedding to the logits: its weights ship as
    `base_head.safetensors`, so on-device heads start from the pre-trained classifier.
    `retention` is (model inputs, label indices) from the base domain: the device replays part of
    it during training and checks the rest for forgetting (`retention.safetensors`).
    `cut_after` names a module to cut the model after: the bundle then also holds a prefix graph
    (model inputs -> that module's output, frozen) and a suffix training graph (model inputs and
    that output -> model outputs), so LoRA on the slots above the cut trains on activations
    computed once per sample. The serving graph is unchanged.
    `reft_layers` names modules whose output gets a LoReFT intervention slot (R, W, b at rank up
    to `reft_rank_max`) in every graph; on a sequence output the edited positions are the first
    and last real tokens by the mask `reft_mask_input` names (one more graph input,
    `reft.positions` = [first, last]), and every position without one.
    """
    out = Path(out_dir)
    if not isinstance(rank_max, int) or isinstance(rank_max, bool) or rank_max <= 0:
        raise ExportError(f"rank_max must be a positive integer, got {rank_max!r}")
    if reft_layers and (not isinstance(reft_rank_max, int) or isinstance(reft_rank_max, bool) or reft_rank_max <= 0):
        raise ExportError(f"reft_rank_max must be a positive integer, got {reft_rank_max!r}")
    if reft_mask_input is not None and reft_mask_input not in example_inputs:
        raise ExportError(f"reft_mask_input {reft_mask_input!r} is not among the inputs {list(example_inputs)}")
    if not example_inputs:
        raise ExportError("example_inputs is empty: the serving graph needs at least one input")
    if embedding_output not in output_names:
        raise ExportError(f"embedding_output {embedding_output!r} is not among output_names {list(output_names)}")
    if logits_output is not None and logits_output not in output_names:
        raise ExportError(f"logits_output {logits_output!r} is not among output_names {list(output_names)}")
    if (logits_output is None) != (labels is None):
        raise ExportError("logits_output and labels go together: give both or neither")
    if (base_head is not None or retention is not None) and labels is None:
        raise ExportError("base_head and retention need the bundle's labels (logits_output and labels)")
    if retention is not None:
        r_inputs, r_labels = retention
        if list(r_inputs) != list(example_inputs):
            raise ExportError(f"retention inputs {list(r_inputs)} must be the model inputs {list(example_inputs)}")
        if r_labels.dtype != torch.int64 or r_labels.dim() != 1 or any(t.shape[0] != r_labels.shape[0] for t in r_inputs.values()):
            raise ExportError("retention labels must be int64 [N] and every retention input must have N rows")
        if r_labels.numel() and (int(r_labels.min()) < 0 or int(r_labels.max()) >= len(labels)):
            raise ExportError(f"retention labels must index the {len(labels)} bundle labels")

    # Work on a copy: wrapping targets in LoRA slots must not change the caller's module.
    module = copy.deepcopy(module).eval()
    targets = resolve_targets(module, target_modules)
    if cut_after is not None:
        try:
            module.get_submodule(cut_after)
        except AttributeError as e:
            raise ExportError(f"cut_after {cut_after!r} is not a module of {type(module).__name__}") from e
    head_tensors: dict[str, torch.Tensor] | None = None
    if base_head is not None:
        try:
            head_layer = module.get_submodule(base_head)
        except AttributeError as e:
            raise ExportError(f"base_head {base_head!r} is not a module of {type(module).__name__}") from e
        if not isinstance(head_layer, nn.Linear) or head_layer.out_features != len(labels):
            raise ExportError(f"base_head {base_head!r} must be an nn.Linear with {len(labels)} outputs (one per label)")
        bias = head_layer.bias if head_layer.bias is not None else torch.zeros(head_layer.out_features)
        head_tensors = {"weight": head_layer.weight.detach().clone().contiguous(), "bias": bias.detach().clone().contiguous()}
    retention_tensors: dict[str, torch.Tensor] | None = None
    if retention is not None:
        retention_tensors = {f"input.{k}": v.detach().clone().contiguous() for k, v in retention[0].items()}
        retention_tensors["labels"] = retention[1].detach().clone().contiguous()
    config = {
        "format": BUNDLE_FORMAT, "name": name, "version": version, "rank_max": rank_max, "targets": targets,
        "inputs": list(example_inputs), "outputs": list(output_names), "labels": list(labels) if labels else None,
        "preprocessing": preprocessing, "opset": ONNX_OPSET,
        "extra_files": {k: sha256_file(Path(v)) for k, v in sorted((extra_files or {}).items())},
        "base_head": base_head,
        "training_inputs": [LORA_DROPOUT_INPUT],
        "retention": _tensors_digest(retention_tensors) if retention_tensors else None,
        "plain_graph": PLAIN_GRAPH,
        "merge": MERGE_SCALES,
    }
    if reft_layers:
        config["reft"] = {"layers": list(reft_layers), "rank_max": reft_rank_max, "mask_input": reft_mask_input}
    if cut_after is not None:
        config["cut_after"] = cut_after
    print_ = fingerprint(module, config)

    existing = out / MANIFEST
    if out.exists() and any(out.iterdir()):
        if existing.is_file():
            try:
                old = json.loads(existing.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ExportError(f"{existing}: unreadable manifest ({e}); refusing to overwrite {out}") from e
            if old.get("fingerprint") == print_:
                return out
            raise ExportError(
                f"{out} already holds a different bundle ({old.get('name')} {old.get('version')}, "
                f"fingerprint {str(old.get('fingerprint'))[:12]}); remove it or choose another directory"
            )
        raise ExportError(f"{out} is not empty and holds no bundle; refusing to write into it")

    # Wrap targets in LoRA slots; freeze everything the module had.
    for p in module.parameters():
        p.requires_grad_(False)
    plain = BundleGraph(copy.deepcopy(module), [], len(example_inputs)).eval()
    # The model with LoReFT edits and no LoRA slots: merged LoReFT serving runs a copy of it.
    reft_base = copy.deepcopy(module) if reft_layers else None
    slots: list[LoraSlot] = []
    specs: list[SlotSpec] = []
    layers: list[nn.Module] = []
    for target in targets:
        layer = module.get_submodule(target)
        layers.append(layer)
        slot = LoraSlot(layer)
        _set_parent(module, target, slot)
        slots.append(slot)
        specs.append(slot_spec(target, layer, rank_max))
    graph = BundleGraph(module, slots, len(example_inputs)).eval()

    gen = torch.Generator().manual_seed(0)
    lora_examples: list[torch.Tensor] = []
    for spec in specs:
        # Non-zero examples so tracing cannot constant-fold the slot away.
        lora_examples.append(torch.randn(spec.a_shape, generator=gen) * 0.01)
        lora_examples.append(torch.randn(spec.b_shape, generator=gen) * 0.01)
    args = tuple(example_inputs.values()) + tuple(lora_examples)
    input_names = list(example_inputs) + [n for s in specs for n in (s.a_input, s.b_input)]

    # LoReFT slots: a hook on each layer edits its output with the values of this call's inputs.
    reft = reft_specs(module, graph, resolve_reft_layers(module, reft_layers), reft_rank_max, args) if reft_layers else []
    sequences = any(r.kind == "sequence" for r in reft)
    mask_index = list(example_inputs).index(reft_mask_input) if reft_mask_input is not None and sequences else None
    interventions: list[_Intervention] = []
    for spec in reft:
        intervention = _Intervention(sequence=spec.kind == "sequence" and mask_index is not None)
        module.get_submodule(spec.module).register_forward_hook(intervention)
        interventions.append(intervention)
        for _ in range(3):  # R, W, b: non-zero, so tracing keeps the edit
            lora_examples.append(torch.randn([reft_rank_max, spec.dim] if _ < 2 else [reft_rank_max], generator=gen) * 0.05)
        input_names.extend(spec.inputs)
    if mask_index is not None:
        lora_examples.append(torch.tensor([1, 2], dtype=torch.int64))
        input_names.append(REFT_POSITIONS_INPUT)
    if reft:
        graph = BundleGraph(module, slots, len(example_inputs), interventions=interventions, mask_input=mask_index).eval()
        args = tuple(example_inputs.values()) + tuple(lora_examples)
    above = slots_after(module, graph, cut_after, args) if cut_after is not None else None
    reft_above = reft_after(module, graph, cut_after, reft, args) if cut_after is not None and reft else []

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; a bundle is read by the service user
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript-based exporter announces its deprecation
            reference = graph(*args)
            torch.onnx.export(
                graph, args, str(staging / SERVING_GRAPH), dynamo=False, opset_version=ONNX_OPSET,
                input_names=input_names, output_names=list(output_names), dynamic_axes=dynamic_axes or {},
                do_constant_folding=True,
            )
            torch.onnx.export(
                plain, tuple(example_inputs.values()), str(staging / PLAIN_GRAPH), dynamo=False, opset_version=ONNX_OPSET,
                input_names=list(example_inputs), output_names=list(output_names), dynamic_axes=dynamic_axes or {},
                do_constant_folding=True,
            )
            del plain
            reft_merge = None
            if reft and reft_base is not None:
                hooks = [_Intervention(sequence=i.sequence) for i in interventions]
                for spec, hook in zip(reft, hooks):
                    reft_base.get_submodule(spec.module).register_forward_hook(hook)
                edits_only = BundleGraph(reft_base, [], len(example_inputs), interventions=hooks, mask_input=mask_index).eval()
                reft_values = tuple(lora_examples[2 * len(specs):])
                reft_names = input_names[len(example_inputs) + 2 * len(specs):]
                torch.onnx.export(
                    edits_only, tuple(example_inputs.values()) + reft_values, str(staging / REFT_GRAPH), dynamo=False,
                    opset_version=ONNX_OPSET, input_names=list(example_inputs) + reft_names, output_names=list(output_names),
                    dynamic_axes=dynamic_axes or {}, do_constant_folding=True,
                )
                del edits_only, reft_base
                offsets = reft_merge_graph(staging / REFT_GRAPH, reft_names)
                if offsets is None:
                    (staging / REFT_GRAPH).unlink()
                else:
                    reft_merge = {"graph": REFT_GRAPH, "offsets": offsets}
            merge = merge_map(staging / PLAIN_GRAPH, targets, layers)
            if merge is not None and merge[0]:
                from safetensors.torch import save_file as save_merge
                save_merge({k: v.contiguous() for k, v in merge[0].items()}, str(staging / MERGE_SCALES))
            trainer = BundleGraph(module, slots, len(example_inputs), training=True, interventions=interventions, mask_input=mask_index).eval()
            traced = torch.jit.trace(trainer, (*args, torch.tensor(1.0)), check_trace=False)
            traced.save(str(staging / TRAINING_GRAPH))
            cut_json = None
            if cut_after is not None:
                cut = _Cut()
                hook = module.get_submodule(cut_after).register_forward_hook(cut)
                try:
                    prefix = torch.jit.trace(PrefixGraph(graph, cut), args, check_trace=False)
                    activation = prefix(*args)
                    n = len(example_inputs)
                    suffix = SuffixGraph(trainer, cut, n)
                    suffix_traced = torch.jit.trace(suffix, (*args[:n], activation, *args[n:], torch.tensor(1.0)), check_trace=False)
                finally:
                    hook.remove()
                for half in (prefix, suffix_traced):
                    _keep_only_what_outputs_need(half)
                # Frozen, each half keeps only the weights its own graph reads (a traced module
                # holds every parameter of the model otherwise: two more copies of the base on
                # disk and in the trainer's memory). No numerics are changed.
                prefix, suffix_traced = (torch.jit.freeze(half.eval(), optimize_numerics=False) for half in (prefix, suffix_traced))
                prefix.save(str(staging / PREFIX_GRAPH))
                suffix_traced.save(str(staging / SUFFIX_GRAPH))
                # The batch axis is the model inputs' (dynamic); the rest is as traced.
                shape = [-1, *activation.shape[1:]]
                if any(1 in axes for axes in (dynamic_axes or {}).values()) and activation.dim() > 2:
                    shape[1] = -1  # a sequence axis that follows the inputs' length
                cut_json = {
                    "after": cut_after,
                    "prefix_graph": PREFIX_GRAPH,
                    "suffix_graph": SUFFIX_GRAPH,
                    "activation": {"name": CUT_ACTIVATION_INPUT, "dtype": "f32", "shape": shape},
                    "slots_above": above,
                }
                if reft:
                    cut_json["reft_above"] = reft_above
        for dest, src in (extra_files or {}).items():
            shutil.copyfile(src, staging / dest)
        from safetensors.torch import save_file

        if head_tensors is not None:
            save_file(head_tensors, str(staging / BASE_HEAD))
        if retention_tensors is not None:
            save_file(retention_tensors, str(staging / RETENTION))

        outputs = []
        for oname, tensor in zip(output_names, reference):
            shape = list(tensor.shape)
            for axis, _ in (dynamic_axes or {}).get(oname, {}).items():
                shape[axis] = -1
            outputs.append({"name": oname, "dtype": "f32", "shape": shape})
        inputs = []
        for iname, tensor in example_inputs.items():
            shape = list(tensor.shape)
            for axis, _ in (dynamic_axes or {}).get(iname, {}).items():
                shape[axis] = -1
            inputs.append({"name": iname, "dtype": _dtype_name(tensor.dtype), "shape": shape})
        emb = reference[list(output_names).index(embedding_output)]
        files = sorted(p.name for p in staging.iterdir())
        for f in files:
            # safetensors writes its files private; a bundle is read by the service user.
            (staging / f).chmod(0o644)
        manifest = {
            "format": BUNDLE_FORMAT,
            "name": name,
            "version": version,
            "fingerprint": print_,
            "exporter": {"torch": torch.__version__.split("+")[0], "opset": ONNX_OPSET},
            "serving_graph": SERVING_GRAPH,
            "plain_graph": PLAIN_GRAPH,
            "training_graph": TRAINING_GRAPH,
            "files": {f: {"sha256": sha256_file(staging / f), "bytes": (staging / f).stat().st_size} for f in files},
            "inputs": inputs,
            "outputs": outputs,
            "embedding_output": embedding_output,
            "embedding_dim": int(emb.shape[-1]),
            "logits_output": logits_output,
            "labels": list(labels) if labels is not None else None,
            "preprocessing": preprocessing or {"kind": "tensor"},
            "lora": {"rank_max": rank_max, "slots": [s.to_json() for s in specs], "dropout_input": LORA_DROPOUT_INPUT},
            "base_head": BASE_HEAD if head_tensors is not None else None,
            "retention": RETENTION if retention_tensors is not None else None,
            "metadata": metadata or {},
        }
        if cut_json is not None:
            manifest["cut"] = cut_json
        if merge is not None:
            manifest["merge"] = {"scales": MERGE_SCALES if merge[0] else None, "slots": merge[1]}
        if reft:
            manifest["reft"] = {
                "rank_max": reft_rank_max,
                "slots": [r.to_json() for r in reft],
                "positions_input": REFT_POSITIONS_INPUT if mask_index is not None else None,
                "mask_input": reft_mask_input if mask_index is not None else None,
            }
            if reft_merge is not None:
                manifest["reft"]["merge"] = reft_merge
        with open(staging / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        for f in files:
            fd = os.open(staging / f, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(staging, out)
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].numpy().tobytes())
    return h.hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    names = {torch.float32: "f32", torch.int64: "i64", torch.int32: "i32", torch.uint8: "u8"}
    if dtype not in names:
        raise ExportError(f"input dtype {dtype} is not supported by bundles (f32, i64, i32, u8)")
    return names[dtype]


# Command line -----------------------------------------------------------------------------------

CLI_DOC = """Export a PyTorch model as an adaptd bundle.

    python deploy/export/adaptd_export.py --factory package.module:function [--weights FILE]
        --input image:f32:1x3x224x224 --targets NAME[,NAME...] [--cut-after MODULE]
        [--reft-layers NAME[,NAME...] [--reft-rank-max R] [--reft-mask-input NAME]]
        [--preprocessing JSON|@FILE] --name NAME [--version V] OUT_DIR
    python deploy/export/adaptd_export.py --factory package.module:function --list-modules

The factory is called with no arguments (or --factory-kwargs JSON) and returns an nn.Module whose
forward takes the inputs in the order given and returns the embedding (or a tuple whose outputs
--outputs names). --weights loads a state dict into it (strict). Axis 0 of every input and
output is the batch. Targets are module names or name suffixes, as PEFT's target_modules.
--list-modules prints every module with whether it can take a LoRA slot, and why not.
Then prove the bundle with `adaptd check --bundle OUT_DIR`.
"""


def _load_factory(spec: str, kwargs: dict[str, Any]) -> nn.Module:
    import importlib

    module_name, sep, func_name = spec.partition(":")
    if not sep or not module_name or not func_name:
        raise ExportError(f"--factory {spec!r}: expected package.module:function")
    try:
        factory = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as e:
        raise ExportError(f"--factory {spec!r}: {e}") from e
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ExportError(f"--factory {spec!r} returned a {type(model).__name__}, not an nn.Module")
    return model


def _parse_input(spec: str) -> tuple[str, torch.Tensor]:
    dtypes = {"f32": torch.float32, "i64": torch.int64, "i32": torch.int32, "u8": torch.uint8}
    parts = spec.split(":")
    if len(parts) != 3 or parts[1] not in dtypes:
        raise ExportError(f"--input {spec!r}: expected NAME:DTYPE:SHAPE, DTYPE one of {', '.join(dtypes)}, e.g. image:f32:1x3x224x224")
    try:
        shape = [int(d) for d in parts[2].lower().split("x")]
    except ValueError as e:
        raise ExportError(f"--input {spec!r}: the shape is sizes joined by x, e.g. 1x3x224x224") from e
    if not shape or any(d <= 0 for d in shape):
        raise ExportError(f"--input {spec!r}: every size must be positive")
    # Two rows, so nothing specialises to a batch of one.
    shape[0] = max(shape[0], 2)
    example = torch.randn(shape) if dtypes[parts[1]] == torch.float32 else torch.zeros(shape, dtype=dtypes[parts[1]])
    return parts[0], example


def _json_arg(value: str, what: str) -> Any:
    text = Path(value[1:]).read_text() if value.startswith("@") else value
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ExportError(f"{what}: not JSON ({e})") from e


def list_modules(model: nn.Module) -> list[str]:
    """One line a module: its name, type, and whether a LoRA slot can go there."""
    lines = []
    for name, layer in model.named_modules():
        if not name or not isinstance(layer, (nn.Linear, nn.Conv2d)):
            continue
        refusal = slot_refusal(layer)
        shape = (f"{layer.in_features}->{layer.out_features}" if isinstance(layer, nn.Linear)
                 else f"{layer.in_channels}->{layer.out_channels} k{tuple(layer.kernel_size)} g{layer.groups}")
        lines.append(f"{name}\t{type(layer).__name__}\t{shape}\t{'slot ok' if refusal is None else 'no slot: ' + refusal}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    import argparse
    import sys

    ap = argparse.ArgumentParser(description=CLI_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", help="the bundle directory to write (must not exist, or be empty)")
    ap.add_argument("--factory", required=True, help="package.module:function returning the nn.Module")
    ap.add_argument("--factory-kwargs", default="{}", help="JSON object of keyword arguments for the factory")
    ap.add_argument("--python-path", action="append", default=[], help="a directory to import the factory from")
    ap.add_argument("--weights", help="a state dict (torch.save) to load into the module, strictly")
    ap.add_argument("--input", action="append", default=[], help="NAME:DTYPE:SHAPE, once per model input, in forward's order")
    ap.add_argument("--outputs", default="embedding", help="names of forward's outputs, comma-separated")
    ap.add_argument("--embedding-output", help="which output is the embedding (default: the first)")
    ap.add_argument("--targets", default="", help="LoRA target modules, comma-separated (names or name suffixes)")
    ap.add_argument("--cut-after", help="a module to cut after: LoRA above it trains on cached activations")
    ap.add_argument("--rank-max", type=int, default=16)
    ap.add_argument("--reft-layers", default="", help="modules whose output gets a LoReFT slot, comma-separated (names or name suffixes)")
    ap.add_argument("--reft-rank-max", type=int, default=8)
    ap.add_argument("--reft-mask-input", help="the input whose 1s mark a sequence's real tokens (LoReFT's positions), e.g. attention_mask")
    ap.add_argument("--preprocessing", help='JSON (or @FILE), e.g. {"kind": "image", "height": 224, ...}')
    ap.add_argument("--name")
    ap.add_argument("--version", default="1.0.0")
    ap.add_argument("--list-modules", action="store_true", help="print the modules and where LoRA slots can go, then stop")
    args = ap.parse_args(argv)
    try:
        sys.path[:0] = args.python_path
        model = _load_factory(args.factory, _json_arg(args.factory_kwargs, "--factory-kwargs")).eval()
        if args.weights:
            state = torch.load(args.weights, map_location="cpu", weights_only=True)
            try:
                model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state, strict=True)
            except RuntimeError as e:
                raise ExportError(f"--weights {args.weights}: does not fit the module: {str(e).splitlines()[0]}") from e
        if args.list_modules:
            print("\n".join(list_modules(model)))
            return 0
        if not args.out or not args.name or not args.input:
            raise ExportError("OUT_DIR, --name and at least one --input are needed to export")
        inputs = dict(_parse_input(i) for i in args.input)
        outputs = [o for o in args.outputs.split(",") if o]
        dynamic = {n: {0: "batch"} for n in [*inputs, *outputs]}
        preprocessing = _json_arg(args.preprocessing, "--preprocessing") if args.preprocessing else None
        out = export_bundle(
            model, inputs, [t for t in args.targets.split(",") if t], args.out, name=args.name, version=args.version,
            rank_max=args.rank_max, output_names=outputs, dynamic_axes=dynamic,
            embedding_output=args.embedding_output or outputs[0], preprocessing=preprocessing, cut_after=args.cut_after,
            reft_layers=[r for r in args.reft_layers.split(",") if r], reft_rank_max=args.reft_rank_max, reft_mask_input=args.reft_mask_input,
            metadata={"factory": args.factory},
        )
    except (ExportError, OSError) as e:
        print(f"adaptd_export: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}; prove it with: adaptd check --bundle {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
