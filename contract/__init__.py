"""What the host (orchestrator) and every runner's trainer agree on: the strategy schema, the job
folder layout and the chat templates. Nothing here imports torch."""
