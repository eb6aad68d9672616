"""Kimi tokenizer: tiktoken BPE over the checkpoint's `tiktoken.model`, plus 256 special ids.

The checkpoint folder holds `tiktoken.model` (lines `<base64 bytes> <rank>`, rank = id) and
`tokenizer_config.json`. Special tokens take the 256 ids right after the ranks; ids named in
`added_tokens_decoder` keep that name, the rest are `<|reserved_token_{id}|>`. Nothing here
hard-codes Kimi's sizes, so a demo model that ships a prefix of the ranks works the same way.

Two encoders:
  encode(text)          HF behaviour: special-token strings inside the text become special ids.
  encode_ordinary(text) every character is plain text. Chat content goes through this one
                        (see `encode_chat`), so a user who types `<|im_end|>` cannot end a turn.
"""
import base64
import codecs
import json
import os
import re

import tiktoken

from .errors import ModelFormatError

# Kimi's pre-tokenizer. `&&` is character-class intersection (Rust fancy-regex in tiktoken);
# Python's `regex` module needs regex.V1 for it, and PCRE needs a rewrite (llama.cpp #14642).
PAT_STR = "|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])
NUM_SPECIAL = 256
# The released tokenizer cuts text into 400k-char chunks, and again inside any run of >25k
# whitespace or non-whitespace chars (keeps the Rust regex fast). The cuts can change tokens at
# the boundary, so we cut in the same places to stay id-for-id identical.
MAX_CHUNK_CHARS = 400_000
MAX_RUN_CHARS = 25_000
# Anchored at the start of a run, so a failed search is linear (unanchored, a 400k text of 25k-char
# runs took seconds: every position inside a run started a new 25k-char match attempt).
_LONG_RUN = re.compile(r"(?<!\s)\s{%d}|(?<!\S)\S{%d}" % (MAX_RUN_CHARS + 1, MAX_RUN_CHARS + 1))


def _token_name(v):
    """tokenizer_config.json names a special token as a string or {"content": ...}."""
    v = v.get("content") if isinstance(v, dict) else v
    return v if isinstance(v, str) else None


def load_ranks(path):
    """Read a tiktoken ranks file into {token bytes: rank}."""
    ranks = {}
    try:
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        tok, rank = line.split()
                        ranks[base64.b64decode(tok, validate=True)] = int(rank)
                    except ValueError:      # also binascii.Error, a ValueError
                        raise ModelFormatError(f"{path}:{lineno}: expected '<base64 token> <rank>', "
                                               f"got {line[:60]!r}") from None
    except OSError as e:
        raise ModelFormatError(f"{path}: cannot read ({e.strerror or e})") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ModelFormatError(f"{path}: ranks are not 0..{len(ranks) - 1} without gaps (or a token repeats)")
    return ranks


def _split_long_runs(s):
    """Yield pieces of s with no whitespace / non-whitespace run longer than MAX_RUN_CHARS."""
    if not _LONG_RUN.search(s):  # fast path: almost every real text
        yield s
        return
    run_len, run_is_space, start = 0, s[0].isspace(), 0
    for i, ch in enumerate(s):
        is_space = ch.isspace()
        if is_space != run_is_space:
            run_len, run_is_space = 1, is_space
        else:
            run_len += 1
            if run_len > MAX_RUN_CHARS:
                yield s[start:i]
                start, run_len = i, 1
    yield s[start:]


def _chunks(text):
    for i in range(0, len(text), MAX_CHUNK_CHARS):
        yield from _split_long_runs(text[i:i + MAX_CHUNK_CHARS])


class StreamDecoder:
    """Token ids in, text out, never half a UTF-8 character: incomplete trailing bytes wait."""

    def __init__(self, tokenizer):
        self._tok = tokenizer
        # The stdlib incremental decoder holds back an incomplete sequence and replaces invalid
        # bytes with U+FFFD, exactly like the batch decode(errors="replace").
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id):
        """Return the text that became complete with this token (may be "")."""
        return self._utf8.decode(self._tok.token_bytes(token_id))

    def flush(self):
        """End of stream: whatever bytes are left, with U+FFFD for an incomplete tail."""
        return self._utf8.decode(b"", final=True)


class Tokenizer:
    """The checkpoint's tokenizer: encode/decode, special ids by name, chat template."""

    def __init__(self, ranks, added_tokens=None, name="kimi", chat_template=None):
        """ranks: {bytes: id}; added_tokens: {id: name} for ids in the special range;
        chat_template: a chat_template.ChatTemplate, None for a base model (no chat)."""
        self.chat_template = chat_template
        self.template_vars = {}    # bos_token, eos_token, ... names for jinja chat templates
        n = len(ranks)
        added_tokens = added_tokens or {}
        self.n_ranks = n
        self.vocab_size = n + NUM_SPECIAL
        self.special_names = {}  # id -> name, for all 256 special ids
        for i in range(n, n + NUM_SPECIAL):
            self.special_names[i] = added_tokens.get(i, f"<|reserved_token_{i}|>")
        self.special_tokens = {name: i for i, name in self.special_names.items()}  # name -> id
        self.enc = tiktoken.Encoding(name=name, pat_str=PAT_STR, mergeable_ranks=ranks,
                                     special_tokens=self.special_tokens)
        self.bos_id = self.special_tokens.get("[BOS]")
        # Generation stops at the end of the assistant turn; [EOS] too, since it costs nothing.
        self.eos_ids = [self.special_tokens[t] for t in ("<|im_end|>", "[EOS]")
                        if t in self.special_tokens]
        self.pad_id = self.special_tokens.get("[PAD]")

    @classmethod
    def from_dir(cls, path):
        """Load `tiktoken.model` + `tokenizer_config.json` from a checkpoint folder."""
        ranks = load_ranks(os.path.join(path, "tiktoken.model"))
        cfg_path = os.path.join(path, "tokenizer_config.json")
        added, special = {}, {}
        if os.path.exists(cfg_path):
            try:
                with open(cfg_path, encoding="utf-8") as f:
                    cfg = json.load(f)
            except (OSError, UnicodeDecodeError, ValueError) as e:
                raise ModelFormatError(f"{cfg_path}: cannot read ({type(e).__name__}: {e})") from None
            table = cfg.get("added_tokens_decoder", {}) if isinstance(cfg, dict) else None
            if not isinstance(table, dict):
                raise ModelFormatError(f"{cfg_path}: 'added_tokens_decoder' must be an object "
                                       "{\"<id>\": {\"content\": \"<name>\"}}")
            for k, v in table.items():
                if not (k.isdigit() and isinstance(v, dict) and isinstance(v.get("content"), str)):
                    raise ModelFormatError(f"{cfg_path}: added_tokens_decoder[{k!r}] must map an id "
                                           "to {\"content\": \"<name>\"}")
                i = int(k)
                if not len(ranks) <= i < len(ranks) + NUM_SPECIAL:
                    raise ModelFormatError(f"{cfg_path}: added token id {i} ({v['content']!r}) is "
                                           f"outside the special range {len(ranks)}..{len(ranks) + 255}")
                added[i] = v["content"]
            # the special-token names a jinja chat template may print ({{ bos_token }})
            special = {k: _token_name(cfg.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")
                       if _token_name(cfg.get(k)) is not None}
        from .chat_template import ChatTemplate
        tok = cls(ranks, added, name=os.path.basename(os.path.normpath(path)) or "kimi",
                  chat_template=ChatTemplate.from_dir(path, special))
        tok.template_vars = special
        return tok

    # --- ids ---------------------------------------------------------------------------
    def special_id(self, name):
        """Id of a special token by name, e.g. special_id("<|im_end|>"); KeyError if absent."""
        return self.special_tokens[name]

    def is_special(self, token_id):
        return self.n_ranks <= token_id < self.vocab_size

    def token_bytes(self, token_id):
        """Raw bytes of one token; a special id gives its name."""
        self._check_id(token_id)
        if self.is_special(token_id):
            return self.special_names[token_id].encode("utf-8")
        return self.enc.decode_single_token_bytes(token_id)

    def _check_id(self, token_id):
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary 0..{self.vocab_size - 1}")

    # --- text <-> ids ------------------------------------------------------------------
    def encode(self, text):
        """Like the released tokenizer: special-token names in the text become special ids."""
        out = []
        for chunk in _chunks(text):
            out.extend(self.enc.encode(chunk, allowed_special="all", disallowed_special=()))
        return out

    def encode_ordinary(self, text):
        """Every character is plain text; `<|im_end|>` becomes ordinary BPE tokens."""
        out = []
        for chunk in _chunks(text):
            out.extend(self.enc.encode_ordinary(chunk))
        return out

    def decode(self, ids):
        """Concatenate token bytes and decode UTF-8 with U+FFFD for invalid bytes."""
        ids = list(ids)
        for i in ids:
            self._check_id(i)
        return self.enc.decode(ids, errors="replace")

    def stream_decoder(self):
        """A fresh StreamDecoder: feed(id) -> text, flush() -> text."""
        return StreamDecoder(self)

    # --- chat ----------------------------------------------------------------------------
    def _template(self):
        if self.chat_template is None:
            raise ValueError(f"the tokenizer {self.enc.name!r} has no chat template (a base model: "
                             "prompt it with raw text, or give a template: --chat-template FILE|NAME)")
        return self.chat_template

    def apply_chat_template(self, messages, tools=None, add_generation_prompt=True, **template_kwargs):
        """The checkpoint's chat template rendered to a string. template_kwargs are the
        template's variables (transformers' convention), e.g. thinking=False for K2.6."""
        return self._template().render(messages, tools, add_generation_prompt, **template_kwargs)

    def encode_chat(self, messages, tools=None, add_generation_prompt=True, **template_kwargs):
        """Prompt token ids for generation: only template markup becomes control tokens.

        Message content (and names, ids, tool JSON) is encoded as plain text, so typing
        `<|im_end|>` or `<|tool_call_begin|>` in a message cannot forge a turn or a tool call.
        Adjacent text is encoded together, so for benign content the ids equal
        encode(apply_chat_template(...)). A template k2lite does not know (rendered by jinja2)
        cannot keep the two apart: its output is encoded with special names recognised.
        """
        parts = self._template().render_parts(messages, tools, add_generation_prompt, **template_kwargs)
        return self.encode_parts(parts)

    def encode_parts(self, parts):
        """Ids of rendered (is_markup, text) pieces: markup that names a special token becomes
        that id, everything else plain text. One (None, text) piece (a jinja-rendered template)
        is encoded with special names recognised."""
        ids, text = [], []
        for is_markup, piece in parts:
            if is_markup is None:
                return self.encode(piece)
            if is_markup and piece in self.special_tokens:
                ids.extend(self.encode_ordinary("".join(text)))
                text = []
                ids.append(self.special_tokens[piece])
            else:
                # Markup this vocabulary lacks (e.g. `<think>` in the original K2 config,
                # `<|media_start|>` everywhere) is plain text, as the released encode makes it.
                text.append(piece)
        ids.extend(self.encode_ordinary("".join(text)))
        return ids
