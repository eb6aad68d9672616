"""The library API: `k2lite.load(path) -> LLM`, `LLM.logits(ids)`, `LLM.sequence().append(ids)`.

The engine works on token ids only; text goes through `LLM.tokenizer` (when the folder ships
tiktoken.model + tokenizer_config.json). Generation helpers (generate/stream/chat) build on
`Sequence.append` in generate.py.
"""
from __future__ import annotations

import os
import sys

import numpy as np

from . import ops
from .backends.checks import cdiv
from .config import Config
from .errors import ModelFormatError
from .kvcache import KV_DTYPES, CacheSlot, PagedKVCache, common_prefix
from .loader import Checkpoint, load_weights
from .model import Model

from .generate import GenerationMixin


class Sequence:
    """One conversation's position in the paged cache. `append` feeds tokens, returns logits."""

    def __init__(self, llm: "LLM"):
        self.llm = llm
        self.state: CacheSlot = llm.cache.new_seq()
        self.tokens: list = []

    def __len__(self):
        return self.state.length

    def append(self, ids, last_only: bool = False) -> np.ndarray:
        """Feed ids (prefill form for several, absorbed decode for one); logits f32
        [len(ids), vocab], or [1, vocab] for the last id only with last_only=True. All or
        nothing: an error (or Ctrl-C) part-way leaves the sequence as it was."""
        ids = self.llm._check_ids(ids)
        if self.state.closed:
            raise ValueError("sequence is closed")
        if len(ids) == 0:
            return np.zeros((0, self.llm.config.vocab_size), np.float32)
        if self.state.length + len(ids) > self.llm.context:
            raise ValueError(f"sequence would be {self.state.length + len(ids)} tokens, "
                             f"over the context limit of {self.llm.context}")
        model, cache, step = self.llm.model, self.llm.cache, self.llm.prefill_chunk
        start = self.state.length
        try:
            if len(ids) == 1:
                logits = model.forward(ids, cache, [self.state], decode=True)
            else:   # chunked prefill bounds the [heads, chunk, context] score matrix
                starts = range(0, len(ids), step)
                logits = [model.forward(ids[i:i + step], cache, [self.state], decode=False,
                                        last_only=last_only, head=not last_only or i == starts[-1])
                          for i in starts]
                logits = logits[-1] if last_only else np.concatenate(logits)
            self.tokens.extend(int(t) for t in ids)
        except BaseException:
            self.truncate(start)                # chunks that did run are forgotten too
            raise
        return logits

    def fork(self) -> "Sequence":
        """A new sequence holding a copy of this one's cache: branch (sample several
        continuations, try another turn) without prefilling the shared start again."""
        if self.state.closed:
            raise ValueError("sequence is closed")
        new = Sequence(self.llm)
        new.state = self.llm.cache.copy_prefix(self.state, len(self))
        new.tokens = list(self.tokens)
        return new

    def truncate(self, n: int) -> None:
        """Keep the first n tokens and forget the rest (their pages are freed)."""
        if not 0 <= n <= len(self):
            raise ValueError(f"cannot truncate a sequence of {len(self)} tokens to {n}")
        self.llm.cache.truncate(self.state, n)
        del self.tokens[n:]

    def reuse_prefix(self, ids) -> int:
        """Prompt caching: keep the longest run of cached tokens that starts `ids` (at most
        len(ids) - 1 of them, so the rest still gives logits), forget the others, and return
        how many were kept. The caller appends ids[kept:]."""
        if self.state.closed:
            raise ValueError("sequence is closed")
        n = common_prefix(self.tokens, list(ids)[:len(ids) - 1])
        self.truncate(n)
        return n

    def close(self):
        if not self.state.closed:
            self.llm.cache.free(self.state)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class LLM(GenerationMixin):
    """A loaded model: config, weights (mmap'd), op backend, paged latent cache, tokenizer."""

    def __init__(self, path: str, device: str = "cpu", threads: int | None = None,
                 context: int | None = None, page_size: int = 64, max_cache_tokens: int | None = None,
                 prefill_chunk: int = 256, mmap: bool = True, repack: bool = False,
                 chat_template: str | None = None, kv_cache: str | None = None):
        self.path = path
        if not os.path.isdir(path):
            raise ModelFormatError(f"{path}: not a checkpoint folder (config.json + *.safetensors)")
        self.config = Config.from_json(os.path.join(path, "config.json"))
        if page_size < 1 or (context is not None and context < 1) or prefill_chunk < 1:
            raise ValueError(f"page_size, context and prefill_chunk must be positive, not "
                             f"{page_size}, {context}, {prefill_chunk}")
        if device not in ("ref", "cpu", "cuda"):
            raise ValueError(f"unknown device {device!r}: expected ref, cpu or cuda")
        backend = device
        if device == "cpu" and not ops.available("cpu"):
            # never fall back silently to the numpy reference: it is ~100x slower
            raise RuntimeError(f"device='cpu' needs k2lite's native kernels, which are not built here "
                               f"({ops.missing_reason('cpu')}): run `pip install -e .` or `python setup.py "
                               "build_ext --inplace` in the source tree, or pass device='ref' for the numpy reference")
        if device == "cuda" and not ops.available("cuda"):
            raise RuntimeError("device='cuda' needs k2lite.backends._cuda (built when nvcc is found) and a GPU")
        self.device, self.backend = device, backend
        self.prefill_chunk = max(1, int(prefill_chunk))
        self.ops = ops.get(backend)
        if threads is not None and hasattr(self.ops, "set_threads"):
            self.ops.set_threads(int(threads))
        # mmap=True (default): weights are views of the files, opening is instant and pages are
        # shared with the OS cache. mmap=False copies them into anonymous (huge-page) memory:
        # slower to load and private, but decode streams them a little faster. repack=True
        # also copies every BF16 matrix that only linear() reads (attention projections, dense
        # and shared MLPs, lm_head) into 16-row tiles (formats.TiledBF16), one sequential stream
        # per tile; routed experts and kv_b_proj keep their checkpoint layout.
        self.checkpoint = Checkpoint(path, use_mmap=mmap, repack=repack)
        show = sys.stderr.isatty() and (not mmap or repack or self.config.num_hidden_layers > 8)
        self.weights = load_weights(self.config, self.checkpoint, _progress_bar if show else None)
        self.model = Model(self.config, self.weights, backend)
        self.context = int(context or min(self.config.max_position_embeddings, 1 << 20))
        cap = max_cache_tokens or max(self.context, 4096)
        width = self.config.kv_lora_rank + self.config.qk_rope_head_dim
        # kv_cache: "bf16" | "int8" | "f32", or None: the backend's (bf16 where the BF16 matmuls
        # take bf16 activations, else f32). int8 halves bf16's bytes (kvcache.kv8_quantize).
        if kv_cache is not None and kv_cache not in KV_DTYPES:
            raise ValueError(f"kv_cache: expected one of {', '.join(KV_DTYPES)}, not {kv_cache!r}")
        if kv_cache not in (None, "f32") and backend == "cuda":
            raise ValueError(f"kv_cache: the cuda backend keeps a float32 cache, not {kv_cache}")
        dtype = KV_DTYPES[kv_cache] if kv_cache else self.ops.cache_dtype()
        self.cache = PagedKVCache(self.config.num_hidden_layers, width, page_size,
                                  max_pages=cdiv(cap, page_size), dtype=dtype, latent=self.config.kv_lora_rank)
        self.tokenizer = self._load_tokenizer(path)
        if self.tokenizer is not None and self.tokenizer.vocab_size > self.config.vocab_size:
            raise ModelFormatError(f"{path}: the tokenizer has {self.tokenizer.vocab_size} ids, more than "
                                   f"config.json's vocab_size {self.config.vocab_size}")
        if chat_template is not None:   # a file, a folder holding one, or a built-in name
            if self.tokenizer is None:
                raise ValueError(f"{path}: chat_template given, but the folder has no tokenizer (tiktoken.model)")
            from .chat_template import ChatTemplate
            self.tokenizer.chat_template = ChatTemplate.load(chat_template, self.tokenizer.template_vars)

    @staticmethod
    def _load_tokenizer(path):
        if not (os.path.exists(os.path.join(path, "tiktoken.model"))
                and os.path.exists(os.path.join(path, "tokenizer_config.json"))):
            return None
        try:
            from .tokenizer import Tokenizer
        except ImportError:
            return None
        return Tokenizer.from_dir(path)

    def _check_ids(self, ids) -> np.ndarray:
        a = np.asarray(ids)
        if a.ndim == 0:
            a = a.reshape(1)
        if a.ndim != 1 or (a.size and not np.issubdtype(a.dtype, np.integer)):
            raise ValueError("token ids must be a 1-D sequence of integers")
        bad = np.flatnonzero((a < 0) | (a >= self.config.vocab_size)) if a.size else []
        if len(bad):
            raise ValueError(f"token id {int(a[bad[0]])} at position {int(bad[0])} is out of range "
                             f"[0, {self.config.vocab_size})")
        return a.astype(np.int64)

    def sequence(self) -> Sequence:
        return Sequence(self)

    def logits(self, ids) -> np.ndarray:
        """Logits f32 [len(ids), vocab] of a fresh sequence prefilled with ids."""
        with self.sequence() as seq:
            return seq.append(ids)

    def __repr__(self):
        c = self.config
        return (f"LLM({self.path!r}, device={self.device!r}, layers={c.num_hidden_layers}, "
                f"hidden={c.hidden_size}, experts={c.n_routed_experts})")


def _progress_bar(done: int, total: int):
    """Loading progress on a terminal (not when stderr is piped)."""
    bar = "#" * (30 * done // total)
    sys.stderr.write(f"\rloading [{bar:<30}] {done}/{total} layers" + ("\n" if done == total else ""))
    sys.stderr.flush()


def default_model_dir() -> str:
    """The embedded demo model k2-nano: models/k2-nano in a checkout, else the installed copy."""
    here = os.path.dirname(os.path.abspath(__file__))
    for cand in (os.path.join(here, "..", "models", "k2-nano"), os.path.join(here, "models_data", "k2-nano")):
        if os.path.exists(os.path.join(cand, "config.json")):
            return os.path.normpath(cand)
    raise ModelFormatError("the default model k2-nano is not installed; pass --model DIR")


def load(path: str | None = None, device: str = "cpu", threads: int | None = None, **kw) -> LLM:
    """Open a checkpoint folder (config.json + safetensors; default: the embedded k2-nano) or a
    Hugging Face id in the local cache (revision=). Weights are mmap'd, not read."""
    from .hub import resolve    # "org/name": the model's folder in the Hugging Face cache
    path = default_model_dir() if path is None else resolve(path, kw.pop("revision", None))
    if not os.path.exists(path):
        raise ModelFormatError(f"{path}: no such file or directory")
    return LLM(path, device=device, threads=threads, **kw)
