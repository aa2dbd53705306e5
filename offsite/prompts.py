"""How examples become text: prompt templates and label verbalizers (pure Python).

Training and every evaluation setting use these same functions, so the adapter is scored on
exactly the format it was trained on. Classification is multiple choice: each label's
verbalization (``" " + label``) is scored by log-likelihood after the prompt, as lm-eval does.

A template is one string with a ``{text}`` slot; what follows the slot (e.g. ``"\nTopic:"``) is
the *tail*, which is never truncated, so the answer position survives any length limit.
Measured on the default model (centralized probe, 60 steps, 2-16-2): a plain
``"Article: {text}\nTopic:"`` prompt gave full zero-shot 49 %, plug-in 67 %; listing the
options in the prompt gave 36 % and 49 % — the listed options made the adapter lean on the
emulator's quirks and transfer worse, so catalog templates do not list options.
"""

from __future__ import annotations

from offsite.errors import ConfigError

DEFAULT_TEMPLATE = "Text: {text}\nCategory:"


def cut_words(text: str, max_words: int) -> str:
    return " ".join(text.split()[:max_words])


def check_template(template: str) -> None:
    if template.count("{text}") != 1:
        raise ConfigError(
            f"data.template {template!r} must contain the slot {{text}} exactly once, "
            'e.g. "Article: {text}\\nTopic:"'
        )


def classification_parts(text: str, template: str, max_words: int) -> tuple[str, str]:
    """(head, tail) of a classification prompt; the head may be cut, the tail never is."""
    before, after = template.split("{text}")
    return before + cut_words(text, max_words), after


def verbalize(label: str) -> str:
    return " " + label
