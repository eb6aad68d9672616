"""Write tests/data/chat_goldens.json: conversations rendered by each released Kimi chat template
(jinja2 through transformers, the way a checkpoint's own template is rendered there, with the
tools prepared as Moonshot's tokenizer prepares them) and their token ids. The templates are the oracle; rerun after adding a case or a template:

    python tests/make_goldens.py
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.template_oracle import HERE, TEMPLATES, TOKENIZER_DIR, render, template_text  # noqa: E402

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "required": ["city"],
                   "properties": {"unit": {"type": "string", "enum": ["c", "f"]}, "city": {"type": "string"}}}}}
CALL = {"id": "functions.get_weather:0", "type": "function",
        "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}
CASES = {
    "user_only": ([{"role": "user", "content": "Hello! Who are you?"}], None),
    "system_and_multiturn_with_reasoning": ([
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "Add them."},
        {"role": "user", "content": "and 3+3?"}], None),
    "tool_declaration_call_and_result": ([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "reasoning_content": "I should call the tool.", "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "{\"temp\": 21}"}], [WEATHER]),
    "tool_loop_finished_then_new_question": ([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Checking.", "reasoning_content": "call it", "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny.", "reasoning_content": "report"},
        {"role": "user", "content": "Thanks! And Rome?"}], [WEATHER]),
    "content_as_list_of_parts_and_names": ([
        {"role": "system", "content": [{"type": "text", "text": "Rules: "}, {"type": "text", "text": "be kind"}]},
        {"role": "user", "name": "alice", "content": [{"type": "text", "text": "Line one\n"},
                                                      {"type": "text", "text": "line two"}]}], None),
    "object_arguments_and_unicode": ([
        {"role": "user", "content": "Météo à Zürich? 天气"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "functions.get_weather:0", "type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "Zürich", "unit": "c"}}}]},
        {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "12°C"}], [WEATHER]),
    "developer_role": ([{"role": "developer", "content": "Answer in French."},
                        {"role": "user", "content": "Hi"}], None),
}
KWARGS = {"kimi-k2.6": [{}, {"thinking": False}, {"preserve_thinking": True}]}


def main():
    from k2lite.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(TOKENIZER_DIR)
    out = []
    for name in TEMPLATES:
        text = template_text(name)
        for case, (messages, tools) in CASES.items():
            for kw in KWARGS.get(name, [{}]):
                for gen in (True, False) if case == "user_only" else (True,):
                    rendered = render(text, messages, tools, gen, typescript_tools=name == "kimi-k2.6", **kw)
                    out.append({"template": name, "case": case, "template_kwargs": kw,
                                "add_generation_prompt": gen, "messages": messages, "tools": tools,
                                "rendered": rendered, "token_ids": tok.encode(rendered)})
    path = os.path.join(HERE, "data", "chat_goldens.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {len(out)} renderings to {path}")


if __name__ == "__main__":
    main()
