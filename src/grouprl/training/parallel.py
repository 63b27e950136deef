"""How the policy's weights are laid out over the processes of a job (`train.strategy`).

- `single`: one process, nothing to do.
- `ddp`: every process holds the whole model; after a step's micro-batches the gradients
  are summed over processes (one all-reduce per parameter, as DistributedDataParallel
  does, but once per optimizer step, so processes may run different numbers of
  micro-batches).
- `fsdp2`: PyTorch's `fully_shard` (FSDP2). Each process keeps 1/N of every weight,
  gradient and optimizer state; each decoder layer is gathered for its forward and its
  gradients are reduce-scattered (summed) in backward. Forwards are collective here, so every
  process runs the same number of them (`aligned_forwards`): a process with fewer
  micro-batches runs zero-weight ones. Sampling with HF `generate` gathers the whole model
  for the sampling phase (`generation`), the way TRL gathers ZeRO-3 weights for generation.

Checkpoints are the same files under every strategy (full tensors, parameter names as one
process has them), so a run saved on N processes resumes on M, and `from_pretrained` loads
any of them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from grouprl.config import ConfigError
from grouprl.models.lora import is_adapted, load_adapter_state, load_adapter_state_sharded
from grouprl.models.whole import whole
from grouprl.registry import Registry
from grouprl.training.distributed import Dist

STRATEGIES: Registry[Any] = Registry("train.strategy")


@STRATEGIES.register("single")
class Replicated:
    """The whole model in every process (`single`, `ddp`); gradients summed over processes."""

    aligned_forwards = False
    name = "single"

    def __init__(self, dist: Dist) -> None:
        self.dist = dist

    def prepare(self, policy: nn.Module, ref_policy: nn.Module | None) -> None:
        """Start every process from process 0's weights (as DDP does): anything drawn from a
        process's own RNG at build time, such as fresh LoRA adapters, would differ."""
        self._same_start(policy, ref_policy)

    def _same_start(self, *modules: nn.Module | None) -> None:
        if not self.dist.active:
            return
        with torch.no_grad():
            for m in modules:
                if m is None:
                    continue
                for t in [*m.parameters(), *m.buffers()]:
                    self.dist.broadcast_(t.data)

    def sync_gradients(self, model: nn.Module) -> None:
        """Sum every parameter's gradient over the processes (each process's loss is its share
        of the whole batch's, normalized by the whole batch), so all of them step alike."""
        if not self.dist.active:
            return
        for p in model.parameters():
            if not p.requires_grad:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            self.dist.sum_(p.grad)

    def generation(self, policy: nn.Module) -> contextlib.AbstractContextManager[None]:
        """The weights as `generate` needs them (here: as they are)."""
        return contextlib.nullcontext()

    def model_state(self, model: nn.Module) -> dict[str, Tensor]:
        """Every weight a checkpoint keeps, whole, by its one-process name (a LoRA model's:
        its adapters; PEFT saves no more)."""
        return {k: v.detach() for k, v in _saved(model).items()}

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer's state_dict, whole tensors."""
        return optimizer.state_dict()

    def load_model_state(self, model: nn.Module, full: dict[str, Tensor]) -> Any:
        """Load whole tensors; returns the (missing, unexpected) keys. A LoRA model's are its
        adapter weights, in PEFT's format."""
        if is_adapted(model):
            return load_adapter_state(model, full)
        return model.load_state_dict(full, strict=False)

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, full: dict[str, Any]) -> None:
        optimizer.load_state_dict(full)


STRATEGIES.register("ddp")(Replicated)


@STRATEGIES.register("fsdp2")
class FullyShard(Replicated):
    """Each process keeps 1/N of every weight, gradient and AdamW moment (FSDP2's
    `fully_shard`, one unit per decoder layer); forwards aligned; gathered for sampling."""

    aligned_forwards = True

    def __init__(self, dist: Dist) -> None:
        super().__init__(dist)
        self.roots: list[nn.Module] = []

    def prepare(self, policy: nn.Module, ref_policy: nn.Module | None) -> None:
        """Shard each decoder layer, then the rest under the `PolicyLogProbs` root, whose
        forward is the one every training forward goes through (so the embeddings, final
        norm and LM head it calls directly are gathered too). The reference is sharded the
        same way."""
        from torch.distributed.device_mesh import init_device_mesh

        try:
            from torch.distributed.fsdp import FSDPModule, fully_shard
        except ImportError:
            fully_shard = None
        if fully_shard is None or not hasattr(FSDPModule, "set_force_sum_reduction_for_comms"):
            raise ConfigError(
                f"train.strategy: fsdp2 needs a torch whose fully_shard can force sum "
                f"reductions (2.13 is the tested release; this is {torch.__version__}); "
                "use train.strategy: ddp"
            )

        self._same_start(policy, ref_policy)  # before sharding: shards of one model
        device = next(policy.parameters()).device
        mesh = init_device_mesh(device.type, (self.dist.world,))
        for root in (policy, ref_policy):
            if root is None:
                continue
            for layer in decoder_layers(root):
                fully_shard(layer, mesh=mesh)
            fully_shard(root, mesh=mesh)
            # sum, not mean, over processes (each loss is already its share of the
            # batch's), set on every sharded unit; gloo has no pre-multiplied sum, so a
            # plain SUM reduction is forced
            for unit in root.modules():
                if isinstance(unit, FSDPModule):
                    unit.set_gradient_divide_factor(1.0)
                    unit.set_force_sum_reduction_for_comms(True)
            # FSDP initializes from the first forward through the root; `generate` calls
            # the model inside it, so run one (one token) before any sampling does
            one = torch.ones(1, 1, dtype=torch.long, device=device)
            with torch.no_grad():
                root(one, one, one, one)
            self.roots.append(root)
        self._reshard()

    def _reshard(self) -> None:
        """Back to the shards. The root stays gathered after a forward without backward, and
        then `parameters()` / `state_dict()` would name its gathered copies, not the
        sharded parameters the optimizer steps."""
        for root in self.roots:
            root.reshard()

    def sync_gradients(self, model: nn.Module) -> None:
        """Done by FSDP's reduce-scatter in each backward."""

    @contextlib.contextmanager
    def generation(self, policy: nn.Module) -> Iterator[None]:
        """Gather the whole policy for a sampling phase (every process enters it, at the same
        point), keep it gathered across generate's many forwards, shard it again after."""
        from torch.distributed.fsdp import FSDPModule

        mods = [m for m in policy.modules() if isinstance(m, FSDPModule)]
        layers = [m for m in mods if m is not policy]
        for m in mods:
            m.unshard()
        for m in layers:
            m.set_reshard_after_forward(False)
        try:
            yield
        finally:
            for m in layers:
                m.set_reshard_after_forward(True)
            for m in mods:
                m.reshard()

    def model_state(self, model: nn.Module) -> dict[str, Tensor]:
        """Collective: whole tensors on process 0's CPU, one at a time (every process takes
        part in each gather; the others keep nothing), so no device holds the whole model."""
        self._reshard()
        return {k: t for k, v in _saved(model).items() if (t := self._to_main(v)) is not None}

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        self._reshard()
        sd = optimizer.state_dict()
        state = {i: {k: self._to_main(v) for k, v in s.items()} for i, s in sd["state"].items()}
        return {"state": state, "param_groups": sd["param_groups"]} if self.dist.is_main else {}

    def _to_main(self, v: Any) -> Any:
        t = whole(v)
        if not self.dist.is_main:
            return None
        return t.detach().cpu() if isinstance(t, Tensor) else t

    def load_model_state(self, model: nn.Module, full: dict[str, Tensor]) -> Any:
        """Whole tensors cut to this process's shards (each process has read the files, so
        no tensor is sent)."""
        self._reshard()
        if is_adapted(model):
            return load_adapter_state_sharded(model, full, _shard_like)
        target = model.state_dict()
        return model.load_state_dict(
            {k: _shard_like(v, target[k]) if k in target else v for k, v in full.items()},
            strict=False,
        )

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, full: dict[str, Any]) -> None:
        self._reshard()
        params = [p for g in optimizer.param_groups for p in g["params"]]
        state = {
            i: {
                k: _shard_like(v, params[int(i)]) if isinstance(v, Tensor) and v.dim() else v
                for k, v in s.items()
            }
            for i, s in full["state"].items()
        }
        optimizer.load_state_dict({"state": state, "param_groups": full["param_groups"]})


def _saved(model: nn.Module) -> dict[str, Any]:
    """The state a checkpoint keeps: everything, or a LoRA model's adapter weights."""
    sd = model.state_dict()
    if is_adapted(model):
        return {k: v for k, v in sd.items() if ".lora_" in k or ".modules_to_save." in k}
    return sd


def _shard_like(full: Tensor, like: Any) -> Any:
    """`full` laid out as `like` (a DTensor parameter or state), or as is."""
    mesh = getattr(like, "device_mesh", None)
    if mesh is None:
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device), mesh, like.placements, src_data_rank=None)


def decoder_layers(module: nn.Module) -> list[nn.Module]:
    """The units to shard one by one: the modules the model names as not to be split
    (`_no_split_modules`, the decoder layers of every HF model), else the entries of its
    longest `nn.ModuleList`."""
    names: set[str] = set()
    for m in module.modules():
        names |= set(getattr(m, "_no_split_modules", None) or ())
    layers = [m for m in module.modules() if type(m).__name__ in names]
    if layers:
        return layers
    lists = [m for m in module.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def build_strategy(name: str, dist: Dist) -> Replicated:
    """The layout for `train.strategy` (auto: ddp with several processes, else single)."""
    if name == "auto" or not dist.active:
        name = "ddp" if dist.active else "single"
    strategy = STRATEGIES.get(name)(dist)
    strategy.name = name
    return strategy
