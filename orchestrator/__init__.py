"""Host side of llamafarm: the `llamafarm` CLI, strategy loading, runner choice, the job registry and
the monitor. Nothing here imports torch; training happens in the `trainer` package, started by a runner."""
