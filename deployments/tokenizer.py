"""The tokenizer deployment: chat templates, token counts and (de)tokenization for every chat model.

It lets the ingress validate a request against the context window and count its tokens without touching the
GPU replicas. Its methods are plain (sync) functions: Serve runs them on its thread pool. The ingress holds the
same `ChatTokenizers` to render short conversations itself (serving/prompts.py): one hop less per chat request.
"""

from __future__ import annotations

import re
from typing import Any

from ray import serve

from deployments.model_files import context_window, load_tokenizer
from serve_app.config import ChatModelConfig
from serve_app.errors import InvalidRequest, ModelNotFound, answers_errors
from serve_app.protocol.engine import CallSyntax, ChatPrompt


class ChatTokenizers:
    """Every chat model's tokenizer and window, by model name."""

    def __init__(self, chat_models: list[ChatModelConfig]) -> None:
        self._tokenizers = {m.name: load_tokenizer(m) for m in chat_models}
        self._windows = {m.name: context_window(m) for m in chat_models}
        self._control_tokens = {
            name: _control_token_pattern(tokenizer) for name, tokenizer in self._tokenizers.items()
        }
        self._call_syntax = {name: _call_syntax(tokenizer) for name, tokenizer in self._tokenizers.items()}

    def _tokenizer(self, model: str) -> Any:
        try:
            return self._tokenizers[model]
        except KeyError:
            raise ModelNotFound(model) from None

    def render_chat(
        self,
        model: str,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        continue_final_message: bool = False,
    ) -> ChatPrompt:
        """The prompt of a conversation: only the template's own structure makes control tokens.
        `continue_final_message`: the prompt ends inside the last message, for the model to go on with it.

        Every string in `messages` and `tools` (contents, names, metadata, tool calls and definitions) is client
        text: a control token's text in it (`<|user|>`, `[gMASK]`...) is encoded as that text's plain pieces,
        never as the token. Text without any tokenizes exactly as a one-pass encode of the rendered template.
        """
        tokenizer = self._tokenizer(model)
        if tools and "tools" not in str(tokenizer.chat_template or ""):
            # The template would drop them without a word: say so instead.
            raise InvalidRequest(f"the chat template of {model!r} does not take tools", param="tools")
        _refuse_control_tokens_in_keys(
            self._control_tokens[model], {"messages": messages, "tools": tools}, model
        )
        try:
            # transformers marks the control tokens found in the inputs before rendering and encodes the marked
            # ones as text (`mark_control_tokens`, `encode_marked_chat`); a rendered chat with no marks is one
            # encode, as before. The template already writes the special prefix tokens.
            token_ids = tokenizer.apply_chat_template(
                messages,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                tokenize=True,
                sanitize_control_tokens=True,
                return_dict=False,
            )
        except Exception as exc:  # noqa: BLE001 - a template may reject a conversation (role order, missing fields)
            raise InvalidRequest(
                f"the chat template rejected these messages: {exc}", param="messages"
            ) from None
        return ChatPrompt(
            token_ids=list(token_ids),
            max_model_len=self._windows[model],
            call_syntax=self._call_syntax[model],
        )

    def encode(self, model: str, text: str, add_special_tokens: bool = True) -> ChatPrompt:
        token_ids = self._tokenizer(model).encode(text, add_special_tokens=add_special_tokens)
        return ChatPrompt(token_ids=token_ids, max_model_len=self._windows[model])

    def pieces(self, model: str, text: str) -> tuple[list[int], list[str]]:
        """GLM-API's view: the ids with the special prefix tokens, and the text's own tokens as strings."""
        tokenizer = self._tokenizer(model)
        own = tokenizer.encode(text, add_special_tokens=False)
        return tokenizer.encode(text, add_special_tokens=True), tokenizer.convert_ids_to_tokens(own)

    def token_strings(self, model: str, token_ids: list[int]) -> list[str]:
        """Each token as the vocabulary writes it (byte-level pieces, `▁` for a space), as vLLM's
        `return_token_strs` gives them."""
        return list(self._tokenizer(model).convert_ids_to_tokens(token_ids))

    def decode(self, model: str, token_ids: list[int]) -> str:
        tokenizer = self._tokenizer(model)
        vocab_size = len(tokenizer)
        unknown = [t for t in token_ids if t >= vocab_size]
        if unknown:
            raise InvalidRequest(
                f"token ids {unknown[:5]} are outside the vocabulary of {model!r} (size {vocab_size})",
                param="tokens",
            )
        return tokenizer.decode(token_ids)

    def status(self) -> dict[str, int]:
        return {"chat_models": len(self._tokenizers)}


def _call_syntax(tokenizer: Any) -> CallSyntax:
    """ChatGLM3's template writes an assistant's calls as `tool_call(...)` blocks (serve_app/chatglm/templates.py);
    GLM-4's, and any other, as JSON."""
    return "python" if "tool_call(" in str(tokenizer.chat_template or "") else "json"


def _control_token_pattern(tokenizer: Any) -> re.Pattern[str]:
    """Any added token's text (the control tokens among them), whitespace tokens aside: templates write those as text."""
    texts = sorted(
        (token.content for token in tokenizer.added_tokens_decoder.values() if not token.content.isspace()),
        key=len,
        reverse=True,
    )
    return re.compile("|".join(map(re.escape, texts)) or "(?!)")


def _refuse_control_tokens_in_keys(control: re.Pattern[str], value: Any, model: str, path: str = "") -> None:
    """A 400 for a key, anywhere in the conversation or the tools, that holds a control token's text.

    transformers encodes the control tokens in every string value as text, but a template writes dict keys (a
    tool's parameter names, a call's argument names: `tojson`, ChatGLM3's `key=value`) into the prompt as they are,
    so there `<|user|>` would become the token. No parameter needs such a name.
    """
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and (found := control.search(key)):
                raise InvalidRequest(
                    f"{path}: the key {key!r} holds {found.group()!r}, a control token of {model!r}; a key is "
                    "written into the prompt as it is, so it cannot hold one",
                    param=path or None,
                )
            _refuse_control_tokens_in_keys(control, item, model, where)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _refuse_control_tokens_in_keys(control, item, model, f"{path}.{index}")


@serve.deployment
class TokenizerDeployment:
    """`ChatTokenizers` as a Serve deployment: its methods are what the ingress's handle calls. A client's bad
    input comes back as the error, a value (`answers_errors`), which the ingress raises."""

    def __init__(self, chat_models: list[ChatModelConfig]) -> None:
        tokenizers = ChatTokenizers(chat_models)
        self.render_chat = answers_errors(tokenizers.render_chat)
        self.encode = answers_errors(tokenizers.encode)
        self.pieces = answers_errors(tokenizers.pieces)
        self.token_strings = answers_errors(tokenizers.token_strings)
        self.decode = answers_errors(tokenizers.decode)
        self.status = tokenizers.status
