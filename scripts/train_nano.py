"""Train k2-nano: a ~10M-parameter model with Kimi K2's exact architecture and release format.

DeepSeek-V3 layout as in K2 Thinking: MLA with q_lora, YaRN RoPE (beta 1/1), a dense first layer,
sigmoid-routed MoE with an aux-loss-free selection bias (noaux_tc) and one shared expert, routed
experts exported as compressed-tensors INT4 (group 32) after a short quantization-aware phase.
Trained on four Jane Austen novels (public domain). Northanger Abbey is held out whole: it is the
validation set for early stopping and the headline figure (bits per byte on a novel never seen).
Pride and Prejudice chapters 59-61 are also kept out of training, for the older figure.

    python scripts/train_nano.py --corpus DIR        # tokenizer + train (resumable) + export + eval
    python scripts/train_nano.py --corpus DIR --export-only   # export/eval the training checkpoint
    python scripts/train_nano.py --corpus DIR --sample "It is a truth universally acknowledged"

transformers' DeepseekV3ForCausalLM is a training-time dependency only; the export goes through
k2lite.writer.write_checkpoint. Run with one thread (the default here).
"""
from __future__ import annotations

import argparse
import base64
import copy
import json
import math
import os
import re
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from k2lite.formats import Int4Tensor, bf16_to_f32, dequantize_int4, f32_to_bf16  # noqa: E402
from k2lite.safetensors import SafetensorsFile  # noqa: E402
from k2lite.testing.random_model import tensor_shapes  # noqa: E402
from k2lite.tokenizer import PAT_STR  # noqa: E402  Kimi's pre-tokenizer, one copy
from k2lite.writer import write_checkpoint  # noqa: E402

N_SPECIAL = 256
KIMI_SPECIAL_BASE = 163584
BOOKS = ["emma", "mansfieldpark", "northangerabbey", "prideprejudice", "sensesensibility"]
VALID_BOOK = "northangerabbey"            # held out whole: early stopping and the headline figure
HELDOUT_BOOK, HELDOUT_FROM = "prideprejudice", "Chapter 59"   # chapters 59-61: the older figure


# ------------------------------------------------------------------ tokenizer
def build_tokenizer(kimi_dir: str, n_ranks: int, out_dir: str | None):
    """First n_ranks of Kimi's merge-ordered BPE ranks + its 256 special tokens renumbered to
    n_ranks + i. Returns (tiktoken.Encoding, special name -> id). Writes tiktoken.model and
    tokenizer_config.json to out_dir when given."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    ranks = load_tiktoken_bpe(os.path.join(kimi_dir, "tiktoken.model"))
    sub = {b: r for b, r in ranks.items() if r < n_ranks}
    assert len(sub) == n_ranks and sorted(sub.values()) == list(range(n_ranks))
    missing = [b for b in range(256) if bytes([b]) not in sub]
    assert not missing, f"single bytes missing from the first {n_ranks} ranks: {missing}"
    with open(os.path.join(kimi_dir, "tokenizer_config.json")) as f:
        tcfg = json.load(f)
    named = {int(k): v for k, v in tcfg["added_tokens_decoder"].items()}
    specials = {}
    for i in range(N_SPECIAL):
        old = KIMI_SPECIAL_BASE + i
        name = named[old]["content"] if old in named else f"<|reserved_token_{n_ranks + i}|>"
        specials[name] = n_ranks + i
    enc = tiktoken.Encoding(f"k2-nano-{n_ranks}", pat_str=PAT_STR, mergeable_ranks=sub,
                            special_tokens=specials)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "tiktoken.model"), "w") as f:
            for b, r in sorted(sub.items(), key=lambda kv: kv[1]):
                f.write(f"{base64.b64encode(b).decode()} {r}\n")
        new = copy.deepcopy(tcfg)
        new["added_tokens_decoder"] = {str(k - KIMI_SPECIAL_BASE + n_ranks): v
                                       for k, v in sorted(named.items())}
        # the copied config's auto_map names remote code ("tokenization_kite") that is not shipped
        new.pop("auto_map", None)
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
            json.dump(new, f, indent=2, ensure_ascii=False)
            f.write("\n")
    return enc, specials


# ------------------------------------------------------------------ corpus
def reflow(text: str) -> str:
    """Printed-edition lines -> one line per paragraph, paragraphs separated by a blank line."""
    paras = re.split(r"\n\s*\n", text.replace("\r\n", "\n"))
    paras = [" ".join(p.split()) for p in paras]
    return "\n\n".join(p for p in paras if p) + "\n"


def corpus_dir(corpus: str) -> str:
    return os.path.join(corpus, "austen") if os.path.isdir(os.path.join(corpus, "austen")) else corpus


def heldout_texts(corpus: str) -> dict:
    """The two texts never trained on, reflowed: {"northangerabbey": whole novel,
    "prideprejudice_ch59": Pride and Prejudice from chapter 59 to the end}."""
    d = corpus_dir(corpus)
    with open(os.path.join(d, VALID_BOOK + ".txt"), encoding="utf-8") as f:
        valid = reflow(f.read())
    with open(os.path.join(d, HELDOUT_BOOK + ".txt"), encoding="utf-8") as f:
        text = f.read()
    return {VALID_BOOK: valid, "prideprejudice_ch59": reflow(text[text.index("\n" + HELDOUT_FROM + "\n"):])}


def load_corpus(corpus: str, enc, eos: int):
    """-> (train token array, {name: held-out token array}). Books are reflowed, joined by eos;
    Northanger Abbey and P&P chapters 59-61 are left out of the training tokens."""
    d = corpus_dir(corpus)
    train = []
    for book in BOOKS:
        if book == VALID_BOOK:
            continue
        with open(os.path.join(d, book + ".txt"), encoding="utf-8") as f:
            text = f.read()
        if book == HELDOUT_BOOK:
            text = text[:text.index("\n" + HELDOUT_FROM + "\n")]
        train += enc.encode_ordinary(reflow(text)) + [eos]
    held = {k: np.array(enc.encode_ordinary(v), np.int32) for k, v in heldout_texts(corpus).items()}
    return np.array(train, np.int32), held


def scored_bytes(enc, tokens: np.ndarray) -> int:
    """UTF-8 bytes of the tokens evaluate() scores (every token but the first)."""
    return len(enc.decode_bytes(tokens[1:].tolist()))


# ------------------------------------------------------------------ model
def nano_config(n_ranks: int, specials: dict, a) -> dict:
    """Release config.json (HF DeepseekV3 keys, model_type kimi_k2)."""
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "kimi_k2",
        "vocab_size": n_ranks + N_SPECIAL, "hidden_size": a.hidden, "intermediate_size": a.dense_ffn,
        "moe_intermediate_size": a.expert_ffn, "num_hidden_layers": a.layers,
        "first_k_dense_replace": 1, "moe_layer_freq": 1,
        "num_attention_heads": a.heads, "num_key_value_heads": a.heads,
        "q_lora_rank": 128, "kv_lora_rank": 64, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16,
        "v_head_dim": 32, "n_routed_experts": a.experts, "n_shared_experts": 1,
        "num_experts_per_tok": a.topk, "n_group": 1, "topk_group": 1, "topk_method": "noaux_tc",
        "scoring_func": "sigmoid", "norm_topk_prob": True, "routed_scaling_factor": 2.827,
        "max_position_embeddings": 16 * a.ctx, "rope_theta": 50000.0,
        "rope_scaling": {"type": "yarn", "factor": 16.0, "original_max_position_embeddings": a.ctx,
                         "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "attention_bias": False,
        "hidden_act": "silu", "initializer_range": 0.02,
        "bos_token_id": specials["[BOS]"], "eos_token_id": specials["<|im_end|>"],
        "pad_token_id": specials["[PAD]"], "torch_dtype": "bfloat16", "num_nextn_predict_layers": 0,
    }


QAT = {"on": False}


def fake_int4(w: torch.Tensor, group: int = 32) -> torch.Tensor:
    """Fake-quantize along the last (input) dim exactly as k2lite.formats.quantize_int4 does
    (scale = bf16(absmax/7.5), q = clamp(round(w/scale), -8, 7)); straight-through gradient."""
    g = w.reshape(*w.shape[:-1], w.shape[-1] // group, group)
    scale = (g.detach().abs().amax(-1, keepdim=True) / 7.5).to(torch.bfloat16).float()
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = (torch.clamp(torch.round(g.detach() / scale), -8, 7) * scale).reshape(w.shape)
    return w + (q - w).detach()


def experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """Same math as transformers' DeepseekV3Experts.forward (tokens grouped by expert), plus
    INT4 fake-quant during QAT and per-expert load counts for the selection-bias update."""
    E, k = self.num_experts, top_k_index.shape[-1]
    gu, dp = self.gate_up_proj, self.down_proj
    if QAT["on"]:
        gu, dp = fake_int4(gu), fake_int4(dp)
    flat = top_k_index.reshape(-1)
    counts = torch.bincount(flat, minlength=E)
    if self.training:
        self._load = counts if getattr(self, "_load", None) is None else self._load + counts
    order = torch.argsort(flat, stable=True)
    tok = order // k
    wts = top_k_weights.reshape(-1)[order]
    x = hidden_states[tok]
    outs = []
    for e, xe in enumerate(torch.split(x, counts.tolist())):
        if xe.shape[0] == 0:
            continue
        g, u = F.linear(xe, gu[e]).chunk(2, dim=-1)
        outs.append(F.linear(F.silu(g) * u, dp[e]))
    y = torch.cat(outs) * wts[:, None].to(x.dtype)
    return torch.zeros_like(hidden_states).index_add_(0, tok, y.to(hidden_states.dtype))


def make_model(cfg: dict, seed: int):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as mdv3
    mdv3.DeepseekV3Experts.forward = experts_forward
    hf = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "torch_dtype")}
    torch.manual_seed(seed)
    conf = DeepseekV3Config(**hf)
    conf._attn_implementation = "sdpa"
    model = DeepseekV3ForCausalLM(conf).float()
    return model


def add_dropout(model, p: float):
    """Dropout on the embedding output and on each attention and MLP output before it joins the
    residual stream (training only; transformers' DeepseekV3 has no such option)."""
    def drop(mod, inp, out):
        if isinstance(out, tuple):
            return (F.dropout(out[0], p, mod.training),) + tuple(out[1:])
        return F.dropout(out, p, mod.training)
    if p > 0:
        model.model.embed_tokens.register_forward_hook(drop)
        for layer in model.model.layers:
            layer.self_attn.register_forward_hook(drop)
            layer.mlp.register_forward_hook(drop)


def moe_blocks(model):
    return [l.mlp for l in model.model.layers if hasattr(l.mlp, "experts")]


@torch.no_grad()
def update_router_bias(model, u: float):
    """DeepSeek-V3 aux-loss-free balancing: bias_e += u * sign(mean_load - load_e)."""
    for moe in moe_blocks(model):
        load = moe.experts._load.float()
        moe.gate.e_score_correction_bias += u * torch.sign(load.mean() - load)
        moe.experts._load = None


# ------------------------------------------------------------------ export / import
def release_tensors(model, cfg: dict):
    """(name, float32 numpy) in release order; fused HF experts split into per-expert
    gate_proj/up_proj/down_proj [out, in]. Checks the name/shape set against tensor_shapes()."""
    sd = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    Fm = cfg["moe_intermediate_size"]
    out = {}
    for k, v in sd.items():
        m = re.match(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$", k)
        if not m:
            out[k] = v
            continue
        for e in range(v.shape[0]):
            p = f"{m.group(1)}.{e}."
            if m.group(2) == "gate_up_proj":
                out[p + "gate_proj.weight"] = v[e, :Fm]
                out[p + "up_proj.weight"] = v[e, Fm:]
            else:
                out[p + "down_proj.weight"] = v[e]
    want = list(tensor_shapes(cfg))
    assert set(out) == {n for n, _ in want}, (set(out) ^ {n for n, _ in want})
    for n, s in want:
        assert tuple(out[n].shape) == tuple(s), (n, out[n].shape, s)
        yield n, np.ascontiguousarray(out[n], np.float32)


def load_release(model_dir: str):
    """Release folder -> (config dict, {HF state-dict name: float32 torch tensor}); INT4 experts
    dequantized with k2lite.formats.dequantize_int4, BF16 widened exactly."""
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(model_dir, "model.safetensors.index.json")) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    raw = {}
    for fn in files:
        st = SafetensorsFile(os.path.join(model_dir, fn))
        for k in st.keys():
            raw[k] = (np.array(st.get(k)), st.dtype(k))
    dense = {}
    for k, (a, dt) in raw.items():
        if k.endswith(".weight_packed"):
            base = k[: -len(".weight_packed")]
            sc = raw[base + ".weight_scale"][0]
            shape = tuple(int(x) for x in raw[base + ".weight_shape"][0])
            dense[base + ".weight"] = dequantize_int4(Int4Tensor(a, sc, shape, shape[1] // sc.shape[1]))
        elif k.endswith((".weight_scale", ".weight_shape")):
            continue
        elif dt == "BF16":
            dense[k] = bf16_to_f32(a)
        else:
            dense[k] = a.astype(np.float32)
    sd = {}
    E = cfg["n_routed_experts"]
    for k, v in dense.items():
        m = re.match(r"^(model\.layers\.\d+\.mlp\.experts)\.0\.gate_proj\.weight$", k)
        if m:
            p = m.group(1)
            sd[p + ".gate_up_proj"] = torch.from_numpy(np.stack(
                [np.concatenate([dense[f"{p}.{e}.gate_proj.weight"], dense[f"{p}.{e}.up_proj.weight"]])
                 for e in range(E)]))
            sd[p + ".down_proj"] = torch.from_numpy(np.stack(
                [dense[f"{p}.{e}.down_proj.weight"] for e in range(E)]))
        elif ".mlp.experts." not in k:
            sd[k] = torch.from_numpy(np.ascontiguousarray(v))
    return cfg, sd


def bf16_round_model(model):
    """Copy of the weights rounded to bf16 as the checkpoint stores them (router bias stays f32)."""
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith("e_score_correction_bias"):
            sd[k] = v.clone()
        else:
            sd[k] = torch.from_numpy(bf16_to_f32(f32_to_bf16(v.float().numpy())))
    return sd


# ------------------------------------------------------------------ eval / sample
@torch.no_grad()
def evaluate(model, tokens: np.ndarray, ctx: int, bs: int = 8) -> float:
    """Mean next-token loss over non-overlapping ctx-token windows of `tokens`."""
    model.eval()
    t = torch.from_numpy(tokens.astype(np.int64))
    n = (len(t) - 1) // ctx
    tot, cnt = 0.0, 0
    wins = [(i * ctx, ctx) for i in range(n)]
    if (len(t) - 1) % ctx > 1:
        wins.append((n * ctx, len(t) - 1 - n * ctx))
    for i in range(0, len(wins), bs):
        chunk = [w for w in wins[i:i + bs] if w[1] == wins[i][1]]
        rest = [w for w in wins[i:i + bs] if w[1] != wins[i][1]]
        for group in (chunk, rest):
            if not group:
                continue
            L = group[0][1]
            x = torch.stack([t[s:s + L] for s, _ in group])
            y = torch.stack([t[s + 1:s + L + 1] for s, _ in group])
            logits = model(input_ids=x).logits
            tot += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                   reduction="sum").item()
            cnt += y.numel()
    model.train()
    return tot / cnt


@torch.no_grad()
def sample(model, enc, prompt: str, n: int, temperature: float, top_p: float, seed: int,
           eos: int, ctx: int) -> str:
    model.eval()
    g = torch.Generator().manual_seed(seed)
    ids = enc.encode_ordinary(prompt)
    out = []
    for _ in range(n):
        x = torch.tensor([(ids + out)[-ctx:]])
        logits = model(input_ids=x).logits[0, -1].float() / max(temperature, 1e-5)
        special = torch.arange(logits.shape[0]) >= enc.max_token_value + 1 - N_SPECIAL
        logits[special & (torch.arange(logits.shape[0]) != eos)] = -float("inf")   # text or eos only
        p = torch.softmax(logits, -1)
        sp, si = torch.sort(p, descending=True)
        keep = torch.cumsum(sp, 0) - sp < top_p
        sp = sp * keep
        nxt = int(si[torch.multinomial(sp / sp.sum(), 1, generator=g)])
        if nxt == eos:
            break
        out.append(nxt)
    return prompt + enc.decode(out)


# ------------------------------------------------------------------ main
def export(model, cfg, enc, specials, a, held, run):
    """Write the release folder, read it back, and score every held-out text three ways: the
    float32 training weights, the same rounded to bf16, and the exported INT4 checkpoint."""
    out = a.out
    os.makedirs(out, exist_ok=True)
    write_checkpoint(out, cfg, release_tensors(model, cfg), int4_experts=True, group_size=32)
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"],
                   "pad_token_id": cfg["pad_token_id"], "do_sample": True, "temperature": 0.8,
                   "top_p": 0.95, "max_new_tokens": 200}, f, indent=2)
        f.write("\n")
    bf16 = make_model(cfg, a.seed)
    bf16.load_state_dict(bf16_round_model(model))
    int4 = make_model(cfg, a.seed)
    _, sd = load_release(out)
    missing, unexpected = int4.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    m = dict(run, params=sum(p.numel() for p in model.parameters()), heldout={})
    for name, toks in held.items():
        nb = scored_bytes(enc, toks)
        r = {"tokens": int(len(toks)), "bytes": nb}
        for label, net in (("fp32", model), ("bf16", bf16), ("int4", int4)):
            loss = evaluate(net, toks, a.ctx)
            r[f"loss_{label}"] = loss
            r[f"bpb_{label}"] = loss * (len(toks) - 1) / math.log(2) / nb
        m["heldout"][name] = r
        print(f"{name} ({len(toks)} tokens, {nb} bytes): bits/byte fp32 {r['bpb_fp32']:.4f} | "
              f"bf16 {r['bpb_bf16']:.4f} | INT4 export {r['bpb_int4']:.4f}  (INT4 loss "
              f"{r['loss_int4']:.4f}, ppl {math.exp(r['loss_int4']):.2f})", flush=True)
    with open(os.path.join(a.workdir, "metrics.json"), "w") as f:
        json.dump(m, f, indent=2)
    print(sample(int4, enc, "It is a truth universally acknowledged", 80, 0.8, 0.95, a.seed,
                 specials["<|im_end|>"], a.ctx), flush=True)
    return m


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", required=True,
                    help="folder of the public-domain novels (plain text; see models/k2-nano/README.md)")
    ap.add_argument("--kimi-tokenizer", default=os.path.join(ROOT, "models", "kimi-k2-thinking"),
                    help="folder with Kimi's tiktoken.model and tokenizer_config.json")
    ap.add_argument("--out", default=os.path.join(ROOT, "models", "k2-nano"))
    ap.add_argument("--workdir", default="/tmp/k2-nano-train", help="resumable checkpoint + metrics")
    ap.add_argument("--ranks", type=int, default=8192, help="BPE ranks kept from Kimi's vocabulary")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dense-ffn", type=int, default=768)
    ap.add_argument("--expert-ffn", type=int, default=256)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--topk", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=512, help="training window; YaRN's original length")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3000, help="length of the cosine schedule")
    ap.add_argument("--patience", type=int, default=3,
                    help="stop after this many validations without a new best")
    ap.add_argument("--qat-steps", type=int, default=100,
                    help="final steps, from the best weights, with INT4 fake-quant experts")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--bias-u", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-amp", action="store_true", help="train in fp32 (default: bf16 autocast)")
    ap.add_argument("--eval-every", type=int, default=200, help="validate on Northanger Abbey")
    ap.add_argument("--valid-tokens", type=int, default=0,
                    help="validate on only the first N tokens (quick experiments; 0: the whole book)")
    ap.add_argument("--export-only", action="store_true")
    ap.add_argument("--bench", type=int, default=0, help="time this many steps and exit")
    ap.add_argument("--sample", help="prompt: continue it with the exported model (or --from-ckpt)")
    ap.add_argument("--from-ckpt", action="store_true")
    ap.add_argument("--tokens", type=int, default=120)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-p", type=float, default=0.95)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    if a.sample is not None:
        enc, specials = build_tokenizer(a.kimi_tokenizer, a.ranks, None)
        if a.from_ckpt:
            ck = torch.load(os.path.join(a.workdir, "ckpt.pt"), weights_only=False)
            cfg, sd = ck["cfg"], ck["model"]
        else:
            cfg, sd = load_release(a.out)
            cfg.pop("quantization_config", None)
        model = make_model(cfg, a.seed)
        model.load_state_dict(sd, strict=False)
        ctx = cfg["rope_scaling"]["original_max_position_embeddings"]
        for i in range(3):
            print(f"--- sample {i} ---")
            print(sample(model, enc, a.sample, a.tokens, a.temperature, a.top_p, a.seed + i,
                         specials["<|im_end|>"], ctx), flush=True)
        return

    os.makedirs(a.workdir, exist_ok=True)
    enc, specials = build_tokenizer(a.kimi_tokenizer, a.ranks, None if a.bench else a.out)
    eos = specials["<|im_end|>"]
    train, held = load_corpus(a.corpus, enc, eos)
    valid = held[VALID_BOOK][:a.valid_tokens or None]
    valid_bytes = scored_bytes(enc, valid)
    print(f"tokenizer: {a.ranks} ranks + {N_SPECIAL} specials; train {len(train)} tokens; held out: "
          + ", ".join(f"{k} {len(v)} tokens" for k, v in held.items()), flush=True)
    cfg = nano_config(a.ranks, specials, a)
    model = make_model(cfg, a.seed)
    add_dropout(model, a.dropout)
    n_par = sum(p.numel() for p in model.parameters())
    n_exp = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    print(f"params {n_par / 1e6:.2f}M (routed experts {n_exp / 1e6:.2f}M)", flush=True)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    nodecay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                             {"params": nodecay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95), eps=1e-8)
    # Two phases. "main": the cosine schedule, validated every eval_every steps; the best weights
    # (and optimizer state) are kept in best.pt, and the phase ends after `patience` validations
    # without a new best. "qat": qat_steps more from the best weights at the final learning rate,
    # with the routed experts fake-quantized to the exported INT4 grid.
    ckpt, best_path = os.path.join(a.workdir, "ckpt.pt"), os.path.join(a.workdir, "best.pt")
    st = {"step": 0, "seen": 0, "elapsed": 0.0, "hist": [], "phase": "main", "qat_done": 0,
          "best_bpb": float("inf"), "best_step": 0, "bad": 0, "valid": []}
    if os.path.exists(ckpt) and not a.bench:
        ck = torch.load(ckpt, weights_only=False)
        if ck["cfg"] != cfg:
            sys.exit(f"{ckpt} was trained with another config; delete it or change --workdir")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        st = ck["state"]
        print(f"resumed at step {st['step']} ({st['phase']}, {st['seen']} tokens, "
              f"{st['elapsed']:.0f}s)", flush=True)

    def save(path, **extra):
        tmp = path + ".tmp"
        torch.save({"cfg": cfg, "model": model.state_dict(), "opt": opt.state_dict(), "state": st,
                    **extra}, tmp)
        os.replace(tmp, path)

    lr_min = 0.1 * a.lr

    def lr_at(s):
        if st["phase"] == "qat":
            return lr_min
        if s < a.warmup:
            return a.lr * (s + 1) / a.warmup
        frac = (s - a.warmup) / max(1, a.steps - a.warmup)
        return lr_min + (a.lr - lr_min) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))

    def last_loss():
        h = st["hist"]
        return float(np.mean([x[1] for x in h[-20:]])) if h else float("nan")

    model.train()
    T, B = a.ctx, a.batch
    tt = torch.from_numpy(train.astype(np.int64))
    t0, win_t, win_tok = time.time(), time.time(), 0
    while not a.export_only:
        if a.bench and st["step"] >= a.bench:
            break
        if st["phase"] == "main" and (st["step"] >= a.steps or st["bad"] >= a.patience):
            bk = torch.load(best_path, weights_only=False)
            model.load_state_dict(bk["model"])
            opt.load_state_dict(bk["opt"])
            st["phase"] = "qat"
            print(f"main phase over at step {st['step']}; best validation {st['best_bpb']:.4f} "
                  f"bits/byte at step {st['best_step']}; QAT from there", flush=True)
        if st["phase"] == "qat" and st["qat_done"] >= a.qat_steps:
            break
        step = st["step"]
        QAT["on"] = st["phase"] == "qat"
        rng = np.random.default_rng([a.seed, step])      # data order depends only on the step
        starts = rng.integers(0, len(tt) - T - 1, B)
        x = torch.stack([tt[s:s + T] for s in starts])
        y = torch.stack([tt[s + 1:s + T + 1] for s in starts])
        for gr in opt.param_groups:
            gr["lr"] = lr_at(step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not a.no_amp):
            logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        update_router_bias(model, a.bias_u)
        st["step"] = step = step + 1
        st["seen"] += B * T
        st["qat_done"] += QAT["on"]
        win_tok += B * T
        st["hist"].append((step, loss.item()))
        if step % 25 == 0:
            now = time.time()
            st["elapsed"] += now - win_t
            tps = win_tok / (now - win_t)
            win_t, win_tok = now, 0
            print(f"step {step:5d} loss {last_loss():.4f} lr {lr_at(step - 1):.2e}"
                  f"{' qat' if QAT['on'] else ''} | {tps:6.0f} tok/s | {st['seen'] / 1e6:.2f}M tokens "
                  f"{st['elapsed'] / 60:.1f} min", flush=True)
        if a.bench:
            continue
        if st["phase"] == "main" and (step % a.eval_every == 0 or step == a.steps):
            now = time.time()
            st["elapsed"] += now - win_t
            bpb = evaluate(model, valid, T) * (len(valid) - 1) / math.log(2) / valid_bytes
            st["valid"].append((step, bpb))
            bias = moe_blocks(model)[0].gate.e_score_correction_bias
            better = bpb < st["best_bpb"]
            st["bad"] = 0 if better else st["bad"] + 1
            print(f"  validation (Northanger Abbey{f', {len(valid)} tokens' if a.valid_tokens else ''}): "
                  f"{bpb:.4f} bits/byte{' (best)' if better else ''}; layer-1 router bias "
                  f"[{bias.min():+.3f}, {bias.max():+.3f}]", flush=True)
            if better:
                st["best_bpb"], st["best_step"] = bpb, step
                save(best_path)
            save(ckpt)
            win_t = time.time()
        elif step % 100 == 0:
            save(ckpt)
    if a.bench:
        print(f"bench: {st['seen'] / (time.time() - t0):.0f} tok/s", flush=True)
        return
    if not a.export_only:
        save(ckpt)
    QAT["on"] = False
    run = {"train_tokens": int(len(train)), "train_tokens_seen": st["seen"],
           "train_seconds": st["elapsed"], "train_loss": last_loss(), "best_step": st["best_step"],
           "steps": st["step"], "validation": st["valid"], "args": vars(a)}
    export(model, cfg, enc, specials, a, held, run)


if __name__ == "__main__":
    main()
