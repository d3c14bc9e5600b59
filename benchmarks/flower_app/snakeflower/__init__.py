"""FedAvg with Flower on snakenode's benchmark task (see benchmarks/vs_flower.py)."""
