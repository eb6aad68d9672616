"""Transformers' DeepseekV3ForCausalLM (torch, float32) on the weights of a k2lite checkpoint.

The INT4 experts are dequantized with the compressed-tensors library itself (not with
k2lite's code), so the oracle shares nothing with the engine under test but the file.
"""
import json
import os

import numpy as np
import torch

from k2lite.loader import Checkpoint


def ct_dequantize(packed: np.ndarray, scales_bf16: np.ndarray, shape, group_size: int) -> torch.Tensor:
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize
    q = unpack_from_int32(torch.from_numpy(np.array(packed)), 4, torch.Size(shape))
    scale = torch.from_numpy(np.array(scales_bf16).view(np.int16)).view(torch.bfloat16)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group_size)
    return dequantize(q, scale, None, args, dtype=torch.float32)


def raw_tensor(ck: Checkpoint, name: str) -> torch.Tensor:
    dt, _ = ck.info(name)
    a = np.array(ck.get(name))
    if dt == "BF16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(a).float()


def hf_model(path: str):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    q = cfg.pop("quantization_config", None)
    group = q["config_groups"]["group_0"]["weights"]["group_size"] if q and "config_groups" in q else 32
    hcfg = DeepseekV3Config(**cfg)
    hcfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(hcfg).float().eval()
    ck = Checkpoint(path)
    dense = {}
    block = tuple((q or {}).get("weight_block_size") or (128, 128))
    for name in ck.where:
        if ck.info(name)[0] == "F8_E4M3":      # fp8 blocks, decoded by torch's own float8 type
            w = torch.from_numpy(np.array(ck.get(name))).view(torch.float8_e4m3fn).float()
            s = raw_tensor(ck, name + "_scale_inv")
            s = s.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:w.shape[0], :w.shape[1]]
            dense[name] = w * s
        elif name.endswith(".weight_scale_inv"):
            continue
        elif name.endswith(".weight_packed"):
            base = name[: -len(".weight_packed")]
            shape = tuple(int(v) for v in ck.get(base + ".weight_shape"))
            dense[base + ".weight"] = ct_dequantize(ck.get(name), ck.get(base + ".weight_scale"), shape, group)
        elif not name.endswith((".weight_scale", ".weight_shape")):
            dense[name] = raw_tensor(ck, name)
    # transformers 5 keeps each layer's experts fused: gate_up_proj [E, 2F, D], down_proj [E, D, F]
    sd = {}
    for name, t in dense.items():
        if ".mlp.experts." in name:
            continue
        sd[name] = t
    for L in range(hcfg.num_hidden_layers):
        p = f"model.layers.{L}.mlp.experts."
        if p + "0.gate_proj.weight" not in dense:
            continue
        E = hcfg.n_routed_experts
        sd[p + "gate_up_proj"] = torch.stack([torch.cat([dense[f"{p}{e}.gate_proj.weight"],
                                                        dense[f"{p}{e}.up_proj.weight"]]) for e in range(E)])
        sd[p + "down_proj"] = torch.stack([dense[f"{p}{e}.down_proj.weight"] for e in range(E)])
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if "rotary_emb" not in m]
    assert not missing and not unexpected, (missing, unexpected)
    return model


def hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.tensor([list(ids)]), use_cache=False)
    return out.logits[0].float().numpy()
