"""Flower's server strategies over Offsite's rounds: each optimizer's step against a reference
computed here by hand, FedProx's mu on the typed instruction, and configuration refusals."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, Metadata, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from coordinator.federation.strategy import AdapterRounds, RoundSettings, make_strategy
from offsite.config import load_config
from offsite.errors import ConfigError
from offsite.federation.robust import ServerStrategy
from offsite.wire.messages import TrainInstruction, TrainReply

SHAPES = {"m.lora_A.weight": (3, 5), "m.lora_B.weight": (5, 3)}


class _Nodes(Grid):
    """Only what sampling asks of a grid: the connected node ids (messages are not sent)."""

    def __init__(self, nodes: Iterable[int]):
        self._nodes = list(nodes)

    def set_run(self, run: Any) -> None:
        raise NotImplementedError

    @property
    def run(self) -> Any:
        raise NotImplementedError

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return self._nodes

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        raise NotImplementedError


@pytest.fixture(autouse=True)
def _server_task() -> Iterator[None]:
    """A ServerApp process has a task identity (Flower sets it); messages need its run id."""
    saved = TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def _reply(node: int, state: dict[str, torch.Tensor], examples: int) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord(state),
            "metrics": TrainReply(num_examples=examples, partition_id=node).to_record(),
        }
    )
    metadata = Metadata(
        run_id=1,
        message_id=f"r{node}-{time.monotonic_ns()}",
        src_node_id=node,
        dst_node_id=0,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=60.0,
        message_type="train",
    )
    return Message(content=content, metadata=metadata)


def _round(
    strategy: AdapterRounds, server_round: int, state: dict[str, torch.Tensor], seed: int
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One round through the strategy; (its new global, the example-weighted client mean)."""
    sent = list(
        strategy.configure_train(
            server_round, ArrayRecord(state), ConfigRecord(), _Nodes([1, 2, 3])
        )
    )
    assert len(sent) == 3
    strategy._sent = []  # not pushed: the replies below carry no instruction ids
    gen = torch.Generator().manual_seed(seed)
    clients = [
        {k: v + 0.01 * (i + 1) * torch.randn(v.shape, generator=gen) for k, v in state.items()}
        for i in range(3)
    ]
    examples = [10, 20, 40]
    arrays, _ = strategy.aggregate_train(
        server_round,
        [_reply(i + 1, c, e) for i, (c, e) in enumerate(zip(clients, examples, strict=True))],
    )
    assert arrays is not None
    mean = {
        k: sum(c[k].double() * e for c, e in zip(clients, examples, strict=True)) / sum(examples)
        for k in state
    }
    return arrays.to_torch_state_dict(), mean


def _start() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}


@pytest.mark.parametrize(
    "name", ["fedadam", "fedyogi", "fedadagrad", "fedavgm", "fedavg", "fedprox"]
)
def test_each_server_step_matches_a_hand_computed_reference(name: str) -> None:
    eta, b1, b2, tau, momentum = 0.05, 0.8, 0.95, 1e-3, 0.7
    server = {
        "fedadam": ServerStrategy(name, server_lr=eta, beta1=b1, beta2=b2, tau=tau),
        "fedyogi": ServerStrategy(name, server_lr=eta, beta1=b1, beta2=b2, tau=tau),
        "fedadagrad": ServerStrategy(name, server_lr=eta, tau=tau),
        "fedavgm": ServerStrategy(name, server_lr=eta, momentum=momentum),
        "fedavg": ServerStrategy(),
        "fedprox": ServerStrategy(name, proximal_mu=0.1),
    }[name]
    strategy = make_strategy(
        server, lambda _r, _report: None, min_train_nodes=3, min_available_nodes=3
    )
    x = {k: v.double() for k, v in _start().items()}
    m = {k: torch.zeros_like(v) for k, v in x.items()}
    v = {k: torch.zeros_like(t) for k, t in x.items()}
    state = _start()
    for t in (1, 2, 3):
        state_next, mean = _round(strategy, t, state, seed=t)
        for k in x:
            delta = mean[k] - x[k]  # the pseudo-gradient's negative: aggregate - global
            if name in ("fedadam", "fedyogi", "fedadagrad"):
                beta1 = 0.0 if name == "fedadagrad" else b1
                m[k] = beta1 * m[k] + (1 - beta1) * delta
                if name == "fedadam":
                    v[k] = b2 * v[k] + (1 - b2) * delta**2
                    # Flower's bias correction counts rounds from t + 1
                    lr = eta * (1 - b2 ** (t + 1)) ** 0.5 / (1 - b1 ** (t + 1))
                elif name == "fedyogi":
                    v[k] = v[k] - (1 - b2) * delta**2 * torch.sign(v[k] - delta**2)
                    lr = eta
                else:
                    v[k] = v[k] + delta**2
                    lr = eta
                x[k] = x[k] + lr * m[k] / (v[k].sqrt() + tau)
            elif name == "fedavgm":
                m[k] = -delta if t == 1 else momentum * m[k] - delta
                x[k] = x[k] - eta * m[k]
            else:
                x[k] = mean[k]
            assert state_next[k].dtype == torch.float32  # the adapter keeps its dtype
            torch.testing.assert_close(state_next[k].double(), x[k], rtol=0, atol=1e-6)
        # the step really is the optimizer's, not the plain mean (except fedavg / fedprox)
        moved = max(float((state_next[k].double() - mean[k]).abs().max()) for k in x)
        assert (moved > 1e-4) == (name not in ("fedavg", "fedprox"))
        state = state_next


def test_fedprox_mu_reaches_the_client_on_the_typed_instruction() -> None:
    strategy = make_strategy(
        ServerStrategy("fedprox", proximal_mu=0.25),
        lambda _r, _report: None,
        min_train_nodes=2,
        min_available_nodes=2,
    )
    config = TrainInstruction(
        bundle_path="b",
        bundle_digest="d",
        data_dir="",
        template="{text}",
        max_words=1,
        max_length=8,
        batch_size=1,
        local_steps=1,
        lr=1e-3,
        precision="fp32",
        seed=0,
    ).to_record()  # proximal_mu left at 0: what reaches the nodes is Flower's FedProx's doing
    sent = list(strategy.configure_train(1, ArrayRecord(_start()), config, _Nodes([1, 2])))
    assert len(sent) == 2
    for message in sent:
        # Flower's FedProx writes "proximal-mu": the key our typed field travels under
        order = TrainInstruction.from_record(message.content.config_records["config"])
        assert order.proximal_mu == 0.25


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["federation.strategy='fedprox'"], "proximal_mu=0 is FedAvg"),
        (["federation.proximal_mu=0.1"], "proximal_mu applies only to strategy 'fedprox'"),
        (
            ["federation.strategy='fedadagrad'", "federation.server_beta1=0.5"],
            "server_beta1 applies only to strategy 'fedadam' / 'fedyogi'",
        ),
        (["federation.strategy='fedavgm'"], "server_momentum > 0"),
        (["federation.strategy='fedadam'", "federation.server_tau=0"], "server_tau must be > 0"),
        (
            ["federation.aggregation='median'", "federation.secure_aggregation=true"],
            "secure_aggregation hides single updates",
        ),
        (
            ["federation.aggregation='median'", "federation.num_clients=300"],
            "exceed max_buffered=256",
        ),
        (
            ["federation.aggregation='bulyan'", "federation.num_clients=6"],
            "bulyan tolerates f=1",
        ),
    ],
)
def test_meaningless_combinations_are_refused_with_one_line(
    overrides: list[str], expected: str
) -> None:
    with pytest.raises(ConfigError, match=expected) as caught:
        load_config(None, overrides)
    assert "\n" not in str(caught.value)


def test_server_optimizers_compose_with_secure_aggregation_dp_and_robust_rules() -> None:
    load_config(
        None,
        [
            "federation.strategy='fedadam'",
            "federation.num_clients=5",
            "federation.secure_aggregation=true",
            "privacy.epsilon=8",
        ],
    )
    load_config(None, ["federation.strategy='fedyogi'", "federation.aggregation='median'"])
    load_config(
        None,
        ["federation.strategy='fedprox'", "federation.proximal_mu=0.01", "train.upload='sparse'"],
    )
    config = load_config(None, ["federation.strategy='fedavgm'", "federation.server_momentum=0.9"])
    assert config.federation.server_strategy.learning_rate == 1.0  # Flower's default


def test_a_server_optimizer_runs_over_a_robust_rule_and_over_dp_rounds() -> None:
    from offsite.federation.dp import DpSchedule, epsilon
    from offsite.federation.robust import AggregationRule

    # Yogi over Flower's FedMedian: the step is bounded by the server rate per coordinate
    strategy = make_strategy(
        ServerStrategy("fedyogi", server_lr=0.01),
        lambda _r, _report: None,
        AggregationRule("median"),
        min_train_nodes=3,
        min_available_nodes=3,
    )
    state, _ = _round(strategy, 1, _start(), seed=1)
    steps = torch.cat([(state[k] - _start()[k]).reshape(-1) for k in SHAPES])
    assert 0 < float(steps.abs().max()) <= 0.01 * (1 + 1e-5)
    # Adam over DP-FedAvg: noise first, then the optimizer (post-processing); ε is accounted
    dp = DpSchedule(1.0, 1.0, 3, 1e-5, epsilon(1.0, 1.0, 3, 1e-5), 0.5)
    private = make_strategy(
        ServerStrategy("fedadam", server_lr=0.01),
        lambda _r, _report: None,
        None,
        RoundSettings(dp=dp),
        min_train_nodes=3,
        min_available_nodes=3,
    )
    _round(private, 1, _start(), seed=1)
    assert private.round_log[-1]["epsilon"] == pytest.approx(epsilon(1.0, 1.0, 1, 1e-5))


class _SilentNodes(_Nodes):
    """Connected nodes that never answer: every exchange ends empty at its deadline."""

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return []


def test_a_failed_secure_setup_blames_the_setup_not_the_round_deadline() -> None:
    reports: list[dict[str, Any]] = []
    strategy = make_strategy(
        ServerStrategy(),
        lambda _r, report: reports.append(report),
        None,
        RoundSettings(secure=True),
    )
    grid = _SilentNodes([1, 2, 3])
    assert list(strategy.configure_train(1, ArrayRecord(_start()), ConfigRecord(), grid)) == []
    arrays, _ = strategy.aggregate_train(1, [])
    assert arrays is None
    assert strategy.round_log[-1]["outcome"].startswith("failed: secure aggregation setup")
    assert reports == []  # no train instruction went out, so no node missed the round deadline


def test_the_default_server_rates_are_flowers_own() -> None:
    """server_lr=0 means "Flower's default": the table must say what Flower's classes say."""
    import inspect

    from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvgM, FedYogi

    from offsite.federation.robust import DEFAULT_SERVER_LR

    flower = {
        "fedadam": inspect.signature(FedAdam).parameters["eta"].default,
        "fedyogi": inspect.signature(FedYogi).parameters["eta"].default,
        "fedadagrad": inspect.signature(FedAdagrad).parameters["eta"].default,
        "fedavgm": inspect.signature(FedAvgM).parameters["server_learning_rate"].default,
    }
    assert flower == DEFAULT_SERVER_LR
