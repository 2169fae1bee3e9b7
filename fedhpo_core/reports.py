"""Tables and figures a run leaves behind (pandas and matplotlib; no tracking here)."""

from dataclasses import asdict

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from fedhpo_core.federation import Evaluation, RoundReport
from fedhpo_core.partition import Partition


def partition_table(partition: Partition, histogram: np.ndarray) -> pd.DataFrame:
    """A row per client: training and local validation sizes, and samples per class."""
    table = pd.DataFrame(
        {
            "client": range(partition.num_clients),
            "train_samples": [len(p) for p in partition.client_train],
            "val_samples": [len(p) for p in partition.client_val],
        }
    )
    classes = pd.DataFrame(histogram, columns=[f"class_{c}" for c in range(histogram.shape[1])])
    return pd.concat([table, classes], axis=1)


def partition_figure(histogram: np.ndarray, title: str) -> Figure:
    """Stacked bars: each client's samples, coloured by class. A bare `Figure`, not pyplot's, so
    nothing accumulates in pyplot's registry over many runs in one process."""
    clients, classes = histogram.shape
    figure = Figure(figsize=(max(6, 0.35 * clients), 4))
    axis = figure.subplots()
    bottom = np.zeros(clients)
    colours = matplotlib.colormaps["tab10" if classes <= 10 else "tab20"]
    for c in range(classes):
        axis.bar(range(clients), histogram[:, c], bottom=bottom, color=colours(c % colours.N), label=str(c))
        bottom += histogram[:, c]
    axis.set_xlabel("client")
    axis.set_ylabel("samples")
    axis.set_title(title)
    axis.legend(title="class", fontsize="small", ncol=2, bbox_to_anchor=(1.01, 1), loc="upper left")
    figure.tight_layout()
    return figure


def round_metrics(report: RoundReport, evaluation: Evaluation) -> dict[str, float]:
    """One round's metrics (MLflow step = round): the global model's curves, the clients' mean
    reports, and each sampled client's configuration as `hp/<name>/client_<i>` (the trajectory)."""
    metrics = {
        **asdict(evaluation),
        "train_loss": report.train_loss,
        "client_val_loss": report.client_val_loss,
        "client_val_acc": report.client_val_acc,
        "clients_sampled": len(report.updates),
    }
    for client, config in report.configs.items():
        for name, value in asdict(config).items():
            metrics[f"hp/{name}/client_{client}"] = value
    return metrics
