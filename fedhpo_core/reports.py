"""Tables and figures a run leaves behind (pandas and matplotlib; no tracking here)."""

import math
from dataclasses import fields

import matplotlib
import numpy as np
import optuna
import pandas as pd
from matplotlib.figure import Figure
from scipy import stats

from fedhpo_core.compression import SCHEMES
from fedhpo_core.federation import Evaluation, RoundReport
from fedhpo_core.partition import Partition
from fedhpo_core.personalization import OBJECTIVES, objective_key
from fedhpo_core.search.base import LINEAGE, configuration_of
from fedhpo_core.settings import ClientConfig
from fedhpo_core.task import ACCURACY, Metric


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


BARS_UP_TO = 200  # clients; more are drawn as stacked areas (a bar each would take seconds to draw)


def partition_figure(histogram: np.ndarray, title: str) -> Figure:
    """Each client's samples, coloured by class: stacked bars, or stacked areas for many clients. A
    bare `Figure`, not pyplot's, so nothing accumulates in pyplot's registry over many runs."""
    clients, classes = histogram.shape
    figure = Figure(figsize=(min(24, max(6, 0.35 * clients)), 4))
    axis = figure.subplots()
    colours = matplotlib.colormaps["tab10" if classes <= 10 else "tab20"]
    labels, colors = [str(c) for c in range(classes)], [colours(c % colours.N) for c in range(classes)]
    if clients > BARS_UP_TO:
        axis.stackplot(range(clients), histogram.T, labels=labels, colors=colors, step="mid")
    else:
        bottom = np.zeros(clients)
        for c in range(classes):
            axis.bar(range(clients), histogram[:, c], bottom=bottom, color=colors[c], label=labels[c])
            bottom += histogram[:, c]
    axis.set_xlabel("client")
    axis.set_ylabel("samples")
    axis.set_title(title)
    axis.legend(title="class", fontsize="small", ncol=2, bbox_to_anchor=(1.01, 1), loc="upper left")
    figure.tight_layout()
    return figure


def round_metrics(report: RoundReport, evaluation: Evaluation, score: str = "acc") -> dict[str, float]:
    """One round's metrics (MLflow step = round), the task's score under its name (`val_acc`,
    `val_rmse`): the global model's curves, the clients' mean
    reports, the run's simulated time so far (each round's is its increase), and what only some
    runs have: the privacy spent, and the participants that dropped out, missed the deadline or
    were left out for a non-finite upload (logged in the rounds where there were any). Who took
    part, with which configuration, is a `ConfigTrajectory`; the bytes sent are the run's total."""
    optional = {
        "epsilon": report.epsilon,
        "clients_dropped": len(report.plan.dropped) or None,
        "clients_late": len(report.plan.late) or None,
        "clients_left_out": len(report.left_out) or None,
    }
    e = evaluation
    return {
        "val_loss": e.val_loss,
        f"val_{score}": e.val_score,
        "test_loss": e.test_loss,
        f"test_{score}": e.test_score,
        "train_loss": report.train_loss,
        "client_val_loss": report.client_val_loss,
        f"client_val_{score}": report.client_val_score,
        **e.others,
        "sim_time_s": report.sim_time_s,
    } | {k: v for k, v in optional.items() if v is not None}


class ConfigTrajectory:
    """Each sampled client's configuration, round by round, kept so that what a run logs does not
    grow with its clients (MLflow draws a chart per metric key): a setting with one value for every
    client in every round is a param; a setting that varies is one long table (round, client, name,
    value), one figure, and per-round metrics `hp/<name>/mean|min|max` across the round's clients.
    Likewise the number of clients per round: a param `clients_per_round`, or where it varies (a
    tuner selecting clients) the per-round metric `clients_sampled`. A setting named by a word
    (`compression`) is kept as its position among its choices (`CODED`)."""

    CODED = {"compression": SCHEMES}

    def __init__(self):
        self.rounds: list[int] = []
        self.clients: list[np.ndarray] = []
        self.values: dict[str, list[np.ndarray]] = {}

    def record(self, report: RoundReport) -> None:
        self.rounds.append(report.round)
        self.clients.append(np.fromiter(report.configs, dtype=np.int64))
        for name in (f.name for f in fields(ClientConfig)):
            values = [getattr(config, name) for config in report.configs.values()]
            if name in self.CODED:
                values = [self.CODED[name].index(v) for v in values]
            self.values.setdefault(name, []).append(np.asarray(values, dtype=float))

    def constant(self) -> dict[str, object]:
        """Settings with one value throughout, by name, as the clients had them."""
        first = {f.name: f for f in fields(ClientConfig)}
        settings = {
            name: self.CODED[name][int(rounds[0][0])] if name in self.CODED else type(first[name].default)(rounds[0][0])
            for name, rounds in self.values.items()
            if rounds and all((values == rounds[0][0]).all() for values in rounds)
        }
        counts = {len(clients) for clients in self.clients}
        return settings | ({"clients_per_round": counts.pop()} if len(counts) == 1 else {})

    def varying(self) -> list[str]:
        """The settings that changed between clients or rounds."""
        return [name for name in self.values if name not in self.constant()]

    def table(self) -> pd.DataFrame:
        """Long format: a row per round, client and varying setting."""
        frames = [
            pd.DataFrame({"round": t, "client": clients, "name": name, "value": self.values[name][i]})
            for name in self.varying()
            for i, (t, clients) in enumerate(zip(self.rounds, self.clients, strict=True))
        ]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def summaries(self) -> dict[int, dict[str, float]]:
        """Per round: mean, min and max across the round's clients of each varying setting."""
        metrics: dict[int, dict[str, float]] = {t: {} for t in self.rounds}
        if "clients_per_round" not in self.constant():
            for t, clients in zip(self.rounds, self.clients, strict=True):
                metrics[t]["clients_sampled"] = float(len(clients))
        for name in self.varying():
            for t, values in zip(self.rounds, self.values[name], strict=True):
                metrics[t] |= {
                    f"hp/{name}/mean": float(values.mean()),
                    f"hp/{name}/min": float(values.min()),
                    f"hp/{name}/max": float(values.max()),
                }
        return metrics

    def figure(self) -> Figure:
        """Each varying setting over rounds: the clients' range and mean."""
        names = self.varying()
        figure = Figure(figsize=(6, 2.6 * max(1, len(names))))
        for axis, name in zip(figure.subplots(max(1, len(names)), 1, squeeze=False)[:, 0], names, strict=False):
            values = self.values[name]
            axis.fill_between(self.rounds, [v.min() for v in values], [v.max() for v in values], alpha=0.3)
            axis.plot(self.rounds, [v.mean() for v in values], marker=".")
            if all((v > 0).all() for v in values) and max(v.max() for v in values) > 10 * min(v.min() for v in values):
                axis.set_yscale("log")
            axis.set_ylabel(name)
        figure.axes[-1].set_xlabel("round (band: clients' range; line: mean)")
        figure.tight_layout()
        return figure


def study_table(study: optuna.Study, objectives: tuple[str, ...] = ()) -> pd.DataFrame:
    """A row per finished trial in order of completion: its score (for a pruned trial, its last
    reported one), rounds spent, lineage (PBT), system objectives and configuration as
    `params_<name>`."""
    rows = []
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    for trial in sorted((t for t in study.trials if t.state in finished), key=lambda t: t.datetime_complete):
        reported = trial.intermediate_values
        score = trial.values[0] if trial.values else (reported[max(reported)] if reported else math.nan)
        row = {"number": trial.number, "state": trial.state.name, "value": score}
        row["rounds_used"] = trial.user_attrs.get("rounds_used", 0)
        row |= {k: trial.user_attrs[k] for k in LINEAGE if k in trial.user_attrs}
        row |= dict(zip(objectives, (trial.values or [])[1:], strict=False))
        rows.append(row | {f"params_{k}": v for k, v in configuration_of(trial).items()})
    table = pd.DataFrame(rows)
    return table.set_index("number", drop=False) if rows else table


def pareto_figure(table: pd.DataFrame, front: list[int], cost: str) -> Figure:
    """Validation accuracy against one cost for every complete trial, the Pareto front's trials
    marked and joined in order of the cost."""
    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    complete = table[table.state == "COMPLETE"]
    axes.scatter(complete[cost], complete.value, color="0.7", label="trial")
    best = complete[complete.number.isin(front)].sort_values(cost)
    axes.plot(best[cost], best.value, "o-", color="C3", label="Pareto front")
    axes.set(xlabel=cost, ylabel="validation accuracy", title=f"accuracy against {cost}")
    axes.legend()
    figure.tight_layout()
    return figure


def study_figures(table: pd.DataFrame, parameters: dict, most: int = 6, maximize: bool = True) -> dict[str, Figure]:
    """Best-so-far validation score against rounds spent, and score against each setting."""
    progress = Figure(figsize=(6, 4))
    axis = progress.subplots()
    best = table.value.cummax() if maximize else table.value.cummin()
    axis.step(table.rounds_used.cumsum(), best, where="post", marker="o")
    axis.set_xlabel("communication rounds spent")
    axis.set_ylabel("best validation score so far")
    progress.tight_layout()

    names = [n for n in parameters if f"params_{n}" in table][:most]
    configs = Figure(figsize=(4 * max(1, len(names)), 3.5))
    for axis, name in zip(configs.subplots(1, max(1, len(names)), squeeze=False)[0], names, strict=False):
        axis.scatter(table[f"params_{name}"], table.value)
        if (
            getattr(parameters[name], "log", False)
            or name in ("lr", "weight_decay")
            and (table[f"params_{name}"] > 0).all()
        ):
            axis.set_xscale("log")
        axis.set_xlabel(name)
        axis.set_ylabel("validation score")
    configs.tight_layout()
    return {"best_so_far.png": progress, "configs_vs_score.png": configs}


def importance_table(study: optuna.Study, seed: int) -> pd.DataFrame:
    """How much of the variance of the validation score (a multi-objective study's first objective)
    each parameter that varied explains: Optuna's fANOVA over the complete trials, its random forest
    seeded by `seed` (the same study and seed, the same table), importances summing to 1, most
    important first. Empty where that is undefined: fewer than two distinct finite scores, or no
    parameter that took two values (Optuna would answer the first with equal shares and the second
    with fANOVA's RuntimeError "zero total variance")."""
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    scored = [trial for trial in complete if math.isfinite(trial.values[0])]
    space = optuna.search_space.intersection_search_space(scored)
    varying = [name for name in space if len({trial.params[name] for trial in scored}) > 1]
    if len({trial.values[0] for trial in scored}) < 2 or not varying:
        return pd.DataFrame({"parameter": pd.Series(dtype=str), "importance": pd.Series(dtype=float)})
    importances = optuna.importance.get_param_importances(
        study,
        evaluator=optuna.importance.FanovaImportanceEvaluator(seed=seed),
        params=varying,
        target=lambda trial: trial.values[0],
    )
    return pd.DataFrame({"parameter": list(importances), "importance": [float(v) for v in importances.values()]})


def importance_figure(table: pd.DataFrame, title: str, most: int = 20) -> Figure:
    """The `most` most important parameters of an `importance_table` as horizontal bars, the most
    important on top; a note where the table is empty."""
    shown = table.head(most).iloc[::-1]
    figure = Figure(figsize=(6, 1.5 + 0.3 * max(3, len(shown))))
    axis = figure.subplots()
    axis.barh(shown.parameter, shown.importance)
    axis.set_xlabel("importance (fANOVA, share of the validation score's variance)")
    axis.set_title(title)
    if shown.empty:
        axis.set_axis_off()
        note = "undefined: fewer than two distinct scores or no parameter varied"
        axis.text(0.5, 0.5, note, ha="center", va="center", transform=axis.transAxes)
    figure.tight_layout()
    return figure


def paired_differences(
    results: pd.DataFrame, reference: str, level: float = 0.95, metric: Metric = ACCURACY, column: str | None = None
) -> pd.DataFrame:
    """Each method against `reference` on the same seeds (the studies of a seed share its partition
    and initial model): per budget, the per-seed differences of `final_test_<score>` (method minus
    reference), their mean, a Student-t confidence interval of the mean at `level`, the exact
    two-sided Wilcoxon signed-rank p-value, and a verdict. The verdict is `better` or `worse` only
    when the interval excludes 0 (better: above it for a score to maximize, below for one to
    minimize), else `tie` (within noise); with one seed there is no interval and the verdict is
    `one seed`. With n seeds the signed-rank p is at least 2^(1-n) (0.25 for 3 seeds), so the
    interval, not p, decides. `column`: another score of the metric's direction to pair on (say
    `final_personal_acc`)."""
    column = column or f"final_test_{metric.name}"
    table = results.pivot_table(index=["budget", "seed"], columns="method", values=column)
    rows = []
    for method in dict.fromkeys(results.method):
        if method == reference:
            continue
        for budget in dict.fromkeys(results.budget):
            paired = table.loc[budget, [method, reference]].dropna()
            differences = (paired[method] - paired[reference]).sort_index()
            n, mean = len(differences), float(differences.mean())
            low = high = p_value = math.nan
            if n > 1:
                half = float(differences.std()) * stats.t.ppf((1 + level) / 2, n - 1) / math.sqrt(n)
                low, high = mean - half, mean + half
                nonzero = differences[differences != 0]
                p_value = float(stats.wilcoxon(nonzero).pvalue) if len(nonzero) else 1.0
            above, below = ("better", "worse") if metric.maximize else ("worse", "better")
            if n < 2:
                verdict = "one seed"
            elif low > 0:
                verdict = above
            elif high < 0:
                verdict = below
            else:
                verdict = "tie"
            rows.append(
                {
                    "method": method,
                    "budget": budget,
                    "reference": reference,
                    "differences": " ".join(f"s{seed}:{d:+.4f}" for seed, d in differences.items()),
                    "mean_difference": mean,
                    "ci_low": low,
                    "ci_high": high,
                    "signed_rank_p": p_value,
                    "verdict": verdict,
                }
            )
    columns = ["method", "budget", "reference", "differences", "mean_difference", "ci_low", "ci_high"]
    return pd.DataFrame(rows, columns=[*columns, "signed_rank_p", "verdict"])


def comparison_table(
    results: pd.DataFrame, reference: str | None = None, metric: Metric = ACCURACY, column: str | None = None
) -> pd.DataFrame:
    """From one row per (method, budget, seed) with `final_test_<score>` (or `column`): a row per
    method, a column per budget, "mean ± std" over seeds (the FedTune paper's Table 1 layout), and
    beside each budget the paired difference against `reference` (default: the first method) with
    its 95% interval and verdict (`paired_differences`)."""
    reference = reference or results.method.iloc[0]
    column = column or f"final_test_{metric.name}"
    stats_ = results.groupby(["method", "budget"])[column].agg(["mean", "std"]).fillna(0.0)
    cells = stats_.apply(lambda r: f"{r['mean']:.4f} ± {r['std']:.4f}", axis=1).unstack("budget")
    order = list(dict.fromkeys(results.method))
    table = cells.loc[order].rename(columns=lambda b: f"budget {b}")
    paired = paired_differences(results, reference, metric=metric, column=column)
    for budget in dict.fromkeys(results.budget):
        column = f"budget {budget}: vs {reference}"
        table[column] = "reference"
        for row in paired[paired.budget == budget].itertuples():
            interval = "" if math.isnan(row.ci_low) else f" [{row.ci_low:+.4f}, {row.ci_high:+.4f}]"
            table.loc[row.method, column] = f"{row.mean_difference:+.4f}{interval} {row.verdict}"
    return table[[c for b in dict.fromkeys(results.budget) for c in (f"budget {b}", f"budget {b}: vs {reference}")]]


def personal_columns(results: pd.DataFrame, objective: str, metric: Metric) -> list[str]:
    """The personalized scores the studies reported, the objective's first when it is one."""
    columns = [c for c in results.columns if c.startswith(f"final_personal_{metric.name}")]
    if objective in OBJECTIVES:
        first = f"final_{objective_key(objective, metric)}"
        columns = [first, *(c for c in columns if c != first)]
    return columns


def comparison_winner(results: pd.DataFrame, metric: Metric = ACCURACY) -> pd.Series | None:
    """The comparison's winner, one of `results`' rows (a study): of the method with the best mean
    `final_test_<score>` at the largest budget (what the table ranks), the study whose retrained
    model scored best on validation (`final_val_<score>`: the model is chosen without the test
    set). None when no study at that budget was retrained."""
    test, val = f"final_test_{metric.name}", f"final_val_{metric.name}"
    largest = results[(results.budget == results.budget.max()) & results[test].notna()]
    if largest.empty:
        return None
    means = largest.groupby("method", sort=False)[test].mean()
    method = means.idxmax() if metric.maximize else means.idxmin()
    studies = largest[largest.method == method]
    return studies.loc[studies[val].idxmax() if metric.maximize else studies[val].idxmin()]


def markdown_table(table: pd.DataFrame) -> str:
    header = [table.index.name or "", *map(str, table.columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = zip(table.index, table.itertuples(index=False), strict=True)  # each column's own type: ints stay ints
    lines += ["| " + " | ".join([str(i), *map(str, row)]) + " |" for i, row in rows]
    return "\n".join(lines) + "\n"


def comparison_figure(results: pd.DataFrame, metric: Metric = ACCURACY, column: str | None = None) -> Figure:
    """The test score (or `column`) after final retraining against the search budget, mean and std
    over seeds."""
    column = column or f"final_test_{metric.name}"
    figure = Figure(figsize=(6, 4))
    axis = figure.subplots()
    for method, rows in results.groupby("method", sort=False):
        summary = rows.groupby("budget")[column].agg(["mean", "std"]).fillna(0.0)
        axis.errorbar(summary.index, summary["mean"], yerr=summary["std"], marker="o", capsize=3, label=method)
    axis.set_xlabel("search budget (communication rounds)")
    axis.set_ylabel(f"{column.removeprefix('final_').replace('_', ' ')} ({metric.direction})")
    axis.legend()
    figure.tight_layout()
    return figure


def trajectory_figure(trajectory: pd.DataFrame, title: str, most: int = 12) -> Figure:
    """A round-level method's state over rounds (long format: round, client, name, value; client
    empty for the method's global state): the global series that end highest, at most `most`."""
    overall = trajectory[trajectory.client.isna()] if "client" in trajectory else trajectory
    wide = overall.pivot_table(index="round", columns="name", values="value")
    wide = wide[wide.iloc[-1].sort_values(ascending=False).index[:most]]
    figure = Figure(figsize=(7, 4))
    axis = figure.subplots()
    for name in wide.columns:
        axis.plot(wide.index, wide[name], label=name)
    axis.set_xlabel("round")
    axis.set_title(title)
    axis.legend(fontsize="x-small", ncol=2, bbox_to_anchor=(1.01, 1), loc="upper left")
    figure.tight_layout()
    return figure


def lineage_figure(table: pd.DataFrame) -> Figure:
    """Population-based training: each member's score per generation, joined to the trial it
    continued from (a line crossing between members is an exploit)."""
    figure = Figure(figsize=(7, 4))
    axis = figure.subplots()
    by_number = table.set_index("number")
    for _, row in table.iterrows():
        parent = row.get("parent_trial")
        if pd.notna(parent) and int(parent) in by_number.index:
            source = by_number.loc[int(parent)]
            copied = source["member"] != row["member"]
            axis.plot(
                [source["generation"], row["generation"]],
                [source["value"], row["value"]],
                color="tab:red" if copied else "tab:gray",
                linestyle="--" if copied else "-",
                linewidth=1,
            )
    for member, rows in table.groupby("member"):
        axis.scatter(rows["generation"], rows["value"], label=f"member {int(member)}", zorder=3)
    axis.set_xlabel("generation")
    axis.set_ylabel("validation score")
    axis.set_title("PBT lineage (dashed red: exploited another member)")
    axis.legend(fontsize="small")
    figure.tight_layout()
    return figure
