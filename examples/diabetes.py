"""Tabular regression with natural clients: scikit-learn's diabetes data split by age band.

442 patients, ten baseline measurements (age, sex, BMI, blood pressure, six blood serum
values) and the target: a measure of disease progression one year later. The data is bundled
with scikit-learn (nothing is downloaded). Each client is an age band, as if five clinics each
treated one age group: under 35, 35-44, 45-54, 55-64 and 65 or older (52 to 126 patients each),
so the partition is "natural": the data's own clients, with a skew in ages and outcomes.

It is a `TableTask` like any CSV named with `--task table.csv --client-column ... --target ...`:
the features are standardized with the training rows' statistics, 20% of each band is a fixed
test split, the model (an MLP with one hidden layer) trains on the standardized target, and it
is scored in the target's own units by RMSE (minimized).

Run from the repository root:

    fedhpo tune --task examples/diabetes.py --budget 80 --n-configs 8 --final-rounds 20
"""

from dataclasses import dataclass

import pandas as pd

from fedhpo_core.task import TableTask

AGE_BANDS = (0, 35, 45, 55, 65, 200)  # years; left-closed: [0, 35), [35, 45), ... [65, 200)


@dataclass(frozen=True)
class Diabetes(TableTask):
    """The diabetes table with a column `age_band` naming each patient's client; `age` stays a feature."""

    path: str = "diabetes"
    client_column: str = "age_band"
    target: str = "target"
    kind: str = "regression"

    def read(self) -> pd.DataFrame:
        from sklearn.datasets import load_diabetes

        table = load_diabetes(as_frame=True, scaled=False).frame  # ages in years, sex 1 or 2
        low, high = AGE_BANDS[:-1], AGE_BANDS[1:]
        names = [f"age_{a:02d}_{b - 1:02d}" if b < 200 else f"age_{a:02d}_plus" for a, b in zip(low, high, strict=True)]
        bands = pd.cut(table["age"], list(AGE_BANDS), right=False, labels=names)
        return table.assign(age_band=bands.astype(str))


diabetes = Diabetes()
