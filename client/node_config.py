"""The node-config contract between the process that starts a SuperNode and the ClientApp it
runs (``context.node_config``): the launcher in ``client.supernode`` writes these keys, the app
in ``client.flower_app`` reads them. Flower's simulation writes ``partition-id`` itself."""

DATA_PATH = "data-path"  # deployment: this node's training data
IDENTITY_DIR = "identity-dir"  # deployment: the enrolled identity (keys, CA, bundle cache)
LORA_RANK = "lora-rank"  # this node's LoRA rank under merge-exact aggregation (<= the run's)
MEMORY_BUDGET = "memory-budget"  # deployment: this node's memory budget for training
PARTITION_ID = "partition-id"  # simulation: the client's share of the data (set by Flower)
