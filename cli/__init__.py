"""The `fedhpo` command line and the processes behind it: the thin client and its warm runner, the
local Prefect server commands share, signals, the progress bar and the outage lines. No domain rules."""
