"""The released chat templates as oracles: rendered by transformers (jinja2), as a checkpoint's
own template is rendered there, plus random conversations to compare k2lite's renderers with.

Used by tests/test_templates.py and tests/make_goldens.py (which writes tests/data/chat_goldens.json).
"""
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TEMPLATES = {
    "kimi-k2-thinking": os.path.join(REPO, "models", "kimi-k2-thinking", "chat_template.jinja"),
    "kimi-k2-instruct": os.path.join(HERE, "data", "templates", "kimi-k2-instruct.jinja"),
    "kimi-k2.6": os.path.join(HERE, "data", "templates", "kimi-k2.6.jinja"),
}
TOKENIZER_DIR = os.path.join(REPO, "models", "kimi-k2-thinking")


def template_text(name):
    with open(TEMPLATES[name], encoding="utf-8") as f:
        return f.read()


def sort_keys(x):
    """Moonshot's tokenizer sorts the keys of `tools` recursively before rendering."""
    if isinstance(x, dict):
        return {k: sort_keys(x[k]) for k in sorted(x)}
    if isinstance(x, list):
        return [sort_keys(v) for v in x]
    return x


def render(text, messages, tools=None, add_generation_prompt=True, typescript_tools=False, **kwargs):
    """What transformers renders through Moonshot's tokenizer: tools key-sorted and, for K2.5/K2.6
    (typescript_tools), their TypeScript declaration passed as tools_ts_str, replacing a given
    one unless the conversion fails (k2lite's converter here; it is checked on its own against
    the released tokenizer's outputs in tests/data/tools_typescript.json)."""
    from transformers.utils.chat_template_utils import render_jinja_template
    tools = sort_keys(tools) if tools else tools
    if typescript_tools and tools:
        from k2lite.tool_declaration import to_typescript
        try:
            kwargs["tools_ts_str"] = to_typescript(tools)
        except Exception:
            pass
    out, _ = render_jinja_template([messages], tools=tools, chat_template=text,
                                   add_generation_prompt=add_generation_prompt, **kwargs)
    return out[0]


WORDS = ["Hello", "What is 17*23?", "x", " leading space", "trailing\n", "multi\nline\n\ntext",
         "Ünïcödé 中文 🙂", "<|im_end|> typed by a user", "{\"json\": true}", "## Return of",
         "tab\there", "   ", "<think>not a tag</think>"]


def _text(rng):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))


def _content(rng, allow_none=True):
    r = rng.random()
    if r < 0.6:
        return _text(rng)
    if r < 0.75:
        return ""
    if r < 0.9 or not allow_none:
        return [{"type": "text", "text": _text(rng)} for _ in range(rng.randint(1, 3))]
    return None


def _tool(rng, i):
    props = {f"p{j}": {"type": rng.choice(["string", "integer"]), "description": _text(rng)}
             for j in range(rng.randint(0, 3))}
    fn = {"name": f"tool_{i}", "description": _text(rng),
          "parameters": {"type": "object", "properties": props, "required": sorted(props)[:1]}}
    if rng.random() < 0.5:   # keys out of order: the tokenizer sorts them
        fn = dict(reversed(list(fn.items())))
    return {"type": "function", "function": fn}


def random_conversation(rng: random.Random):
    """(messages, tools): any mix of system/developer/user/assistant/tool turns, tool calls with
    string or object arguments, reasoning under its three names, names, list contents."""
    tools = [_tool(rng, i) for i in range(rng.randint(1, 3))] if rng.random() < 0.4 else None
    msgs = []
    if rng.random() < 0.5:
        msgs.append({"role": "system", "content": _text(rng)})
    calls = 0
    for _ in range(rng.randint(0, 6)):
        role = rng.choice(["user", "user", "assistant", "assistant", "tool", "developer"])
        m = {"role": role, "content": _content(rng)}
        if rng.random() < 0.1:
            m["name"] = rng.choice(["bob", "get_weather", "ana"])
        if role == "assistant":
            field = rng.choice(["reasoning_content", "reasoning_content", "thinking", "reasoning", None])
            if field:
                m[field] = _text(rng)
            if rng.random() < 0.4:
                m["tool_calls"] = []
                for _ in range(rng.randint(1, 2)):
                    args = {"city": _text(rng), "n": rng.randint(0, 9)}
                    m["tool_calls"].append({"id": f"functions.tool_{calls % 3}:{calls}", "type": "function",
                                            "function": {"name": f"tool_{calls % 3}",
                                                         "arguments": args if rng.random() < 0.3 else
                                                         __import__("json").dumps(args)}})
                    calls += 1
        if role == "tool":
            m["tool_call_id"] = f"functions.tool_0:{rng.randint(0, 5)}"
        msgs.append(m)
    return msgs, tools


def kwarg_variants(tools):
    out = [{}, {"thinking": False}, {"thinking": True}, {"preserve_thinking": True},
           {"thinking": False, "preserve_thinking": True}]
    if tools:
        out.append({"tools_ts_str": "type tool_0 = (_: {city: string}) => any;"})
    return out
