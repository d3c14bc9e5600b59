"""Flower ClientApp: one FedAvg client = one partition of the benchmark task, trained like any Flower
PyTorch client (load the global weights, local SGD, return weights and the example count)."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from snakeflower import task

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    rc, nc = context.run_config, context.node_config
    model = task.build_model(task.job_like(str(rc["model"]), str(rc["model-args"]), int(rc["model-seed"])))
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    pid, parts = int(nc["partition-id"]), int(nc["num-partitions"])
    x, y = task.train_arrays(task.data_spec(str(rc["dataset"]), str(rc["partition"]), pid, parts,
                                            int(rc["data-seed"])))
    server_round = int(msg.content["config"]["server-round"])
    metrics = task.train_epochs(model, x, y, epochs=int(rc["local-epochs"]), batch=int(rc["batch-size"]),
                                lr=float(rc["lr"]), momentum=float(rc["momentum"]),
                                seed=1000 * server_round + pid)
    content = RecordDict({"arrays": ArrayRecord(task.state_arrays(model)), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)
