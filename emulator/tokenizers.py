"""The tokenizer type the code accepts: a Hugging Face tokenizer, or the client's lean one.

Both are called the same way (``tokenizer(texts, …)``, ``pad_token_id``, ``decode``) and neither
has types precise enough to check those calls, so this alias is the one declared boundary where
``Any`` stands for a tokenizer.
"""

from typing import Any, TypeAlias

Tokenizer: TypeAlias = Any
