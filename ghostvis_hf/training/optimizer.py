"""The recipes' optimizer: per-part learning rates (LLaVA's `mm_vision_tower_lr` / `mm_projector_lr`) as AdamW
parameter groups, and bf16 parameters with fp32 master weights (issue 16).

Master weights: the model's parameters and activations are bf16, so the forward and backward run without autocast
and without casting every fp32 weight to bf16 at every step (15 % of the kernel time in docs/benchmarks/
train_profile.txt); the optimizer keeps an fp32 copy of every bf16 parameter and its fp32 state, steps the copies
with the gradients upcast, and writes them back rounded to bf16: the Megatron / DeepSpeed bf16-optimizer scheme. On
CUDA one multi-tensor Triton kernel does all three (`kernels.adamw`); elsewhere torch's own AdamW steps the copies.
The copies are in the optimizer's `state_dict` (`master_weight`), so a resumed run continues exactly.

NOTE: why our own (about 100 lines): torch, accelerate, transformers and TRL have no master-weight optimizer for
unsharded training; DeepSpeed's `BF16_Optimizer` lives inside the DeepSpeed engine (use it through the ZeRO
configs); FSDP2's `MixedPrecisionPolicy` is for sharded runs and casts the fp32 shards at every step; torchao's
bf16 AdamW (stochastic rounding) and transformers' `adamw_anyprecision` (Kahan summation) keep no fp32 weights.
So: single GPU, DDP and FSDP2 (where the model is bf16 before `fully_shard`, accelerate's mixed precision is off, and
the masters are fp32 shards of FSDP2's bf16 DTensor shards: what FSDP2's own policy would do with one fp32 -> bf16
cast of every unit at every step). Gradients stay bf16 on the parameters (what autograd, DDP, FSDP2's
reduce-scatter and the Trainer's clipping expect): they are clipped, and with gradient accumulation summed, in bf16.
"""

import functools
import logging
from collections import defaultdict

import torch

from ..kernels.master_bits import join_master, split_master
from ..kernels.residual import fp32_residual_stream
from .arguments import GhostVisArguments
from .launch import fsdp_version, sharded_by

logger = logging.getLogger("ghostvis")


class MasterWeightOptimizer(torch.optim.Optimizer):
    """Steps fp32 master copies of low-precision parameters with an fp32 optimizer and writes them back.

    Args:
        params: parameters or parameter groups, as for any torch optimizer.
        optimizer_cls (`type`, *optional*, defaults to `torch.optim.AdamW`): the optimizer run on the fp32 copies.
        param_dtype (`torch.dtype`, *optional*): cast the parameters to this dtype after taking their fp32 copies
            (e.g. `torch.bfloat16` on an fp32 model). Without it, fp32 parameters are their own master weights
            (the wrapper is then exactly `optimizer_cls`) and others get an fp32 copy.
        kernel (`str`, *optional*, defaults to `"auto"`): `"triton"`: step AdamW with `kernels.adamw`'s fused
            master-weight kernel (one pass: bf16 gradient in, fp32 master and moments updated, bf16 parameter
            written; one launch per parameter group); `"torch"`: cast the gradients, run `optimizer_cls`, copy
            back; `"auto"`: `"triton"` for `torch.optim.AdamW` on CUDA parameters with Triton installed, else
            `"torch"`. Both keep the same
            state (a run resumes on either).
        lazy (`bool`, *optional*, defaults to `False`): make the fp32 copies at the first step (from the parameters
            as they are then: the bf16 DTensor shards under FSDP2, which accelerate swaps into `param_groups` after
            the optimizer is made) instead of now. Parameters swapped after the first step are refused.
        compact (`bool`, *optional*, defaults to `False`): keep each fp32 master as the bf16 parameter's bits plus a
            16-bit remainder (`kernels.master_bits.split_master`): the same fp32 master, exactly, in 2 bytes a parameter
            instead of 4 (the parameter is then the master rounded to nearest with ties away from zero). AdamW with
            bf16 parameters through the fused kernel only (CUDA, or `kernel="triton"`); not with `lazy`. State dicts
            hold the fp32 masters, as without it: a run resumes either way.
        **kwargs: the hyperparameters of `optimizer_cls` (`lr`, `betas`, `weight_decay`, `fused`, ...).

    The LR scheduler and the Trainer see this optimizer's `param_groups` (the model's parameters); their
    hyperparameters are copied to the inner optimizer at every step.
    """

    def __init__(self, params, optimizer_cls=torch.optim.AdamW, param_dtype: torch.dtype | None = None,
                 kernel: str = "auto", lazy: bool = False, compact: bool = False, **kwargs):
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        groups = [{**g, "params": list(g["params"])} for g in groups]
        if kernel not in ("auto", "triton", "torch"):
            raise ValueError(f"kernel must be auto, triton or torch, got {kernel!r}")
        if kernel == "triton" and optimizer_cls is not torch.optim.AdamW:
            raise ValueError("kernel='triton' steps AdamW; optimizer_cls is " + optimizer_cls.__name__)
        if compact:
            if optimizer_cls is not torch.optim.AdamW or kernel == "torch" or lazy:
                raise ValueError("compact master weights step AdamW through the fused kernel, made now (not lazy)")
            if kwargs.get("amsgrad") or kwargs.get("maximize"):
                raise ValueError("compact master weights: the fused kernel has no amsgrad / maximize")
            if (param_dtype or torch.bfloat16) != torch.bfloat16:
                raise ValueError("compact master weights go with bfloat16 parameters")
            kwargs = {k: v for k, v in kwargs.items() if k not in ("fused", "foreach")}  # int16 masters: never torch's
        self._optimizer_cls, self._kwargs, self._param_dtype = optimizer_cls, kwargs, param_dtype
        self.compact = compact
        self._params = [p for g in groups for p in g["params"]]
        self._masters = [self._master_of(p, placeholder=lazy) for p in self._params]
        if param_dtype is not None and not compact:
            for p in self._params:
                p.data = p.data.to(param_dtype)
        masters = iter(self._masters)
        self.optimizer = optimizer_cls([{**g, "params": [next(masters) for _ in g["params"]]} for g in groups],
                                       **kwargs)
        super().__init__([{**_hyper(ig), "params": g["params"]} for g, ig in zip(groups, self.optimizer.param_groups)],
                         self.optimizer.defaults)
        self.kernel = kernel
        self._adamw = optimizer_cls is torch.optim.AdamW
        self._host_steps: dict[int, int] = {}  # master id -> AdamW step count, read once from the state
        self._local_views: dict[int, tuple] = {}  # master id -> the kernel's tensors (`_views_of`)
        self._param_of = {id(m): p for p, m in zip(self._params, self._masters)}  # masters keep their identity

    def _master_of(self, p, placeholder: bool = False):
        """`p` itself where it is fp32 and no `param_dtype` is set, else an fp32 copy (on the meta device as a
        placeholder: `lazy=True` makes the copies at the first step, from the parameters as they are then)."""
        if self._param_dtype in (None, torch.float32) and p.dtype == torch.float32 and not self.compact:
            return p
        if placeholder:
            return torch.nn.Parameter(torch.empty(p.shape, dtype=torch.float32, device="meta"))
        if self.compact:  # the parameter becomes the master's upper bits, this its remainder
            high, low = split_master(p.detach().to(torch.float32))
            p.data = high
            return torch.nn.Parameter(low, requires_grad=False)
        return torch.nn.Parameter(p.detach().to(torch.float32, copy=True))

    def _bind(self) -> None:
        """Makes the fp32 copies anew when `param_groups` holds other parameters than the ones they were made for
        (accelerate's FSDP2 `prepare` swaps every parameter for its sharded DTensor after the optimizer exists) or
        when they are `lazy`'s placeholders. The copies then start from the parameters as they are (bf16 under
        FSDP2: as DeepSpeed's bf16 optimizer makes its fp32 partitions from the bf16 model). Refused once stepped."""
        current = [p for g in self.param_groups for p in g["params"]]
        same = len(current) == len(self._params) and all(a is b for a, b in zip(current, self._params))
        if same and not any(m.is_meta for m in self._masters):
            return
        if any(self.optimizer.state.values()):
            raise RuntimeError("MasterWeightOptimizer: the parameters were replaced after the optimizer stepped; its "
                               "fp32 master weights and AdamW state belong to the old ones")
        self._params = current
        self._masters = [self._master_of(p) for p in current]
        masters = iter(self._masters)
        self.optimizer = self._optimizer_cls(
            [{**_hyper(g), "params": [next(masters) for _ in g["params"]]} for g in self.param_groups], **self._kwargs)
        self._host_steps.clear()
        self._local_views.clear()
        self._param_of = {id(m): p for p, m in zip(self._params, self._masters)}
        self.state = defaultdict(dict)

    def _mirror_state(self, force: bool = False) -> None:
        """The inner optimizer's state, also under the model's parameters in `self.state`: code that looks there
        (torch.distributed.checkpoint's optimizer state dict, which steps an optimizer whose `state` is empty)
        sees a stepped optimizer as stepped."""
        if force or len(self.state) != len(self.optimizer.state):
            self.state = defaultdict(dict, {p: self.optimizer.state[m] for p, m in zip(self._params, self._masters)
                                            if m in self.optimizer.state})

    def _low_precision(self):
        return [(p, m) for p, m in zip(self._params, self._masters) if m is not p]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._bind()
        for group, inner in zip(self.param_groups, self.optimizer.param_groups):
            inner.update(_hyper(group))  # lr from the scheduler, etc.
        if self.uses_kernel and self._kernel_step():
            self._mirror_state()
            return loss
        if self.compact:
            raise RuntimeError("compact master weights step through the fused Triton kernel only (AdamW on CUDA, or "
                               "kernel='triton'); these parameters are not stepped there (not on CUDA, or a "
                               "non-contiguous or sparse gradient)")
        stepped = []
        for p, m in self._low_precision():
            if m.device != p.device:  # the model moved after the optimizer was made
                self._move(m, p.device)
            m.grad = None if p.grad is None else p.grad.to(torch.float32)
            if m.grad is not None:
                stepped.append((p, m))
        self.optimizer.step()
        if stepped:
            torch._foreach_copy_([_local(p.data) for p, _ in stepped], [_local(m.data) for _, m in stepped])  # round
            for _, m in stepped:
                m.grad = None
        self._mirror_state()
        return loss

    @property
    def uses_kernel(self) -> bool:
        """Whether steps run the fused kernel: `kernel="triton"`, or `"auto"` with AdamW on CUDA parameters (decided
        at each step: the recipes build the optimizer before the trainer moves the model to the GPU)."""
        if self.kernel == "auto":
            return self._adamw and bool(self._params) and self._params[0].is_cuda and _has_triton()
        return self.kernel == "triton"

    def _kernel_step(self) -> bool:
        """AdamW through `kernels.adamw.adamw_master_step`, on the inner AdamW's own state; `False` (nothing done)
        where it does not apply (amsgrad, maximize, sparse or non-contiguous tensors): the torch path runs then.

        The step is on the host's critical path (the training step is bound by the host), so each parameter's local
        tensors (parameter, master, moments: DTensor shards under FSDP2, where every `.data` or `.detach()` costs a
        DTensor dispatch) are looked up once and kept (`_local_views`); a step only reads the gradients."""
        from ..kernels.adamw import adamw_master_step

        work = []
        for inner in self.optimizer.param_groups:
            if inner.get("amsgrad") or inner.get("maximize") or inner.get("differentiable"):
                return False
            for m in inner["params"]:
                p = self._param_of[id(m)]
                if p.grad is None:
                    continue
                grad = _local(p.grad)
                if grad.is_sparse or not grad.is_contiguous():
                    return False
                views = self._local_views.get(id(m))
                if views is None or (views[5] and (p.data_ptr() != views[0].data_ptr()
                                                   or m.data_ptr() != views[1].data_ptr())):
                    views = self._views_of(inner, p, m)  # first step, or the tensors were replaced (.data =, .to)
                    if views is None:
                        return False
                work.append((inner, p, m, grad, views))
        launches, steps = {}, []
        for inner, p, m, grad, (param, master, exp_avg, exp_avg_sq, step, _) in work:
            self._host_steps[id(m)] += 1
            steps.append(step)
            if not param.numel():  # an FSDP2 shard can be empty on some ranks
                continue
            lists = launches.setdefault((id(inner), param.dtype, grad.dtype, param.device),
                                        (inner, [], [], [], [], [], []))
            for dst, t in zip(lists[1:], (param, grad, master, exp_avg, exp_avg_sq, self._host_steps[id(m)])):
                dst.append(t)
        for inner, *lists in launches.values():  # one launch per parameter group and dtype
            beta1, beta2 = inner["betas"]
            adamw_master_step(*lists, float(inner["lr"]), beta1, beta2, inner["eps"], inner["weight_decay"])
        if steps:
            torch._foreach_add_(steps, 1.0)
        return True

    def _views_of(self, inner, p, m):
        """(parameter, master, exp_avg, exp_avg_sq) as local contiguous tensors, the step counter and whether to
        check the parameter's address each step (plain tensors; FSDP2 keeps its shards' storage); the AdamW state
        is made as torch's AdamW makes it on its first step. `None` if a tensor is not contiguous."""
        if m.device != p.device:
            self._move(m, p.device)
        state = self.optimizer.state[m]
        if not state:
            on_device = inner.get("fused") or inner.get("capturable")
            state["step"] = torch.zeros((), dtype=torch.float32, device=m.device if on_device else "cpu")
            # fp32 moments also for compact (int16) masters
            state["exp_avg"] = torch.zeros_like(m, dtype=torch.float32, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(m, dtype=torch.float32, memory_format=torch.preserve_format)
        if id(m) not in self._host_steps:
            self._host_steps[id(m)] = int(state["step"])  # one sync per tensor, at the first step or resume
        tensors = [_local(t) for t in (p.data, m.data, state["exp_avg"], state["exp_avg_sq"])]
        if not all(t.is_contiguous() for t in tensors):
            return None
        views = (*tensors, state["step"], not _is_dtensor(p))
        self._local_views[id(m)] = views
        return views

    def _move(self, master, device):
        self._local_views.pop(id(master), None)
        master.data = master.data.to(device)
        group = next(g for g in self.optimizer.param_groups if any(q is master for q in g["params"]))
        keep_step_on_cpu = not (group.get("fused") or group.get("capturable"))
        for k, v in self.optimizer.state.get(master, {}).items():
            if torch.is_tensor(v) and not (k == "step" and keep_step_on_cpu):
                self.optimizer.state[master][k] = v.to(device)

    def state_dict(self):
        """The inner optimizer's state dict, with each low-precision parameter's fp32 copy as `master_weight`."""
        self._bind()
        sd = self.optimizer.state_dict()
        sd["param_groups"] = [{**_hyper(g), "params": ig["params"]}
                              for g, ig in zip(self.param_groups, sd["param_groups"])]
        for i, (p, m) in enumerate(zip(self._params, self._masters)):
            if m is not p:
                master = join_master(p.detach(), m.detach()) if self.compact else m.detach()
                sd["state"][i] = {**sd["state"].get(i, {}), "master_weight": master}
        return sd

    @torch.no_grad()
    def load_state_dict(self, state_dict):
        """Like torch's: the saved parameters are matched by position in `param_groups` (their keys may be indices
        or, from torch.distributed.checkpoint, parameter names)."""
        self._bind()
        position = {key: i for i, key in enumerate(k for g in state_dict["param_groups"] for k in g["params"])}
        state = {}
        for key, s in state_dict["state"].items():
            s = dict(s)
            master = s.pop("master_weight", None)
            if master is not None:
                p, m = self._params[position[key]], self._masters[position[key]]
                if self.compact:
                    high, low = split_master(master.to(device=p.device, dtype=torch.float32))
                    m.data = low
                    p.copy_(high)
                elif m is not p:
                    if _is_dtensor(m):  # in place: a DTensor's `.data =` leaves `to_local()` on the old shard
                        m.copy_(master)
                    else:
                        m.data = master.to(device=p.device, dtype=torch.float32, copy=True)
                    p.copy_(m)
            if s:
                state[key] = s
        self._host_steps.clear()  # re-read from the loaded state
        self._local_views.clear()  # the loaded moments are new tensors
        self.optimizer.load_state_dict({"state": state, "param_groups": state_dict["param_groups"]})
        for group, inner in zip(self.param_groups, self.optimizer.param_groups):
            group.update(_hyper(inner))
        self._mirror_state(force=True)

    @property
    def master_weights(self) -> list[torch.Tensor]:
        """The fp32 weights, one per parameter (the parameter itself where it is fp32 and `param_dtype` unset; new
        fp32 tensors from the parameter and its remainder with `compact`)."""
        self._bind()
        if self.compact:
            return [join_master(p.detach(), m.detach()) for p, m in zip(self._params, self._masters)]
        return list(self._masters)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2's parameters, their gradients, the masters and moments made from
    them; in place under `no_grad`), else `t`."""
    return t.to_local() if _is_dtensor(t) else t


def _is_dtensor(t) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


@functools.cache
def _has_triton() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def _hyper(group: dict) -> dict:
    return {k: v for k, v in group.items() if k != "params"}


def cast_parameters(model, dtype: torch.dtype) -> None:
    """Casts the model's floating-point parameters (not its buffers: RoPE frequencies stay fp32) to `dtype`."""
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


def resolve_precision(model, training_args, args: GhostVisArguments, use_peft: bool = False) -> str:
    """`"bf16_master"` or `"autocast"` from `args.precision` (`auto` | `bf16_master` | `autocast`).

    `auto` means bf16 + master weights where they apply (CUDA, `--bf16`, AdamW, one GPU, DDP or FSDP2 (bf16
    shards, fp32 master shards in the optimizer), no LoRA or quantized model, no gradient accumulation) and the
    Trainer's autocast elsewhere (DeepSpeed keeps its own bf16 master partitions); `bf16_master` refuses the cases it
    does not cover, and warns with gradient accumulation (the micro-batches' gradients are summed in bf16: not what
    docs/benchmarks/precision_curve.md measured). Under FSDP2 on 2x H200 it ran 31,544 tok/s where FSDP's own
    mixed-precision policy (fp32 shards cast at every all-gather) had run 25,353 in an earlier call with the same
    command (docs/benchmarks/scaling_fsdp2.md).
    """
    precision = getattr(args, "precision", "autocast")
    if precision not in ("auto", "bf16_master", "autocast"):
        raise ValueError(f"precision must be auto, bf16_master or autocast, got {precision!r}")
    if precision == "autocast":
        return precision
    # launchers that keep the master weights themselves (under FSDP2 the masters are fp32 shards of its bf16 shards)
    sharded = None if fsdp_version(training_args) == 2 else {
        "DeepSpeed": "DeepSpeed (its bf16 optimizer)", "FSDP": "FSDP (its MixedPrecisionPolicy)"}.get(
        sharded_by(training_args))
    problems = [why for bad, why in (
        (sharded is not None, f"this sharded run keeps master weights in {sharded}"),
        (use_peft, "LoRA trains adapters the trainer adds later"),
        (getattr(model, "is_quantized", False), "the model is quantized"),
        (training_args.optim not in ("adamw_torch", "adamw_torch_fused"), f"optim={training_args.optim!r}"),
    ) if bad]
    accumulates = getattr(training_args, "gradient_accumulation_steps", 1) > 1
    if precision == "bf16_master":
        if problems:
            raise ValueError("precision=bf16_master does not apply: " + "; ".join(problems))
        if accumulates:
            logger.warning("precision=bf16_master with gradient_accumulation_steps=%d: the micro-batches' bf16 "
                           "gradients are summed in bf16 (autocast sums fp32 ones)",
                           training_args.gradient_accumulation_steps)
        return precision
    on_gpu_bf16 = getattr(training_args, "bf16", False) and torch.cuda.is_available()
    return "bf16_master" if on_gpu_bf16 and not problems and not accumulates else "autocast"


def precision_of(trainer) -> str:
    """What a finished run trained in, for run summaries: `"bf16_master"` (our optimizer kept the master weights),
    `"deepspeed_bf16"` / `"deepspeed_fp16"` (DeepSpeed's low-precision weights with fp32 master partitions),
    `"fsdp_bf16"` / `"fsdp_fp16"` (FSDP's mixed-precision policy), `"bf16"` / `"fp16"` (the Trainer's autocast) or
    `"fp32"`."""
    optimizer = getattr(trainer, "optimizer", None)
    if isinstance(getattr(optimizer, "optimizer", optimizer), MasterWeightOptimizer):  # accelerate wraps it
        return "bf16_master"
    low = "bf16" if trainer.args.bf16 else "fp16" if trainer.args.fp16 else None
    if low is None:
        return "fp32"
    if getattr(trainer, "is_deepspeed_enabled", False):
        return f"deepspeed_{low}"
    if getattr(trainer, "is_fsdp_enabled", False):
        return f"fsdp_{low}"
    return low


def _param_groups(model, training_args, args: GhostVisArguments) -> list[dict]:
    lr = training_args.learning_rate
    group_lr = {"vision": args.vision_tower_lr or lr, "glue": args.projector_lr or lr, "text": lr}
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = ("vision" if ".vision_tower." in f".{name}" else
                "glue" if (".resampler." in f".{name}" or ".multi_modal_projector." in f".{name}") else "text")
        decay = p.ndim >= 2 and "norm" not in name
        groups.setdefault((part, decay), []).append(p)
    logger.info("optimizer learning rates: %s", group_lr)
    return [{"params": ps, "lr": group_lr[part], "weight_decay": training_args.weight_decay if decay else 0.0}
            for (part, decay), ps in groups.items()]


def make_optimizer(model, training_args, args: GhostVisArguments, use_peft: bool = False):
    """The optimizer for `SFTTrainer(optimizers=(optimizer, None))`, or `None` for the trainer's own AdamW.

    - bf16 master weights (`resolve_precision`): a `MasterWeightOptimizer` over AdamW; the model's parameters are cast
      to bf16. The Trainer's bf16 autocast stays on: with bf16 weights its matmuls need no casts, and the ops it keeps
      in fp32 (layer norms, softmax, losses) stay so. (One run with autocast off ended 8 % higher after 200
      small-preset steps, docs/benchmarks/precision_curve_autocast_off.md; one run parts from another by that much
      from noise alone, so keeping autocast is the cautious choice, not a measured need.)
    - else AdamW with separate learning rates for the vision tower and the glue, as LLaVA's `mm_*_lr`, if
      `vision_tower_lr` or `projector_lr` is set; else `None`.

    The trainer still builds the LR schedule, which scales every group. Biases and norm weights get no weight decay,
    like the trainer's default.
    """
    precision = resolve_precision(model, training_args, args, use_peft)
    if getattr(args, "fp32_residual", False) and precision != "bf16_master":
        logger.info("fp32_residual: the residual stream is already fp32 under %s precision", precision)
    if getattr(args, "compact_master_weights", False) and precision != "bf16_master":
        logger.warning("compact_master_weights applies to bf16_master precision; this run trains in %s: not used",
                       precision)
    if precision == "autocast" and args.vision_tower_lr is None and args.projector_lr is None:
        return None
    if training_args.optim not in ("adamw_torch", "adamw_torch_fused"):
        raise ValueError(f"vision_tower_lr/projector_lr build AdamW; optim={training_args.optim!r} is not supported")
    kwargs = dict(lr=training_args.learning_rate, betas=(training_args.adam_beta1, training_args.adam_beta2),
                  eps=training_args.adam_epsilon)
    if training_args.optim == "adamw_torch_fused":
        kwargs["fused"] = True
    groups = _param_groups(model, training_args, args)
    if precision == "autocast":
        return torch.optim.AdamW(groups, **kwargs)
    fsdp2 = fsdp_version(training_args) == 2
    compact = getattr(args, "compact_master_weights", False)
    if compact and fsdp2:
        raise ValueError("compact_master_weights does not run under FSDP2 (its masters are made from the shards at "
                         "the first step); leave it off there")
    # under FSDP2 the fp32 copies are made at the first step, from the shards accelerate swaps in
    optimizer = MasterWeightOptimizer(groups, torch.optim.AdamW, param_dtype=torch.bfloat16, lazy=fsdp2,
                                      compact=compact, **kwargs)
    cast_parameters(model, torch.bfloat16)  # the frozen ones too
    if getattr(args, "fp32_residual", False):
        logger.info("fp32_residual: %d hooks keep the residual stream fp32", fp32_residual_stream(model))
    optimizer.autocast = getattr(args, "master_autocast", True)  # read by the trainer's FSDP2 path (OwnOptimizerMixin)
    if fsdp2 or not optimizer.autocast:  # FSDP2: accelerate would upcast the bf16 model to fp32 for its own policy
        training_args.mixed_precision = "no"  # (the trainer autocasts there itself); else: no autocast at all
    logger.info("precision: bf16 parameters and activations, fp32 master weights%s and AdamW state in the optimizer "
                "(%s)", " (compact: bf16 + 16-bit remainders)" * compact,
                "bf16 autocast kept for the ops it runs in fp32" if optimizer.autocast else "no autocast")
    return optimizer
