"""An Ollama Modelfile next to the GGUF: FROM, TEMPLATE (Ollama's Go template), PARAMETER stop, SYSTEM.

Only ChatML-style chat templates are translated, and only after checking that the tokenizer's Jinja
template renders a set of probe conversations exactly as ChatML would (with the template's default system
prompt, if it injects one). Anything else is refused rather than guessed: a wrong template is the usual
reason an exported model answers gibberish. Ollama puts a Modelfile's SYSTEM text in front of a
conversation that has no system message, which is how a template's default system prompt is kept.

    text = modelfile(tokenizer, stops, "model-q8_0.gguf", system=run_system_prompt)
"""

from __future__ import annotations

import re

from hone.data.template import ensure_chat_template
from hone.export.chat import ExportError

START, END = "<|im_start|>", "<|im_end|>"
# The ChatML template from Ollama's template documentation, for Ollama's /api/chat message list.
CHATML_GO_TEMPLATE = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n")
PROBES = [
    ([("user", "Hello there")], True),
    ([("system", "Be brief."), ("user", "Hi")], True),
    ([("system", "S"), ("user", "a"), ("assistant", "b"), ("user", "c")], True),
    ([("user", "a"), ("assistant", "b"), ("user", "c")], True),
    ([("user", "a"), ("assistant", "b")], False),
]


def chatml(messages: list[tuple[str, str]], add_generation_prompt: bool, default_system: str | None) -> str:
    """What the Go template above renders, after Ollama adds SYSTEM to a conversation without one."""
    if default_system is not None and messages and messages[0][0] != "system":
        messages = [("system", default_system), *messages]
    text = "".join(f"{START}{role}\n{content}{END}\n" for role, content in messages)
    return text + (f"{START}assistant\n" if add_generation_prompt else "")


def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in messages], tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def template_default_system(tokenizer) -> str | None:
    """The system prompt a ChatML template adds when a conversation has none, or None."""
    text = _render(tokenizer, [("user", "Hello there")], True)
    head = f"{START}system\n"
    if not text.startswith(head) or END not in text:
        return None
    return text[len(head):text.index(END)]


def check_chatml(tokenizer) -> str | None:
    """Raise ExportError unless the chat template is ChatML; return its default system prompt."""
    ensure_chat_template(tokenizer)
    default = template_default_system(tokenizer)
    for messages, gen in PROBES:
        want = _render(tokenizer, messages, gen)
        if chatml(messages, gen, default) != want:
            raise ExportError(
                "the chat template is not ChatML-style (it renders a probe conversation as "
                f"{want[:120]!r}), and hone translates only ChatML templates to Ollama's Go template rather "
                "than guess. Use --format gguf (the GGUF carries the Jinja template, which recent Ollama and "
                "llama.cpp read) and write the Modelfile TEMPLATE yourself")
    return default


def _quoted(text: str, what: str) -> str:
    if '"""' in text:
        raise ExportError(f"the {what} contains three double quotes, which a Modelfile cannot hold")
    return f'"""{text}"""'


def modelfile(tokenizer, stops: list[int], gguf_name: str, system: str | None = None) -> str:
    """The Modelfile text. `system` is the run's own system prompt; without one the template's default
    system prompt (if it has one) is kept as SYSTEM, so Ollama renders what transformers renders."""
    default = check_chatml(tokenizer)
    system = system if system is not None else default
    lines = [f"FROM ./{gguf_name}", f"TEMPLATE {_quoted(CHATML_GO_TEMPLATE, 'template')}"]
    seen = []
    for token in tokenizer.convert_ids_to_tokens(stops):
        if token and token not in seen:
            seen.append(token)
            lines.append(f'PARAMETER stop "{token}"')
    if system is not None:
        lines.append(f"SYSTEM {_quoted(system, 'system prompt')}")
    return "\n".join(lines) + "\n"


def translation_check(tokenizer, prompts, system: str | None) -> dict:
    """The Go template (as `chatml` renders it) against the Jinja template, on every parity prompt: the text
    Ollama would feed the model must be the text transformers feeds it for the same conversation (with the
    Modelfile's SYSTEM made explicit where Ollama would add it)."""
    default = check_chatml(tokenizer)
    system = system if system is not None else default
    same = 0
    for messages in prompts:
        pairs = [(m.role, m.content) for m in messages]
        if system is not None and pairs[0][0] != "system":
            pairs = [("system", system), *pairs]
        same += chatml(pairs, True, None) == _render(tokenizer, pairs, True)
    return {"identical": same, "of": len(prompts), "system": system}


def parse_modelfile(text: str) -> dict:
    """FROM, TEMPLATE, SYSTEM and the stop parameters of a Modelfile (the instructions hone writes)."""
    found: dict = {"from": None, "template": None, "system": None, "stops": []}
    pattern = re.compile(r'^(FROM|TEMPLATE|SYSTEM|PARAMETER)\s+(?:"""(.*?)"""|(.*?))\s*$', re.S | re.M)
    for kind, quoted, plain in pattern.findall(text):
        value = quoted if quoted else plain
        if kind == "PARAMETER":
            key, _, arg = value.partition(" ")
            if key == "stop":
                found["stops"].append(arg.strip().strip('"'))
        else:
            found[kind.lower()] = value
    return found


def check_modelfile(text: str | None, tokenizer, stops: list[int], gguf_name: str, system: str | None) -> list[str]:
    """Why this Modelfile would not run the GGUF as transformers does ([] when it would)."""
    if text is None:
        return ["ollama: no Modelfile in the export"]
    default = check_chatml(tokenizer)
    want_system = system if system is not None else default
    got = parse_modelfile(text)
    problems = []
    if got["from"] != f"./{gguf_name}":
        problems.append(f"ollama: Modelfile FROM is {got['from']!r}, not ./{gguf_name}")
    if got["template"] != CHATML_GO_TEMPLATE:
        problems.append("ollama: Modelfile TEMPLATE is not the ChatML template the GGUF's chat template needs")
    missing = [t for t in tokenizer.convert_ids_to_tokens(stops) if t not in got["stops"]]
    if missing:
        problems.append(f"ollama: Modelfile has no PARAMETER stop for {missing}")
    if got["system"] != want_system:
        problems.append(f"ollama: Modelfile SYSTEM is {got['system']!r}, expected {want_system!r}")
    return problems
