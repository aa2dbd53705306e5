"""Data loading, held-out split and non-IID partitions."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from offsite.data import Example, load_task, partition, split_holdout, write_jsonl
from offsite.errors import DataError
from tests.conftest import LABELS, tiny_texts


def _labelled(n_per_label: int = 30) -> list[Example]:
    return [Example(t, label=lab) for lab in LABELS for t in tiny_texts(lab, n_per_label)]


def test_jsonl_classification_and_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    write_jsonl(_labelled(2), path)
    task = load_task(str(path))
    assert task.kind == "classification"
    assert task.labels == tuple(sorted(LABELS))
    assert len(task.examples) == 6


def test_jsonl_prompt_completion(tmp_path: Path) -> None:
    path = tmp_path / "qa.jsonl"
    path.write_text(
        '{"prompt": "Q: hi", "completion": " A: hello"}\n\n{"prompt": "x", "completion": "y"}\n'
    )
    task = load_task(str(path))
    assert task.kind == "completion" and task.examples[0].completion == " A: hello"


def test_custom_fields(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"review": "great", "stars": "5"}\n{"review": "bad", "stars": "1"}\n')
    task = load_task(str(path), text_field="review", label_field="stars")
    assert task.labels == ("1", "5")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"txt": "a", "lbl": "b"}\n', "data.text_field"),
        ("not json\n", "not valid JSON"),
        ("", "no examples"),
        ('{"text": "a", "label": "x"}\n{"prompt": "p", "completion": "c"}\n', "mixes"),
        ('{"text": "a", "label": "x"}\n', "needs >= 2"),
    ],
)
def test_bad_jsonl_gives_actionable_errors(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_task(str(path))


def test_missing_data_names_the_options(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="catalog name"):
        load_task(str(tmp_path / "nope.jsonl"))
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="JSONL"):
        load_task(str(tmp_path / "data.csv"))


def test_folder_per_label(tmp_path: Path) -> None:
    for label in LABELS:
        (tmp_path / label).mkdir()
        for i, text in enumerate(tiny_texts(label, 3)):
            (tmp_path / label / f"{i}.txt").write_text(text)
    task = load_task(str(tmp_path))
    assert task.labels == tuple(sorted(LABELS)) and len(task.examples) == 9


def test_holdout_is_stratified_disjoint_and_seeded() -> None:
    examples = _labelled(30)
    train, held = split_holdout(examples, 30, seed=3)
    assert len(held) == 30 and len(train) == 60
    assert Counter(e.label for e in held) == {label: 10 for label in LABELS}
    assert {id(e) for e in train}.isdisjoint(id(e) for e in held)
    assert split_holdout(examples, 30, seed=3)[1] == held
    assert split_holdout(examples, 30, seed=4)[1] != held
    with pytest.raises(DataError, match="eval_size"):
        split_holdout(examples, 90, seed=0)


def test_dirichlet_partition_is_non_iid_complete_and_seeded() -> None:
    examples = _labelled(40)
    shares = partition(examples, 4, "dirichlet", alpha=0.3, seed=1)
    assert sum(len(s) for s in shares) == len(examples)
    assert all(shares)
    assert sorted(id(e) for s in shares for e in s) == sorted(id(e) for e in examples)
    skew = [max(Counter(e.label for e in s).values()) / len(s) for s in shares]
    assert max(skew) > 0.5  # at least one client is dominated by one label
    assert partition(examples, 4, "dirichlet", 0.3, seed=1) == shares
    iid = partition(examples, 4, "iid", 1.0, seed=1)
    assert [len(s) for s in iid] == [30, 30, 30, 30]
    with pytest.raises(DataError, match="num_clients"):
        partition(examples[:3], 4, "iid", 1.0, seed=0)


def _sizes_spread(shares: list[list[Example]]) -> float:
    """Coefficient of variation of the clients' share sizes."""
    import statistics

    sizes = [len(s) for s in shares]
    return statistics.pstdev(sizes) / statistics.mean(sizes)


@pytest.mark.parametrize("scheme", ["dirichlet", "iid"])
def test_quantity_skew_is_seeded_complete_and_skewed(scheme: str) -> None:
    examples = _labelled(200)
    plain = partition(examples, 20, scheme, 1.0, seed=3)
    skewed = partition(examples, 20, scheme, 1.0, seed=3, quantity_alpha=0.5)
    assert partition(examples, 20, scheme, 1.0, seed=3, quantity_alpha=0.5) == skewed
    assert partition(examples, 20, scheme, 1.0, seed=4, quantity_alpha=0.5) != skewed
    assert all(skewed)
    assert sorted(id(e) for s in skewed for e in s) == sorted(id(e) for e in examples)
    # a Dirichlet(0.5) over 20 clients: sizes spread far more than without the skew
    assert _sizes_spread(skewed) > 2 * _sizes_spread(plain) and _sizes_spread(skewed) > 0.8
    if scheme == "dirichlet":  # the label skew stays: clients still lean on one label
        lean = [max(Counter(e.label for e in s).values()) / len(s) for s in skewed]
        assert sum(x > 0.6 for x in lean) >= 5


def test_a_thousand_clients_split_fast_and_reproducibly() -> None:
    """1,000 registered clients, 100 sampled: the partitions and the sample count."""
    import time

    from offsite.config import load_config

    config = load_config(
        None,
        ["federation.num_clients=1000", "federation.fraction_train=0.1", "data.alpha=0.3"],
    )
    assert config.federation.sampled_clients == 100
    examples = _labelled(700)  # 2,100 examples, about two per client
    start = time.perf_counter()
    shares = partition(examples, 1000, "dirichlet", 0.3, seed=0, quantity_alpha=1.0)
    assert time.perf_counter() - start < 1.0
    assert len(shares) == 1000 and all(shares)
    assert sum(len(s) for s in shares) == len(examples)
    again = partition(examples, 1000, "dirichlet", 0.3, seed=0, quantity_alpha=1.0)
    assert [[e.text for e in s] for s in again] == [[e.text for e in s] for s in shares]


def test_write_jsonl_is_valid_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "x" / "c.jsonl"
    write_jsonl([Example("a\nb", label="l"), Example("p", completion="c")], path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == [{"text": "a\nb", "label": "l"}, {"prompt": "p", "completion": "c"}]


def test_chatterbot_topics_is_a_classification_task_over_its_topic_files() -> None:
    from collections import Counter

    from offsite.data import load_task

    task = load_task("chatterbot-topics")
    counts = Counter(e.label for e in task.examples)
    assert task.kind == "classification" and len(task.labels) == 14 == len(counts)
    assert "tech support" in task.labels and "health" not in task.labels  # 1 conversation
    assert min(counts.values()) >= 20 and max(counts.values()) == 120
    assert all(e.text.startswith("Q: ") and "\nA: " in e.text for e in task.examples)
    assert "{text}" in task.template
