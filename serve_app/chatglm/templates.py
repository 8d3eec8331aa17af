"""The chat templates of ChatGLM3-6B and ChatGLM2-6B, as jinja for `apply_chat_template`.

Both are checked token for token against the originals' own prompts (tests/test_chatglm_tokenizer.py).
The fast tokenizer prepends SentencePiece's dummy prefix `▁` to every stretch of text between two control
tokens (as the original encodes each piece separately); the space written before a message's content is the
content's own dummy prefix, which the original adds by encoding the content on its own.

Newlines are written as {{ '\\n' }}: transformers renders templates with trim_blocks, which drops a literal
newline after a block tag.
"""

from __future__ import annotations

# What ChatGLM3's tool-using demos put in the system turn when the client sends tools and no system message.
CHATGLM3_TOOLS_SYSTEM = (
    "Answer the following questions as best as you can. You have access to the following tools:"
)

# A value in ChatGLM3's tool_call(...) block, as Python writes it: strings quoted (the quotes and the escapes that
# matter), True / False / None; numbers, lists and dicts as JSON, whose names the tool-call parser also reads.
_CHATGLM3_PYTHON_VALUE = (
    "{%- macro python_value(value) -%}"
    "{%- if value is string -%}"
    r"""'{{ value | replace('\\', '\\\\') | replace("'", "\\'") | replace('\n', '\\n') | replace('\r', '\\r') }}'"""
    "{%- elif value is sameas true -%}True{%- elif value is sameas false -%}False"
    "{%- elif value is none -%}None{%- else -%}{{ value | tojson }}{%- endif -%}"
    "{%- endmacro -%}"
)

# ChatGLM3: "[gMASK]<sop>", then per message "<|role|>{metadata}\n {content}", then "<|assistant|>".
# Tools (OpenAI's {"type": "function", "function": {...}} or bare function dicts, from `tools=` or a system
# message's own "tools") follow the first system message's content as JSON, indent 4, non-ASCII kept.
# OpenAI's "tool" role is ChatGLM3's "observation". An assistant message's OpenAI tool_calls are ChatGLM3's own
# call turns, one per call: "<|assistant|>{name}\n ```python\ntool_call(key=value, ...)\n```".
CHATGLM3_TEMPLATE = (
    _CHATGLM3_PYTHON_VALUE + "{%- set ns = namespace(tools=[]) -%}"
    "{%- for tool in (tools or []) -%}"
    "{%- set ns.tools = ns.tools + [tool.function if tool.function is defined else tool] -%}"
    "{%- endfor -%}"
    "[gMASK]<sop>"
    "{%- if ns.tools and (not messages or messages[0].role != 'system') -%}"
    "<|system|>{{ '\\n' }} " + CHATGLM3_TOOLS_SYSTEM + "{{ '\\n' }}{{ ns.tools | tojson(indent=4) }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- set role = 'observation' if message.role == 'tool' else message.role -%}"
    "{%- if role not in ['system', 'user', 'assistant', 'observation'] -%}"
    "{{ raise_exception('ChatGLM3 has no role ' ~ message.role ~ ': use system, user, assistant or tool') }}"
    "{%- endif -%}"
    "{%- set content = message.content or '' -%}"
    "{%- set message_tools = message.tools if message.tools is defined and message.tools else [] -%}"
    "{%- if role == 'system' and loop.first and (ns.tools or message_tools) -%}"
    "{%- set content = content ~ '\\n' ~ ((ns.tools + message_tools) | tojson(indent=4)) -%}"
    "{%- endif -%}"
    "{%- set calls = message.tool_calls if role == 'assistant' and message.tool_calls is defined else none -%}"
    "{%- if not calls or content -%}"
    "<|{{ role }}|>{{ message.metadata if message.metadata is defined and message.metadata else '' }}"
    "{{ '\\n' }}{% if content %} {{ content }}{% endif %}"
    "{%- endif -%}"
    "{%- for call in (calls or []) -%}"
    "{%- set arguments = call.function.arguments -%}"
    "<|assistant|>{{ call.function.name }}{{ '\\n' }} ```python{{ '\\n' }}"
    "{%- if arguments is mapping -%}tool_call("
    "{%- for key, value in arguments.items() -%}{{ ', ' if not loop.first }}{{ key }}={{ python_value(value) }}"
    "{%- endfor -%})"
    "{%- else -%}{{ arguments }}{%- endif -%}"
    "{{ '\\n' }}```"
    "{%- endfor -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)

# ChatGLM2: "[gMASK]<sop>" then "[Round N]\n\n问：{user}\n\n答：{assistant}\n\n" per exchange, rounds from 1.
# ChatGLM2 has no system role; a system message is written as plain text before the first round.
CHATGLM2_TEMPLATE = (
    "{%- set ns = namespace(round=0) -%}"
    "[gMASK]<sop>"
    "{%- for message in messages -%}"
    "{%- if message.role == 'system' -%}"
    "{{ message.content or '' }}{{ '\\n\\n' }}"
    "{%- elif message.role == 'user' -%}"
    "{%- set ns.round = ns.round + 1 -%}"
    "[Round {{ ns.round }}]{{ '\\n\\n' }}问：{{ message.content or '' }}{{ '\\n\\n' }}答："
    "{%- elif message.role == 'assistant' -%}"
    "{{ message.content or '' }}{{ '\\n\\n' }}"
    "{%- else -%}"
    "{{ raise_exception('ChatGLM2 has no role ' ~ message.role ~ ': use system, user or assistant') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)
