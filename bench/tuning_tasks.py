"""Tasks the recipe is tuned on, and never reported against (issue 22, item 5).

The recipe (learning rate, rank, steps, rounds) must be chosen on tasks other than the ones whose
numbers we report (bbc-news for the default's targets, chatterbot-topics for generalisation) and
never on a held-out split. These two are built from other installed packages, written as user
JSONL files and run through the same public path a user's data takes:

- ``chitchat-prompts``: which of 8 conversation starters began a chitchat dialogue (long, chatty
  texts; 8 classes). The emulator's calibration also reads chitchat dialogues, unlabelled; at most
  64 of its 7,168 dialogues can overlap this task's 1,200.
- ``stdlib-docs``: which standard-library package a docstring comes from (technical prose; 8
  classes). The package's own name is masked in the text, so the label is not spelled out. It
  depends on the Python version (recorded in the report).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import os
import pkgutil
import re
import sys
import warnings
from pathlib import Path

PER_LABEL = 150  # examples per class at most, in a fixed order

CHITCHAT_PROMPTS = {  # the 8 most frequent starters of chitchat-dataset 0.9.0 -> label word
    "What's the most interesting thing you've learned recently?": "learning",
    "If money were no object, how would you spend your time?": "money",
    "What superpower do you wish you had, and why?": "superpower",
    "What's one thing your best friend doesn't know about you?": "secret",
    "If you were in power for a day, how would you try to improve the country?": "politics",
    "Who is your modern-day hero?": "hero",
    "What's the last film that truly made an impression on you?": "film",
    "What's your favorite smell?": "smell",
}
STDLIB_PACKAGES = ("asyncio", "email", "logging", "xml", "http", "tkinter", "turtle", "unittest")

# name -> the prompt template its runs use (data.template)
TEMPLATES = {
    "chitchat-prompts": "Chat: {text}\nTopic:",
    "stdlib-docs": "Docstring: {text}\nModule:",
}


def chitchat_prompts() -> list[dict[str, str]]:
    """Dialogue text -> the starter that began it (first PER_LABEL dialogues per starter)."""
    from offsite.catalog import package_folder

    folder = package_folder("chitchat_dataset")
    if folder is None:
        raise SystemExit("chitchat-dataset is not installed: run `make setup`")
    dialogues = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    rows: list[dict[str, str]] = []
    counts = dict.fromkeys(CHITCHAT_PROMPTS.values(), 0)
    for key in sorted(dialogues):
        label = CHITCHAT_PROMPTS.get(dialogues[key].get("prompt") or "")
        if label is None or counts[label] >= PER_LABEL:
            continue
        turns = [m["text"] for block in dialogues[key].get("messages", []) for m in block]
        text = "\n".join(t for t in turns if t.strip())
        if text:
            rows.append({"text": text, "label": label})
            counts[label] += 1
    return rows


def _package_docstrings(name: str) -> list[str]:
    """Docstrings (>= 12 words, deduplicated) of a package's public functions, classes and
    methods, modules in walk order."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        package = importlib.import_module(name)
        modules = [package]
        for info in pkgutil.walk_packages(getattr(package, "__path__", []), f"{name}."):
            parts = info.name.split(".")[1:]
            if any(p.startswith("_") or p in ("test", "tests") for p in parts):
                continue
            try:
                modules.append(importlib.import_module(info.name))
            except Exception:  # optional modules (a missing C library) are skipped
                continue
    seen: set[str] = set()
    out: list[str] = []
    for module in modules:
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            members = [obj]
            if inspect.isclass(obj):
                members += [v for k, v in sorted(vars(obj).items()) if not k.startswith("_")]
            for member in members:
                doc = inspect.getdoc(member) if callable(member) else None
                if doc and len(doc.split()) >= 12 and doc not in seen:
                    seen.add(doc)
                    out.append(doc)
    return out


def stdlib_docs(packages: tuple[str, ...] = STDLIB_PACKAGES) -> list[dict[str, str]]:
    """Docstring (its package's name masked) -> package, PER_LABEL per package at most."""
    missing = [name for name in packages if importlib.util.find_spec(name) is None]
    if missing:  # e.g. a Python built without Tk: the task would silently lose a class
        raise SystemExit(f"stdlib-docs needs the standard packages {missing}; install them")
    rows = []
    for name in packages:
        mask = re.compile(rf"\b{re.escape(name)}\b", re.IGNORECASE)
        for doc in _package_docstrings(name)[:PER_LABEL]:
            rows.append({"text": mask.sub("…", doc), "label": name})
    return rows


BUILDERS = {"chitchat-prompts": chitchat_prompts, "stdlib-docs": stdlib_docs}


def write_task(name: str, folder: Path) -> Path:
    """The task's JSONL in ``folder`` (rewritten each time: it is cheap and deterministic; by a
    rename, so a run reading it meanwhile never sees half a file)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.jsonl"
    rows = BUILDERS[name]()
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    partial.replace(path)
    return path


def python_version() -> str:
    return ".".join(map(str, sys.version_info[:3]))
