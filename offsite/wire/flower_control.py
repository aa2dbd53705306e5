"""Flower's Control API (what the ``flwr`` CLI uses), typed: the node calls the coordinator makes.

The SuperLink's Control API speaks Flower's own protobuf (``flwr.proto.control_pb2``); this
module is the only place outside the generated code that builds or reads those messages. It runs
the calls in process over Flower's HTTP client: one costs milliseconds where the ``flwr`` CLI
costs a second of CPU. Importing it imports the Flower modules it needs: do that before helper
threads start (two threads importing ``flwr`` at once can deadlock on its circular imports).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType

from flwr.common.constant import HEARTBEAT_PATIENCE
from flwr.proto.control_pb2 import ListNodesRequest, RegisterNodeRequest, UnregisterNodeRequest
from flwr.supercore.control import ControlHttpClient
from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor


@dataclass(frozen=True)
class ControlNode:
    """One row of the SuperLink's node table. Its id is a string, as in Offsite's registry
    (Flower's ids are uint64: beyond what a JSON number holds exactly)."""

    node_id: str
    status: str  # registered | online | offline | unregistered
    public_key: bytes  # PEM, as Flower stores it
    name: str
    # when the SuperLink last saw the node come online / go offline (ISO 8601; "" = never)
    last_activated_at: str = ""
    last_deactivated_at: str = ""
    online_until: float | None = None  # Unix time the node counts as online until
    heartbeat_interval: float = 0.0  # seconds between the node's heartbeats

    def heard_since(self, moment: float) -> bool:
        """Whether the node's last heartbeat (or activation) reached the SuperLink at or after
        ``moment`` (Unix time). Flower sets ``online_until`` to that heartbeat plus
        ``HEARTBEAT_PATIENCE`` intervals, and keeps a node online across a SuperLink restart
        until then: "online" alone does not say the node is connected to this SuperLink."""
        if self.status != "online" or self.online_until is None:
            return False
        return self.online_until - HEARTBEAT_PATIENCE * self.heartbeat_interval >= moment


class FlowerControl:
    """A client of one SuperLink's Control API; use it in a ``with`` block (it holds a
    connection). Failures raise what Flower raises (httpx errors, Flower's own): callers that
    need one error type wrap the block."""

    def __init__(self, address: str, root_certificates: bytes) -> None:
        self._client = ControlHttpClient.from_server_address(
            server_address=address,
            insecure=False,
            root_certificates=root_certificates,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr CLI")],
        )

    def __enter__(self) -> FlowerControl:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def list_nodes(self) -> list[ControlNode]:
        """Every node the SuperLink holds, unregistered ones included."""
        answer = self._client.ListNodes(ListNodesRequest())
        return [
            ControlNode(
                str(n.node_id),
                str(n.status),
                bytes(n.public_key),
                str(n.name),
                str(n.last_activated_at),
                str(n.last_deactivated_at),
                float(n.online_until) if n.HasField("online_until") else None,
                float(n.heartbeat_interval),
            )
            for n in answer.nodes_info
        ]

    def register_node(self, public_key: bytes, name: str) -> int:
        """Admit a SuperNode's authentication key (PEM); the node id Flower assigned, 0 if it
        assigned none."""
        answer = self._client.RegisterNode(RegisterNodeRequest(public_key=public_key, name=name))
        return int(answer.node_id)

    def unregister_node(self, node_id: int) -> None:
        self._client.UnregisterNode(UnregisterNodeRequest(node_id=node_id))
