"""Chat templates: a conversation rendered to prompt text the way the model
was trained, with the Jinja template stored in the GGUF
(`tokenizer.chat_template`) or a built-in one.

Templates run in Jinja2's immutable sandbox with the settings Hugging Face
uses (trim_blocks, lstrip_blocks, loop controls, raise_exception), since a
GGUF's template is untrusted input.
"""
import datetime

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import KVCellsError

_ALTERNATE = ("{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}"
              "{{ raise_exception('roles must alternate user/assistant after an optional system message') }}"
              "{% endif %}")

# Gemma folds a system message into the first user turn and calls the
# assistant "model".
GEMMA = (
    "{{ bos_token }}"
    "{% if messages and messages[0].role == 'system' %}"
    "{% set system = messages[0].content | trim ~ '\n\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}" + _ALTERNATE +
    "{{ '<start_of_turn>' ~ ('model' if m.role == 'assistant' else 'user') ~ '\n' }}"
    "{{ (system if loop.first else '') ~ (m.content | trim) ~ '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

CHATML = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' ~ m.role ~ '\n' ~ m.content ~ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA3 = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{{ '<|start_header_id|>' ~ m.role ~ '<|end_header_id|>\n\n' ~ (m.content | trim) ~ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

BUILTIN = {"gemma": GEMMA, "chatml": CHATML, "llama3": LLAMA3}
ARCH_DEFAULT = {"gemma3": "gemma"}


class ChatTemplateError(KVCellsError, ValueError):
    """A template that does not parse or refuses the conversation, or a
    model with no template at all."""


def _raise(message):
    raise ChatTemplateError(message)


def _strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)


class ChatTemplate:
    def __init__(self, source, name, bos_token="", eos_token=""):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.globals.update(raise_exception=_raise, strftime_now=_strftime_now)
        try:
            self.template = env.from_string(source)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template {name}: {e}") from None
        self.name = name
        self.bos_token = bos_token
        self.eos_token = eos_token

    @classmethod
    def for_model(cls, model, name=None, path=None):
        """The template a model's chats use: a file, else a built-in by name,
        else the GGUF's own, else the architecture's built-in one."""
        tok = model.tokenizer
        specials = dict(bos_token=tok.token_to_piece(tok.bos_id, special=True) if tok.bos_id is not None else "",
                        eos_token=tok.token_to_piece(tok.eos_id, special=True) if tok.eos_id is not None else "")
        if path is not None:
            try:
                with open(path, encoding="utf-8") as f:
                    return cls(f.read(), str(path), **specials)
            except (OSError, UnicodeDecodeError) as e:
                raise ChatTemplateError(f"chat template file {path}: {e}") from None
        if name is not None:
            if name not in BUILTIN:
                raise ChatTemplateError(f"unknown chat template {name!r}; built-in: {', '.join(BUILTIN)}")
            return cls(BUILTIN[name], name, **specials)
        source = model.metadata.get("tokenizer.chat_template")
        if isinstance(source, str) and source:
            return cls(source, "gguf", **specials)
        if model.arch in ARCH_DEFAULT:
            name = ARCH_DEFAULT[model.arch]
            return cls(BUILTIN[name], name, **specials)
        raise ChatTemplateError(f"the model ({model.arch}) has no chat template; "
                                f"give one by name ({', '.join(BUILTIN)}) or file")

    def render(self, messages, add_generation_prompt=True):
        """The prompt text of a conversation: a list of {"role", "content"},
        content a string or a list of {"type": "text", "text"} parts."""
        try:
            return self.template.render(messages=_plain_messages(messages),
                                        add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token, eos_token=self.eos_token)
        except ChatTemplateError:
            raise
        except (jinja2.TemplateError, TypeError, ValueError) as e:
            raise ChatTemplateError(f"chat template {self.name}: {e}") from None

    def encode(self, tokenizer, messages, add_generation_prompt=True):
        """Token ids of the rendered conversation: control tokens parsed, one
        BOS as the tokenizer adds it (a BOS the template writes is not doubled)."""
        text = self.render(messages, add_generation_prompt)
        if self.bos_token and text.startswith(self.bos_token):
            text = text[len(self.bos_token):]
        return tokenizer.encode(text, add_bos=True, special=True)


def _plain_messages(messages):
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatTemplateError("messages must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ChatTemplateError(f"messages[{i}] needs a string 'role'")
        content = m.get("content")
        if isinstance(content, list):
            parts = [p.get("text") if isinstance(p, dict) and p.get("type") == "text" else None
                     for p in content]
            if any(not isinstance(p, str) for p in parts):
                raise ChatTemplateError(f"messages[{i}].content: only text parts are supported")
            content = "".join(parts)
        if not isinstance(content, str):
            raise ChatTemplateError(f"messages[{i}] needs a string 'content'")
        out.append({"role": m["role"], "content": content})
    return out
