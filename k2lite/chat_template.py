"""A checkpoint's chat template: which one it is, and how it is rendered.

The checkpoint decides. Released Kimi chat checkpoints carry their template (`chat_template.jinja`,
else `chat_template` in `tokenizer_config.json`); a folder with none is a base model, prompted
raw. k2lite renders the three Kimi templates it knows (`chat.DIALECTS`: K2 Thinking, K2 Instruct,
K2.5/K2.6) in Python, keeping template markup and message content apart so that content is
always encoded as plain text (a user cannot forge a turn or a tool call).

Recognising a template, in this order:
1. its fingerprint: the sha256 of the text with line endings, trailing spaces, blank lines and
   `{# comments #}` normalised away (none of which changes what it renders). A template re-saved
   with other line endings or with its comments edited is still the same template;
2. else, when jinja2 is installed, its behaviour: it is rendered on PROBES (conversations with
   tools, tool calls and results, reasoning, list contents, no system prompt, each `thinking`
   setting) and compared with each known dialect. A template that renders all of them exactly as
   a dialect does is that dialect (a copy with reformatted tags, or a revision that only moved
   whitespace jinja strips). Without jinja2, a template equal to a known one but for whitespace
   (LOOSE_FINGERPRINTS) is taken for it, with a warning, since it cannot be checked;
3. else it is rendered with jinja2 as transformers renders it (sandboxed, trim_blocks,
   lstrip_blocks, loopcontrols, its `tojson`, `raise_exception`, the special-token names), with
   a warning: the rendered string is then encoded with special names recognised, so markup and
   content are no longer separated. Without jinja2, rendering it is a one-line error that says
   how to get it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import warnings

from . import chat
from .errors import ModelFormatError

# fingerprint(text) of each released template (the files under tests/data/templates/, and
# models/kimi-k2-thinking/chat_template.jinja; test_templates checks these stay in step).
FINGERPRINTS = {
    "f3a7a979545d4595": "kimi-k2-thinking",
    "44c73c89d00c440c": "kimi-k2-instruct",
    "006db05e0995b0aa": "kimi-k2.6",
}
# the same with every whitespace character removed: a re-indented copy
LOOSE_FINGERPRINTS = {
    "7783f6a2d617d910": "kimi-k2-thinking",
    "452a1e6d75c0be23": "kimi-k2-instruct",
    "e4c1aa751a52275f": "kimi-k2.6",
}
_COMMENT = re.compile(r"\{#.*?#\}", re.S)


def fingerprint(text: str, loose: bool = False) -> str:
    """16 hex digits identifying a template up to formatting that cannot change its output
    (loose: up to all whitespace, which might)."""
    text = _COMMENT.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    if loose:
        norm = re.sub(r"\s+", "", text)
    else:
        lines = [line.rstrip() for line in text.split("\n")]
        norm = "\n".join(line for line in lines if line)
    return hashlib.sha256(norm.encode("utf-8")).hexdigest()[:16]


def _probes():
    """(messages, tools, add_generation_prompt, template kwargs) telling the dialects apart."""
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
              "parameters": {"type": "object", "required": ["city"],
                             "properties": {"city": {"type": "string"}}}}}]
    call = {"id": "functions.get_weather:0", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    loop = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "reasoning_content": "Need the tool.", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "Sunny, 21 C"}]
    history = [{"role": "system", "content": "Be brief."},
               {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
               {"role": "assistant", "content": "Hello!", "reasoning_content": "Greet back."},
               {"role": "user", "content": "Bye", "name": "bob"}]
    out = []
    for kw in ({}, {"thinking": False}, {"preserve_thinking": True}):
        out += [([{"role": "user", "content": "Hello"}], None, True, kw),
                (loop, tools, True, kw),
                (history, None, True, kw),
                (history + [{"role": "assistant", "content": "Bye!", "reasoning_content": "End."}], None, False, kw)]
    return out


class ChatTemplate:
    """One chat template: a known Kimi dialect rendered in Python, or jinja text (`dialect` None)."""

    def __init__(self, source: str, text: str | None = None, dialect: chat.Dialect | None = None,
                 special: dict | None = None):
        self.source, self.text, self.dialect = source, text, dialect
        self.special = special or {}           # bos_token, eos_token, ... for jinja templates
        self._mode = None

    # --- what it is --------------------------------------------------------------------
    @property
    def name(self) -> str:
        """The known template's name (`kimi-k2-thinking`, ...) or "custom"."""
        return self.dialect.name if self.dialect else "custom"

    @property
    def recognised(self) -> bool:
        return self.dialect is not None

    @property
    def mode(self) -> str:
        """"thinking" (answers open in reasoning), "instruct" (answer directly), "hybrid" (a
        `thinking` switch, on by default). An unknown template is judged by its generation prompt."""
        if self.dialect is not None:
            return self.dialect.mode
        if self._mode is None:
            try:
                text = self.render([{"role": "user", "content": "Hi"}])
                self._mode = "thinking" if _opens_think(text) else "instruct"
            except Exception:   # a template that needs other input: say nothing more
                self._mode = "chat"
        return self._mode

    def describe(self) -> str:
        how = "recognised" if self.recognised else "not recognised: rendered with jinja2"
        return f"{self.name} chat template ({how}), {self.mode} mode"

    # --- rendering -----------------------------------------------------------------------
    def render_parts(self, messages, tools=None, add_generation_prompt=True, **kwargs):
        """(is_markup, text) pieces for a known dialect; one (None, text) piece for jinja."""
        if self.dialect is not None:
            return chat.render_parts(messages, tools, add_generation_prompt, self.dialect, **kwargs)
        chat.check_messages(messages, tools)
        return [(None, self._render_jinja(messages, tools, add_generation_prompt, kwargs))]

    def render(self, messages, tools=None, add_generation_prompt=True, **kwargs) -> str:
        return "".join(t for _, t in self.render_parts(messages, tools, add_generation_prompt, **kwargs))

    def opens_in_reasoning(self, prompt_text: str | None = None, **kwargs) -> bool:
        """Whether the answer to this generation prompt starts in reasoning: the dialect says
        (K2 Thinking opens it itself); for other templates, whether the prompt leaves `<think>` open."""
        if self.dialect is not None:
            return chat.opens_in_reasoning(self.dialect, **kwargs)
        return _opens_think(prompt_text or "")

    def _render_jinja(self, messages, tools, add_generation_prompt, kwargs) -> str:
        try:
            template = _compile(self.text, self.source)
        except ImportError as e:
            raise ValueError(str(e)) from None
        # transformers fills reasoning_content from the older names before rendering
        msgs = []
        for m in messages:
            rc = next((m[k] for k in chat.REASONING_FIELDS if m.get(k) is not None), None)
            msgs.append(m if rc is None else {"thinking": rc, **m, "reasoning_content": rc})
        kw = {**self.special, **kwargs}
        try:
            return template.render(messages=msgs, tools=tools, add_generation_prompt=add_generation_prompt,
                                   **kw)
        except Exception as e:  # jinja's own errors and raise_exception: a bad request
            raise ValueError(f"chat template {self.source}: {type(e).__name__}: {e}") from None

    # --- loading ---------------------------------------------------------------------------
    @classmethod
    def from_text(cls, text: str, source: str, special: dict | None = None) -> "ChatTemplate":
        name = FINGERPRINTS.get(fingerprint(text))
        if name is None and not _jinja2_missing():
            name = _recognise_by_behaviour(text, source)
        if name is not None:
            return cls(source, text, chat.DIALECTS[name], special)
        if _jinja2_missing():
            name = LOOSE_FINGERPRINTS.get(fingerprint(text, loose=True))
            if name is not None:
                warnings.warn(f"{source}: chat template taken for {name}'s (the same but for whitespace; "
                              "install jinja2 to check it by rendering)", stacklevel=2)
                return cls(source, text, chat.DIALECTS[name], special)
            return cls(source, text, None, special)   # raw prompts work; chat says what is missing
        warnings.warn(f"{source}: chat template not recognised (not Kimi K2 Thinking, K2 Instruct or "
                      "K2.5/K2.6): rendered with jinja2, so message content that spells control "
                      "tokens becomes control tokens", stacklevel=2)
        return cls(source, text, None, special)

    @classmethod
    def from_dir(cls, path: str, special: dict | None = None) -> "ChatTemplate | None":
        """The folder's template: chat_template.jinja, else tokenizer_config.json's
        chat_template (a string, or transformers' list of named templates: "default"). None: a base model."""
        jinja_path = os.path.join(path, "chat_template.jinja")
        if os.path.exists(jinja_path):
            return cls.from_file(jinja_path, special)
        cfg_path = os.path.join(path, "tokenizer_config.json")
        if not os.path.exists(cfg_path):
            return None
        try:
            with open(cfg_path, encoding="utf-8") as f:
                cfg = json.load(f)
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise ModelFormatError(f"{cfg_path}: cannot read ({type(e).__name__}: {e})") from None
        t = cfg.get("chat_template") if isinstance(cfg, dict) else None
        if isinstance(t, list):     # [{"name": "default", "template": "..."}, {"name": "tool_use", ...}]
            named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
            t = named.get("default")
        if t is None:
            return None
        if not isinstance(t, str):
            raise ModelFormatError(f"{cfg_path}: 'chat_template' must be a string or a list of "
                                   "{\"name\", \"template\"} objects")
        return cls.from_text(t, f"{cfg_path}:chat_template", special)

    @classmethod
    def from_file(cls, path: str, special: dict | None = None) -> "ChatTemplate":
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ModelFormatError(f"{path}: cannot read chat template ({type(e).__name__}: {e})") from None
        return cls.from_text(text, path, special)

    @classmethod
    def load(cls, spec: str, special: dict | None = None) -> "ChatTemplate":
        """A template given by the user: a file (jinja, or a JSON tokenizer_config.json), a
        folder holding one, or a built-in name (kimi-k2-thinking, kimi-k2-instruct, kimi-k2.6)."""
        if os.path.isdir(spec):
            t = cls.from_dir(spec, special)
            if t is None:
                raise ValueError(f"{spec}: no chat_template.jinja or tokenizer_config.json chat_template")
            return t
        if os.path.exists(spec):
            if not spec.endswith(".json"):
                return cls.from_file(spec, special)
            t = cls.from_dir(os.path.dirname(os.path.abspath(spec)), special)
            if t is None:
                raise ValueError(f"{spec}: has no 'chat_template'")
            return t
        if spec in chat.DIALECTS:
            return cls(spec, None, chat.DIALECTS[spec], special)
        raise ValueError(f"chat template {spec!r}: no such file, and not a built-in name "
                         f"({', '.join(chat.DIALECTS)})")


def _jinja2_missing() -> bool:
    try:
        import jinja2  # noqa: F401
    except ImportError:
        return True
    return False


def _opens_think(prompt: str) -> bool:
    """The prompt ends inside a think block: its last `<think>` is not closed."""
    i = prompt.rfind("<think>")
    return i >= 0 and prompt.find("</think>", i) < 0


def _recognise_by_behaviour(text: str, source: str):
    """The dialect whose renderings equal the template's on every probe (needs jinja2)."""
    try:
        template = _compile(text, source)
    except (ImportError, ValueError):
        return None
    # rendered as Moonshot's tokenizer calls its templates: tools key-sorted, and (K2.5/K2.6's)
    # their TypeScript declaration in tools_ts_str, which the other templates ignore
    def release_render(m, t, g, kw):
        if t:
            kw = {**kw, "tools_ts_str": chat._tools_typescript(t)}
        return template.render(messages=m, tools=chat._sort_keys(t) if t else t, add_generation_prompt=g, **kw)
    for name, dialect in chat.DIALECTS.items():
        try:
            if all(release_render(m, t, g, kw) == "".join(x for _, x in chat.render_parts(m, t, g, dialect, **kw))
                   for m, t, g, kw in _probes()):
                return name
        except Exception:
            continue
    return None


_COMPILED = {}


def _compile(text: str, source: str):
    """A jinja2 template compiled the way transformers compiles chat templates."""
    if text in _COMPILED:
        return _COMPILED[text]
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ImportError(f"{source}: this chat template is not one k2lite renders itself; rendering "
                          "it needs jinja2 (pip install jinja2)") from None

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def strftime_now(fmt):
        import datetime
        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    try:
        compiled = env.from_string(text)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"{source}: chat template line {e.lineno}: {e.message}") from None
    _COMPILED[text] = compiled
    return compiled
