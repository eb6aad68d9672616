"""Kimi chat format: render prompts, parse assistant output (batch and streaming).

Rendering reproduces the released chat templates of Kimi-K2-Thinking, Kimi-K2-Instruct and
Kimi-K2.6/K2.5 (no jinja2 here; `Dialect` names what differs between them, and
chat_template.py decides which one a checkpoint carries). What they share: the tool declaration
first (compact sorted-key JSON), no newlines between messages, `## Return of <id>` before a tool
result. K2 Thinking adds the default system prompt when the first message is not a system one and
writes `<think></think>` for assistant turns up to the last assistant turn without tool calls,
reasoning kept after it, generation prompt without `<think>`. K2 Instruct: no think tags, the
default system prompt followed by a newline. K2.6: no default system prompt, the generation
prompt opens `<think>` (closed with thinking=False), preserve_thinking keeps all reasoning, and
tools are declared in TypeScript as its tokenizer writes them (tool_declaration.py).
`render_parts` keeps markup and content apart so `Tokenizer.encode_chat` can encode content as
plain text (prompt-injection safety). Like the templates, any role renders (roles other than
user/assistant as `<|im_system|>{role}`), and, like transformers, `thinking`/`reasoning` stand in
for a missing `reasoning_content`. Two deliberate differences: a JSON null (reasoning_content,
tool_call_id, a call id) renders as nothing where jinja prints "None", and input the template
would fail on or silently drop (no role, a tool call without `function` or `arguments`, a content
part without text, content that is not a string, list or None) raises a one-line ValueError that
names the message.

Parsing. `StreamParser` is fed decoded text (`feed_text`) or token ids (`feed_token`, needs a
Tokenizer) and returns a list of deltas per call; `finish()` returns the last ones. Deltas:
    {"reasoning_content": str}                   reasoning text (never empty)
    {"content": str}                             answer text (never empty)
    {"tool_call": call, "index": int}            one complete tool call, `call` as below
`parse_assistant(text)` returns the final state, equal to what the deltas add up to:
    {"reasoning_content": str, "content": str, "tool_calls": [call, ...]}
    call = {"id": "functions.get_weather:0", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
A call whose arguments are not valid JSON (or whose id or end marker is malformed) keeps the raw
text and gets an extra "error" key with a one-line reason; nothing here raises on model output.
Text inside a tool-call section but outside any call is kept as content (whitespace is dropped).
Control tokens never reach either text stream: think markers, tool markers and Kimi's other
special names (CONTROL_NAMES, `<|reserved_token_N|>`) are consumed; `<|im_end|>`, `[EOS]` and
`[EOT]` end the message and everything after them is ignored. Other `<|...|>` text (GPT-2's
`<|endoftext|>`, ChatML's `<|im_start|>`) is no Kimi token and stays text.
"""
import functools
import json
import re
from dataclasses import dataclass

DEFAULT_SYSTEM = "You are Kimi, an AI assistant created by Moonshot AI."
# What the released template emits for an image part. `<|media_start|>` is not a named token in
# any Kimi vocabulary (the others are), so it encodes as plain text, as it does upstream.
IMAGE_MARKUP = ["<|media_start|>", "image", "<|media_content|>", "<|media_pad|>", "<|media_end|>"]
VIDEO_MARKUP = "<|kimi_k25_video_placeholder|>"     # K2.5/K2.6 templates
# The roles OpenAI clients send. The template itself renders any other role name too, as a
# system-style turn (`<|im_system|>developer<|im_middle|>`), and so does render_parts.
ROLES = ("system", "user", "assistant", "tool")
# transformers fills `reasoning_content` from these older names before rendering; so do we.
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


# --- rendering -------------------------------------------------------------------------------
def _sort_keys(x):
    """The Kimi tokenizer sorts every dict key of `tools` before rendering."""
    if isinstance(x, dict):
        return {k: _sort_keys(x[k]) for k in sorted(x)}
    if isinstance(x, list):
        return [_sort_keys(v) for v in x]
    return x


def _str(x):
    """A scalar field as the template prints it, except that None (JSON null) is "", not "None"."""
    return "" if x is None else str(x)


def is_media(part) -> bool:
    """Whether a content part is an image or a video (OpenAI `image_url`, the templates' `image`,
    K2.5's `video`/`video_url`): markup no K2 text model can see."""
    return isinstance(part, dict) and (part.get("type") in ("image", "image_url", "video", "video_url")
                                       or "image" in part or "image_url" in part)


def is_image(part) -> bool:
    """Whether K2 Thinking's and Instruct's templates render a content part as an image."""
    return isinstance(part, dict) and (part.get("type") == "image" or "image" in part or "image_url" in part)


@dataclass(frozen=True)
class Dialect:
    """How one released Kimi chat template renders: they share the markup and differ in a few
    choices. Each field says what its template does (the templates themselves are the oracle in
    tests/test_templates.py)."""
    name: str
    mode: str                 # "thinking" | "instruct" | "hybrid" (a `thinking` switch, on by default)
    default_system: str       # "" none | "always" (also for no messages) | "first\n" (then a newline)
    think_tags: bool          # assistant turns carry <think>reasoning</think>
    media_begin: str          # the image markup's first token
    images_by_type_only: bool  # only parts typed image/image_url are images (K2.6)


KIMI_K2_THINKING = Dialect("kimi-k2-thinking", "thinking", "always", True, "<|media_start|>", False)
KIMI_K2_INSTRUCT = Dialect("kimi-k2-instruct", "instruct", "first\n", False, "<|media_start|>", False)
# K2.6 (and K2.5, whose released renderings it reproduces): no default system prompt, the
# generation prompt opens `<think>` (`<think></think>` with thinking=False), preserve_thinking
# keeps every turn's reasoning, tools_ts_str replaces the tools JSON, video parts.
KIMI_K2_6 = Dialect("kimi-k2.6", "hybrid", "", True, "<|media_begin|>", True)
DIALECTS = {d.name: d for d in (KIMI_K2_THINKING, KIMI_K2_INSTRUCT, KIMI_K2_6)}


def _content_parts(msg, where, dialect=KIMI_K2_THINKING):
    """(is_markup, text) parts of a message's content: a string, None, or a list of parts."""
    c = msg.get("content")
    if c is None:
        return []
    if isinstance(c, str):
        return [(False, c)]
    if not isinstance(c, list):
        raise ValueError(f"{where}: content must be a string, a list of parts or None, "
                         f"not {type(c).__name__}")
    out = []
    for j, part in enumerate(c):
        if not isinstance(part, dict):
            raise ValueError(f"{where}: content[{j}] must be a dict, not {type(part).__name__}")
        kind = part.get("type")
        if kind in ("image", "image_url") if dialect.images_by_type_only else is_image(part):
            out += [(True, dialect.media_begin)] + [(True, m) for m in IMAGE_MARKUP[1:]]
            # The released templates leave a newline after each image (jinja whitespace rules).
            out.append((False, "\n"))
        elif dialect.images_by_type_only and kind in ("video", "video_url"):
            out += [(True, VIDEO_MARKUP), (False, "\n")]
        elif isinstance(part.get("text"), str):
            out.append((False, part["text"]))
        else:
            # The template would print nothing (or "None") here; a dropped part is a client bug.
            raise ValueError(f"{where}: content[{j}] needs a string 'text' or an image "
                             f"(type {kind!r})")
    return out


def _tool_calls_parts(msg, where):
    calls = msg.get("tool_calls")
    if not isinstance(calls, list):
        raise ValueError(f"{where}: tool_calls must be a list, not {type(calls).__name__}")
    out = [(True, "<|tool_calls_section_begin|>")]
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict):
            raise ValueError(f"{where}: tool_calls[{j}] needs a 'function' dict")
        if "arguments" not in fn:  # the template fails on it (tojson of an undefined value)
            raise ValueError(f"{where}: tool_calls[{j}].function has no 'arguments'")
        args = fn["arguments"]
        # String arguments are verbatim (OpenAI clients send JSON strings); others like jinja tojson.
        args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
        # The id is rendered verbatim: the model counts calls across the conversation by it.
        out += [(True, "<|tool_call_begin|>"), (False, _str(call.get("id"))),
                (True, "<|tool_call_argument_begin|>"), (False, args), (True, "<|tool_call_end|>")]
    return out + [(True, "<|tool_calls_section_end|>")]


def _reasoning(msg, where, dialect=KIMI_K2_THINKING):
    """The reasoning to keep in a suffix assistant turn: the first of REASONING_FIELDS not None
    (K2.6's template reads `reasoning` before `reasoning_content`)."""
    fields = ("reasoning",) + REASONING_FIELDS if dialect is KIMI_K2_6 else REASONING_FIELDS
    rc = next((msg[k] for k in fields if msg.get(k) is not None), "")
    if not isinstance(rc, str):
        raise ValueError(f"{where}: reasoning_content must be a string or None, not {type(rc).__name__}")
    return rc


def check_messages(messages, tools=None):
    """The shape every renderer needs: a list of dicts with a role, tools a list of dicts."""
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of dicts, not {type(messages).__name__}")
    if tools is not None and not (isinstance(tools, (list, tuple))
                                  and all(isinstance(t, dict) for t in tools)):
        raise ValueError("tools must be a list of dicts (OpenAI tool schemas)")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be a dict, not {type(m).__name__}")
        if not isinstance(m.get("role"), str) or not m["role"]:
            raise ValueError(f"messages[{i}]: 'role' must be a non-empty string, not {m.get('role')!r}")


def render_parts(messages, tools=None, add_generation_prompt=True, dialect=KIMI_K2_THINKING,
                 thinking=None, preserve_thinking=False, tools_ts_str=None, **_ignored):
    """The prompt as (is_markup, text) pieces; "".join of the texts is the template output.

    The keywords after `dialect` are template variables (transformers' chat_template_kwargs);
    like jinja, a template ignores the ones it does not read. Only K2.6's reads them:
    thinking=False closes the think block of the generation prompt and drops the reasoning of
    the current turn; preserve_thinking=True keeps the reasoning of every earlier turn;
    tools_ts_str is the tool declaration when the tools cannot be written as TypeScript (as
    K2.6's tokenizer does, they are, see tool_declaration.py).
    """
    check_messages(messages, tools)
    switch = dialect.mode == "hybrid"
    # Earlier reasoning is dropped: everything up to the last assistant turn without tool calls is
    # history; reasoning after it is kept because it belongs to the tool loop still in progress.
    last = max((i for i, m in enumerate(messages)
                if m["role"] == "assistant" and not m.get("tool_calls")), default=-1)
    if switch and preserve_thinking:
        last = -1
    # `thinking is false` in jinja: only the boolean False switches it off
    no_thinking = switch and thinking is False
    P = []
    if tools:
        tools_text = _tools_typescript(tools, tools_ts_str) if switch else None
        if not tools_text:
            tools_text = json.dumps(_sort_keys(tools), separators=(",", ":"), ensure_ascii=False)
        P += [(True, "<|im_system|>"), (False, "tool_declare"), (True, "<|im_middle|>"),
              (False, tools_text), (True, "<|im_end|>")]
    first_not_system = not messages or messages[0]["role"] != "system"
    if dialect.default_system == "always" and first_not_system:
        P += [(True, "<|im_system|>"), (False, "system"), (True, "<|im_middle|>"),
              (False, DEFAULT_SYSTEM), (True, "<|im_end|>")]
    elif dialect.default_system == "first\n" and messages and first_not_system:
        P += [(True, "<|im_system|>"), (False, "system"), (True, "<|im_middle|>"),
              (False, DEFAULT_SYSTEM), (True, "<|im_end|>"), (False, "\n")]
    for i, m in enumerate(messages):
        where, role = f"messages[{i}]", m["role"]
        header = {"user": "<|im_user|>", "assistant": "<|im_assistant|>"}.get(role, "<|im_system|>")
        # A `name` replaces the role label (a tool result named get_weather shows that name).
        P += [(True, header), (False, str(m.get("name") or role)), (True, "<|im_middle|>")]
        if role == "assistant":
            if dialect.think_tags:
                keep = i > last and not (no_thinking and not preserve_thinking)
                P += [(True, "<think>"), (False, _reasoning(m, where, dialect) if keep else ""),
                      (True, "</think>")]
            P += _content_parts(m, where, dialect)
            if m.get("tool_calls"):
                P += _tool_calls_parts(m, where)
        elif role == "tool":
            P.append((False, f"## Return of {_str(m.get('tool_call_id'))}\n"))
            P += _content_parts(m, where, dialect)
        else:
            P += _content_parts(m, where, dialect)
        P.append((True, "<|im_end|>"))
    if add_generation_prompt:
        # K2 Thinking and Instruct: no `<think>` prefill (K2 Thinking opens its reasoning itself).
        P += [(True, "<|im_assistant|>"), (False, "assistant"), (True, "<|im_middle|>")]
        if switch:
            P += [(True, "<think>")] + ([(True, "</think>")] if no_thinking else [])
    return [(mk, t) for mk, t in P if t]


def _tools_typescript(tools, given=None):
    """K2.5/K2.6's tool declaration: the released tokenizer writes the (key-sorted) tools as
    TypeScript declarations and passes them as `tools_ts_str`, replacing one given by the caller;
    when they cannot be written that way the template falls back to the given one, else JSON."""
    from .tool_declaration import to_typescript
    try:
        return to_typescript(_sort_keys(tools))
    except Exception:   # any schema the converter cannot express: as the tokenizer, fall back
        return _str(given)


def opens_in_reasoning(dialect, thinking=None, **_ignored) -> bool:
    """Whether the answer to a generation prompt starts in reasoning (before any `</think>`):
    K2 Thinking opens it itself, K2.6's prompt opens it unless thinking=False, Instruct never."""
    return dialect.mode == "thinking" or (dialect.mode == "hybrid" and thinking is not False)


# --- parsing ---------------------------------------------------------------------------------
# Kimi's control-token names as they read in decoded text. The singular `<|tool_call_section_*|>`
# are not tokens, but vLLM accepts them, so we do. `<|reserved_token_N|>` is matched by _RESERVED.
CONTROL_NAMES = (
    "<think>", "</think>", "<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|im_system|>",
    "<|im_middle|>", "<|start_header_id|>", "<|end_header_id|>", "<|tool_calls_section_begin|>",
    "<|tool_calls_section_end|>", "<|tool_call_section_begin|>", "<|tool_call_section_end|>",
    "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>", "<|media_begin|>",
    "<|media_content|>", "<|media_end|>", "<|media_pad|>", "[BOS]", "[EOS]", "[EOT]", "[UNK]", "[PAD]")
_RESERVED = r"<\|reserved_token_\d+\|>"
_RESERVED_CUT = re.compile(r"<\|reserved_token_\d+\|?")  # cut short after its digits


@functools.lru_cache(maxsize=None)
def _marker_regex(names, reserved):
    """A regex for the markers to find in text (None: there are none)."""
    alts = [re.escape(n) for n in names] + ([_RESERVED] if reserved else [])
    return re.compile("|".join(alts)) if alts else None


_END = {"<|im_end|>", "[EOS]", "[EOT]"}
_SECTION_BEGIN = {"<|tool_calls_section_begin|>", "<|tool_call_section_begin|>"}  # vLLM accepts both
_SECTION_END = {"<|tool_calls_section_end|>", "<|tool_call_section_end|>"}
_CALL_ID = re.compile(r"(?:functions\.)?(.+):\d+")


def _make_call(call_id, args, error=None):
    """An OpenAI-shaped tool call from the raw id and argument text."""
    call_id, args = call_id.strip(), args.strip()
    m = _CALL_ID.fullmatch(call_id)
    name = m.group(1) if m else call_id
    if not m and error is None:
        error = f"tool call id {call_id!r} is not of the form functions.NAME:INDEX"
    if error is None:
        try:
            json.loads(args)
        except ValueError as e:
            error = f"arguments are not valid JSON: {e}"
    call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}
    if error:
        call["error"] = error
    return call


class StreamParser:
    """Incremental parser of one assistant message; see the module docstring for the deltas.

    thinking=True (K2 Thinking): text is reasoning until `</think>` or a tool-call section, with
    or without a leading `<think>`, since the prompt does not prefill it and it can be lost.
    thinking=False (models that answer directly): text is content unless it opens with `<think>`.

    Fed text (`feed_text`), every Kimi control name in it is a marker: text cannot tell the
    special id of `[EOS]` from the three plain tokens that spell it. Fed ids (`feed_token`), a
    special id is the marker and plain text stays text, except for the names this vocabulary has
    no id for (`<think>` in the original K2 config; the singular section markers).
    """

    def __init__(self, tokenizer=None, thinking=True):
        self.tokenizer = tokenizer
        self._decoder = tokenizer.stream_decoder() if tokenizer is not None else None
        # (names, reserved names too, regex): fed text every control name is a marker; fed ids
        # only the names without an id of their own (a special id is its own marker)
        self._text_markers = (CONTROL_NAMES, True, _marker_regex(CONTROL_NAMES, True))
        if tokenizer is not None:
            names = tuple(n for n in CONTROL_NAMES if n not in tokenizer.special_tokens)
            self._id_markers = (names, False, _marker_regex(names, False))
        self._names, self._reserved, self._markers = self._text_markers
        self._pending = ""      # text held back because it may be the start of a marker
        self._stray = ""        # text inside a tool-call section but outside any call
        self._mode = "reasoning" if thinking else "content"
        self._started = False   # anything seen yet (a late `<think>` does not reopen reasoning)
        self._call_id = self._call_args = None  # raw text of the tool call being read
        self.reasoning_content, self.content, self.tool_calls = "", "", []

    def result(self):
        """The message so far, in parse_assistant's shape."""
        return {"reasoning_content": self.reasoning_content, "content": self.content,
                "tool_calls": list(self.tool_calls)}

    def feed_token(self, token_id):
        """Feed one generated token id; special ids are whole markers, text waits for full UTF-8."""
        if self._decoder is None:
            raise ValueError("feed_token needs StreamParser(tokenizer)")
        if not self.tokenizer.is_special(token_id):
            return self._feed(self._decoder.feed(token_id), self._id_markers)
        # The text before a special id is complete: a cut UTF-8 char or a held `<|` stays text.
        out = self._feed(self._decoder.flush(), self._id_markers)
        if self._mode != "done":
            self._text(self._pending, out)
            self._pending = ""
            self._marker(self.tokenizer.special_names[token_id], out)
        return out

    def feed_text(self, text):
        """Feed the next piece of decoded text; returns the deltas it completes."""
        return self._feed(text, self._text_markers)

    def _feed(self, text, markers):
        self._names, self._reserved, self._markers = markers
        out = []
        buf = self._pending + text
        while buf and self._mode != "done" and self._markers is not None:
            m = self._markers.search(buf)
            if m is None:
                break
            self._text(buf[:m.start()], out)
            self._marker(m.group(), out)
            buf = buf[m.end():]
        if self._mode == "done":
            self._pending = ""
            return out
        # Hold back the earliest suffix that could still grow into a marker.
        hold = len(buf)
        for i in range(max(0, len(buf) - 48), len(buf)):
            if buf[i] in "<[" and self._could_be_marker(buf[i:]):
                hold = i
                break
        self._text(buf[:hold], out)
        self._pending = buf[hold:]
        return out

    def finish(self):
        """End of the stream: flush held-back text and any unterminated tool call."""
        out = []
        if self._decoder is not None:
            out += self._feed(self._decoder.flush(), self._id_markers)
        if self._mode != "done":
            self._text(self._pending, out)  # a lone `<` or `[` at the very end is plain text
        self._pending = ""
        self._flush_stray(out)
        self._close_call("tool call was cut off before <|tool_call_end|>", out)
        self._mode = "done"
        return out

    def _could_be_marker(self, tail):
        """Is `tail` (the end of the text so far) the start of a marker cut short?"""
        return (any(n.startswith(tail) for n in self._names)
                or self._reserved and ("<|reserved_token_".startswith(tail)
                                       or _RESERVED_CUT.fullmatch(tail) is not None))

    # --- state machine -------------------------------------------------------------------
    def _text(self, s, out):
        if not s:
            return
        self._started = True
        mode = self._mode
        if mode in ("reasoning", "content"):
            self._emit(mode, s, out)
        elif mode == "call_id":
            self._call_id += s
        elif mode == "call_args":
            self._call_args += s
        else:  # "section": between calls; decided at the next marker
            self._stray += s

    def _emit(self, mode, s, out):
        if mode == "reasoning":
            key, self.reasoning_content = "reasoning_content", self.reasoning_content + s
        else:
            key, self.content = "content", self.content + s
        if out and key in out[-1]:
            out[-1] = {key: out[-1][key] + s}  # one delta per stream per feed call
        else:
            out.append({key: s})

    def _flush_stray(self, out):
        """Whitespace between calls is dropped; any other text in a section is kept, as content."""
        s, self._stray = self._stray, ""
        if s.strip():
            self._emit("content", s, out)

    def _marker(self, mk, out):
        """Act on one control marker; any we do not know (`<|im_middle|>`, reserved) is dropped."""
        self._flush_stray(out)
        mode = self._mode
        if mk in _END:
            self._close_call("tool call was cut off before <|tool_call_end|>", out)
            self._mode = "done"
        elif mk == "<think>":
            if not self._started:
                self._mode = "reasoning"
        elif mk == "</think>":
            if mode == "reasoning":
                self._mode = "content"
        elif mk in _SECTION_BEGIN:
            # Reasoning ends at the tool-call section even without `</think>` (vLLM #32216).
            self._close_call("tool call was cut off before <|tool_call_end|>", out)
            self._mode = "section"
        elif mk in _SECTION_END:
            self._close_call("tool call was cut off before <|tool_call_end|>", out)
            self._mode = "content"
        elif mk == "<|tool_call_begin|>":
            # A call without its section marker is still a call, never reasoning or content.
            self._close_call("tool call was cut off before <|tool_call_end|>", out)
            self._call_id, self._call_args, self._mode = "", None, "call_id"
        elif mk == "<|tool_call_argument_begin|>":
            if mode == "call_id":
                self._call_args, self._mode = "", "call_args"
        elif mk == "<|tool_call_end|>":
            if mode in ("call_id", "call_args"):
                self._close_call(None, out)
                self._mode = "section"
        self._started = True

    def _close_call(self, error, out):
        """Emit the tool call being read, if any; `error` flags an abnormal end."""
        if self._call_id is None:
            return
        if self._call_args is None:
            args, error = "", error or "tool call has no <|tool_call_argument_begin|>"
        else:
            args = self._call_args
        call = _make_call(self._call_id, args, error)
        self._call_id = self._call_args = None
        self.tool_calls.append(call)
        out.append({"tool_call": call, "index": len(self.tool_calls) - 1})


def parse_assistant(text, thinking=True):
    """Split a whole assistant message into reasoning_content, content and tool_calls."""
    p = StreamParser(thinking=thinking)
    p.feed_text(text)
    p.finish()
    return p.result()
