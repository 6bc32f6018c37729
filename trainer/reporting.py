"""Where training metrics go: always metrics.jsonl (the job folder contract), and TensorBoard event
files in the job's tensorboard/ folder when the strategy says `report_to: tensorboard`."""

from __future__ import annotations

from pathlib import Path

from contract.job_folder import append_metrics

TENSORBOARD_DIR = "tensorboard"


class MetricsSink:
    def __init__(self, job_dir: Path, report_to: str):
        self.job_dir = job_dir
        self.writer = None
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(job_dir / TENSORBOARD_DIR))

    def log(self, record: dict) -> None:
        append_metrics(self.job_dir, record)
        if self.writer:
            for key, value in record.items():
                if key not in ("step", "total_steps") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{'eval' if key.startswith('eval_') else 'train'}/{key}", value, record["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer:
            self.writer.close()
