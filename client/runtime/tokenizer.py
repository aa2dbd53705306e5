"""The bundle's tokenizer on the ``tokenizers`` library alone (no transformers import).

A bundle carries a Hugging Face ``tokenizer.json`` (the whole pipeline: normaliser,
pre-tokeniser, model, post-processor) and a ``tokenizer_config.json`` naming the special
tokens. When the config names a class that is only that file (``TokenizersBackend``,
``PreTrainedTokenizerFast``) and sets no flag transformers would apply on top of it
(``add_bos_token`` / ``add_eos_token`` rebuild the post-processor), the ``tokenizers`` object
encodes exactly what ``AutoTokenizer`` would, for ~9 MB resident instead of ~100 MB of
transformers' tokenization stack. ``lean_tokenizer`` returns None otherwise, and the client
uses ``AutoTokenizer``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PLAIN_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
_REBUILDING_FLAGS = ("add_bos_token", "add_eos_token")


def _token_text(token: Any) -> str | None:
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


class LeanTokenizer:
    """The slice of the ``AutoTokenizer`` interface the client uses: ``tokenizer(text,
    add_special_tokens=...)["input_ids"]`` and the pad / eos token ids."""

    def __init__(self, backend: Any, config: dict[str, Any]) -> None:
        self._backend = backend
        self.pad_token_id = self._id(config.get("pad_token"))
        self.eos_token_id = self._id(config.get("eos_token"))
        self.bos_token_id = self._id(config.get("bos_token"))

    def _id(self, token: Any) -> int | None:
        text = _token_text(token)
        return None if text is None else self._backend.token_to_id(text)

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        encoding = self._backend.encode(text, add_special_tokens=add_special_tokens)
        return {"input_ids": list(encoding.ids), "attention_mask": list(encoding.attention_mask)}


def lean_tokenizer(path: Path) -> LeanTokenizer | None:
    """The tokenizer in folder ``path`` on ``tokenizers`` alone, or None where it would not
    encode exactly as ``AutoTokenizer`` does."""
    spec, config_path = path / "tokenizer.json", path / "tokenizer_config.json"
    if not spec.is_file() or not config_path.is_file():
        return None
    config = json.loads(config_path.read_text())
    if config.get("tokenizer_class") not in PLAIN_CLASSES:
        return None
    if any(flag in config for flag in _REBUILDING_FLAGS):
        return None
    from tokenizers import Tokenizer

    return LeanTokenizer(Tokenizer.from_file(str(spec)), config)
