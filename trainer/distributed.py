"""One job, many processes: which process this is, and the few collective steps training needs.

PyTorch's launcher (torch.distributed.run, started by the runner; see orchestrator/launcher.py)
starts the one entrypoint once per process and tells each its place through RANK, LOCAL_RANK and
WORLD_SIZE. Everything distributed lives here, behind `World`:

- the model is wrapped (DDP: a whole copy per process, gradients averaged; FSDP: weights, gradients and
  optimizer state sharded by decoder layer), and each process takes its share of every step's batch;
- local rank 0 of each machine writes that machine's job folder (status, metrics, checkpoints, final
  weights); the values it writes are reduced over all processes, so every machine's folder holds the
  same record;
- a process that fails marks the job failed with its own error, unless another rank's failure was
  recorded first (the launcher then ends the others).

A single-process job gets `World()`, whose methods do nothing and never import torch.distributed.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

from contract.errors import UserError
from contract.strategy import DistributedSpec
from contract.decisions import Decision

# The chunked loss calls the model's inner modules directly, which would bypass the DDP/FSDP wrapper's
# forward (and so its gradient synchronisation).
NO_CHUNKED_LOSS = Decision("off", "distributed: the wrapped model must run its own forward to synchronise gradients")


@dataclass(frozen=True)
class Role:
    """This process's place, from the launcher's environment (no torch needed)."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1
    launched: bool = False

    @classmethod
    def from_env(cls) -> "Role":
        env = os.environ
        if "LOCAL_RANK" not in env or "WORLD_SIZE" not in env:
            return cls()
        return cls(int(env.get("RANK", "0")), int(env["LOCAL_RANK"]), int(env["WORLD_SIZE"]), True)

    @property
    def writes(self) -> bool:
        """Local rank 0 writes its machine's job folder; the other processes write nothing."""
        return self.local_rank == 0


@dataclass
class World:
    mode: str = "none"
    rank: int = 0
    local_rank: int = 0
    size: int = 1
    comm_device: str = "cpu"

    @property
    def active(self) -> bool:
        return self.mode != "none"

    @property
    def writes(self) -> bool:
        return self.local_rank == 0

    # --- collectives (no-ops for one process) ------------------------------------------------------

    def sum(self, *values: float) -> list[float]:
        """Each value summed over all processes."""
        if not self.active:
            return list(values)
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every process when it is true on one (e.g. a stop request), so all act at the same step."""
        return bool(self.sum(float(flag))[0]) if self.active else flag

    def gather(self, obj) -> list:
        """Every process's `obj`, in rank order, on every process."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    @contextmanager
    def local_first(self):
        """Local rank 0 of each machine does the block first (building a builtin model, filling the
        token cache), the other processes after it, reading what it left."""
        if self.active and not self.writes:
            self.barrier()
        yield
        if self.active and self.writes:
            self.barrier()

    # --- the model ---------------------------------------------------------------------------------

    def wrap(self, model, device: str):
        """The model the loop trains: DDP or FSDP around it, or the model itself."""
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            return DistributedDataParallel(model, device_ids=[self.local_rank] if device == "cuda" else None)
        if self.mode == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(device, (self.size,))
            for layer in decoder_layers(model):
                fully_shard(layer, mesh=mesh)  # one all-gather per layer: only one layer is whole at a time
            fully_shard(model, mesh=mesh)  # embeddings, final norm and head
            return model
        return model

    def sync_gradients(self, model, sync: bool):
        """Context for one micro-batch's backward: gradient accumulation without communication until
        the step's last micro-batch."""
        if self.mode == "ddp" and not sync:
            return model.no_sync()
        if self.mode == "fsdp":
            model.set_requires_gradient_sync(sync)
        return nullcontext()

    def full_state_dict(self, model) -> dict | None:
        """FSDP: the whole weights, gathered one tensor at a time and kept (on the CPU) only by the
        processes that write; other modes: None, meaning the model's own state dict."""
        if self.mode != "fsdp":
            return None
        from torch.distributed.tensor import DTensor

        state = {}
        for name, tensor in model.state_dict().items():
            full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor  # a collective: every rank
            if self.writes:
                state[name] = full.detach().cpu()
        return state

    def close(self) -> None:
        if self.active:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def decoder_layers(model) -> list:
    """The repeated blocks FSDP shards one by one: the classes a transformers model names in
    `_no_split_modules` (e.g. LlamaDecoderLayer), found under any PEFT wrapper."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(inner, "_no_split_modules", None) or [])
    layers = [m for m in inner.modules() if type(m).__name__ in names]
    if not layers:
        raise UserError(f"distributed.mode fsdp: cannot find the decoder layers of {type(inner).__name__} "
                        "(it names none in _no_split_modules); use mode ddp")
    return layers


class NullSink:
    """The metrics sink of processes that do not write."""

    def log(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def join(spec: DistributedSpec, device: str, planned: Decision | None) -> World:
    """Join the other processes of this job (or check that there are none) the way the plan says."""
    role = Role.from_env()
    if spec.mode == "none":
        if role.launched and role.size > 1:
            raise UserError(f"this process was started as one of {role.size} by a distributed launcher, but the "
                            "strategy's distributed.mode is none; set distributed.mode ddp or fsdp, or start one process")
        return World()
    if not role.launched:
        raise UserError(f"distributed.mode {spec.mode} needs PyTorch's launcher: start the job with "
                        "`llamafarm finetune start` (its runner wraps the trainer in torch.distributed.run)")
    expected = spec.nproc_per_node * spec.nnodes
    if role.size != expected:
        raise UserError(f"the launcher started {role.size} processes, but distributed.nproc_per_node x nnodes "
                        f"= {spec.nproc_per_node} x {spec.nnodes} = {expected}")
    backend = planned.value["backend"]
    import torch
    import torch.distributed as dist

    comm_device = "cpu"
    if device == "cuda":
        if role.local_rank >= torch.cuda.device_count():
            raise UserError(f"distributed.nproc_per_node is {spec.nproc_per_node} but this machine has "
                            f"{torch.cuda.device_count()} GPUs; use one process per GPU")
        torch.cuda.set_device(role.local_rank)  # "cuda" in the rest of the trainer means this GPU
        comm_device = "cuda" if backend == "nccl" else "cpu"
    dist.init_process_group(backend=backend)
    world = World(spec.mode, role.rank, role.local_rank, role.size, comm_device)
    print(f"distributed: this is rank {role.rank} of {role.size}, local rank {role.local_rank}", flush=True)
    return world


def quiet_unless_writer(role: Role) -> None:
    """Processes that do not write send their ordinary output nowhere, so train.log reads like one
    process's; errors still reach stderr."""
    if not role.writes:
        sys.stdout = open(os.devnull, "w")
