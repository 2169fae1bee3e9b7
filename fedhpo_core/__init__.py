"""fedhpo's plain library: data, partitioning, models, client update, aggregation, round loop.

Nothing here imports Prefect; experiment tracking lives behind `fedhpo_core.tracking`.
"""
