"""Flower ServerApp: FedAvg over every SuperNode each round, the global model evaluated on the fixed test
split after every round. Each evaluation is appended to `eval-log` (JSON lines with the wall-clock time),
which is how vs_flower.py draws the accuracy curve and finds the time and bytes to the target."""

from __future__ import annotations

import json
import time

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from snakeflower import task

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    model = task.build_model(task.job_like(str(rc["model"]), str(rc["model-args"]), int(rc["model-seed"])))
    x_test, y_test = task.test_arrays(str(rc["dataset"]))
    log_path = str(rc["eval-log"])
    parts = int(rc["num-partitions"])

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        m = task.evaluate(model, x_test, y_test)
        if log_path:
            with open(log_path, "a") as f:
                f.write(json.dumps({"round": server_round, "t": time.time(), **m}) + "\n")
        return MetricRecord(m)

    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=parts,
                      min_available_nodes=parts)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(task.state_arrays(model)),
                   num_rounds=int(rc["num-server-rounds"]), train_config=ConfigRecord({}), evaluate_fn=evaluate)
