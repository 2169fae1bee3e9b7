"""Trial-level hyperparameter search: each configuration is trained, scored on validation data
and compared, under one budget counted in communication rounds. A module per family of methods."""
