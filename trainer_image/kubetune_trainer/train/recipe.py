"""The SFT recipe: one class that sets up, trains, checkpoints and saves.

Supports
  * methods: LoRA (peft; ``all-linear`` or named modules), QLoRA (4-bit NF4 base via bitsandbytes;
    CUDA only), full fine-tuning;
  * engines: one process, torch DDP across processes and nodes (gloo on CPU, NCCL on GPU), and a
    DeepSpeed ZeRO-2/3 engine whose config is generated from the spec;
  * cosine / linear / constant schedules with linear warm-up, gradient accumulation, epochs or max
    steps, gradient clipping, early stopping on eval loss, bf16/fp16 autocast, gradient
    checkpointing, a seed;
  * exact packing (no cross-example attention) or right padding, from :mod:`kubetune_trainer.data`;
  * checkpoints to object storage every N steps / M minutes and on SIGTERM, and exact resume:
    weights, optimizer, scheduler, RNG states and the data position are restored, so a killed and
    restarted run ends at the same step with the same loss as an uninterrupted one.

Why a hand-written loop rather than transformers' Trainer: on CPU the HF Trainer + DeepSpeed path
failed under torchrun (shared/FACTS.md) while a plain DeepSpeed engine loop works, and resume has
to go through object storage with our own data position; the loop is short, and everything else
(model, LoRA, schedules, ZeRO) comes from transformers, peft and DeepSpeed.

Raises
  * :class:`~kubetune_trainer.train.divergence.TrainingDivergedError` when the loss or gradient norm
    becomes NaN/inf or explodes against the run's own first steps, from step 1 (exit code 5);
  * :class:`~kubetune_trainer.runtime.UnsupportedHardwareError` for QLoRA/fp16 without a GPU;
  * :class:`PreemptedError` after saving a checkpoint on SIGTERM.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, get_scheduler

from kubetune_api.models import Progress
from kubetune_api.runconfig import RunConfig
from kubetune_trainer.data import TokenizedExample, count_batches, iter_batches
from kubetune_trainer.data.batching import model_inputs
from kubetune_trainer.reporting import Reporter
from kubetune_trainer.runtime import (
    Runtime,
    UnsupportedHardwareError,
    rng_state,
    seed_everything,
    set_rng_state,
)
from kubetune_trainer.train.adapters import build_peft_config
from kubetune_trainer.train.checkpoint import CheckpointManager, ResumePlan, check_resume_plan
from kubetune_trainer.train.divergence import DivergenceMonitor, RecipeFacts
from kubetune_trainer.train.divergence import TrainingDivergedError as TrainingDivergedError
from kubetune_trainer.train.health import LossHealth, RunFacts, format_warning, layer_grad_norms
from kubetune_trainer.train.label_head import LabelPositionHead
from kubetune_trainer.train.trial import TrialPrunedError

log = logging.getLogger("kubetune.trainer")


class PreemptedError(RuntimeError):
    """SIGTERM arrived; a checkpoint was saved (when possible) before stopping."""


@dataclass
class TrainState:
    """Where training is; saved in every checkpoint."""

    step: int = 0
    epoch: int = 0
    micro_batch: int = 0  # micro-batches of ``epoch`` already consumed
    best_eval_loss: float | None = None
    evals_without_improvement: int = 0
    tokens_seen: int = 0
    stopped_early: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)
    # Training health (health.py): rebuilt into training/grad-norms.jsonl and health.json on resume.
    grad_norm_history: list[dict[str, Any]] = field(default_factory=list)
    health_warnings: list[dict[str, Any]] = field(default_factory=list)
    # DivergenceMonitor.state_dict(): a resumed run judges against the same first steps.
    divergence: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainOutcome:
    """What training produced, for the evaluation and publishing stages."""

    saved_dir: Path  # adapter/ (lora, qlora) or merged/ (full)
    steps: int
    final_loss: float | None
    final_eval_loss: float | None
    resumed_from_step: int | None
    stopped_early: bool
    metrics_path: Path
    tokens_seen: int
    train_seconds: float
    learning: dict[str, Any] = field(default_factory=dict)  # DivergenceMonitor.learning()


def deepspeed_config(rc: RunConfig, runtime: Runtime) -> dict[str, Any]:
    """The DeepSpeed config generated from the spec (ZeRO stage from distributed.strategy)."""
    t = rc.training
    stage = 3 if rc.distributed.strategy == "deepspeed-zero3" else 2
    zero: dict[str, Any] = {
        "stage": stage,
        "overlap_comm": runtime.device.type == "cuda",
        "contiguous_gradients": True,
    }
    if stage == 3:
        zero.update({"stage3_gather_16bit_weights_on_model_save": True})
    return {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "train_batch_size": t.batch_size * t.gradient_accumulation_steps * runtime.world_size,
        "gradient_clipping": t.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": runtime.precision == "bf16"},
        "fp16": {"enabled": runtime.precision == "fp16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class SFTRecipe:
    """Supervised fine-tuning of one RunConfig. Call :meth:`setup`, then :meth:`train`."""

    def __init__(
        self,
        rc: RunConfig,
        runtime: Runtime,
        *,
        base_dir: Path,
        train_examples: list[TokenizedExample],
        eval_examples: list[TokenizedExample],
        pad_token_id: int,
        checkpoints: CheckpointManager,
        reporter: Reporter,
        workdir: Path,
        train_order_keys: list[float] | None = None,
        model: Any = None,
        init_adapter_dir: Path | None = None,
        distiller: Any = None,
        on_eval: Callable[[int, float], bool] | None = None,
    ) -> None:
        """``train_order_keys`` (one per training example, lower = easier) turns on the
        easy-to-hard curriculum of ``data.curriculum``; None shuffles every epoch.

        Stages (``spec.stages``): ``model`` continues training a model a previous stage's recipe
        handed over (:meth:`release_model`), instead of loading ``base_dir``;
        ``init_adapter_dir`` starts the adapter from saved adapter weights (a published stage)
        instead of peft's fresh initialisation.

        ``distiller`` (:class:`kubetune_trainer.train.distill.Distiller`) replaces the training loss by
        its knowledge-distillation loss; evaluation loss stays plain cross-entropy."""
        self.rc = rc
        self.distiller = distiller
        self.on_eval = on_eval
        self._last_eval: tuple[int, float] | None = None  # (step, eval_loss) of the latest evaluation
        self._given_model = model
        self.init_adapter_dir = init_adapter_dir
        self.train_order_keys = train_order_keys
        self.rt = runtime
        self.base_dir = base_dir
        self.train_examples = train_examples
        self.eval_examples = eval_examples
        self.pad_token_id = pad_token_id
        self.checkpoints = checkpoints
        self.reporter = reporter
        self.workdir = workdir
        self.state = TrainState()
        self.resumed_from_step: int | None = None
        self._sigterm = False
        self._previous_sigterm: Any = None  # the SIGTERM handler before ours (restored after the loop)
        self._last_ckpt_time = time.monotonic()
        self._last_ckpt_step = 0

    # --- setup --------------------------------------------------------------------------------
    def setup(self) -> None:
        """Load the model, wrap it for the method and engine, build optimizer and schedule, resume."""
        t = self.rc.training
        seed_everything(t.seed)
        self.model = self._given_model if self._given_model is not None else self._load_model()
        self._given_model = None
        # Before any DDP/DeepSpeed wrapping: the hook sits on the LM head module itself.
        self.label_head = LabelPositionHead(self.model)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.n_trainable = sum(p.numel() for p in trainable)
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.micro_batches_per_epoch = count_batches(
            self.train_examples,
            batch_size=t.batch_size,
            max_seq_length=t.max_seq_length,
            packing=t.packing,
            pad_token_id=self.pad_token_id,
            seed=t.seed,
            rank=self.rt.rank,
            world_size=self.rt.world_size,
        )
        if self.micro_batches_per_epoch == 0:
            raise ValueError("no training batches: the training set is empty after preparation")
        self.steps_per_epoch = math.ceil(self.micro_batches_per_epoch / t.gradient_accumulation_steps)
        self.total_steps = t.max_steps or max(1, math.ceil(t.epochs * self.steps_per_epoch))
        warmup = round(t.warmup_ratio * self.total_steps)
        optimizer = torch.optim.AdamW(trainable, lr=self.rc.learning_rate, weight_decay=t.weight_decay)
        name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[t.scheduler]
        scheduler = get_scheduler(
            name, optimizer, num_warmup_steps=warmup, num_training_steps=self.total_steps
        )
        self.engine: Any = None
        if self.rc.distributed.strategy.startswith("deepspeed"):
            # deepspeed-* runs only: importing it takes 0.6 s and 25 MB (measured) and probes for
            # an accelerator (logging which), nothing a DDP or one-process run needs.
            import deepspeed

            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=self.model,
                optimizer=optimizer,
                lr_scheduler=scheduler,
                config=deepspeed_config(self.rc, self.rt),
                model_parameters=trainable,
            )
            self.forward_model: Any = self.engine
        else:
            self.optimizer, self.scheduler = optimizer, scheduler
            self.model.to(self.rt.device)
            if self.rt.distributed:
                ids = [self.rt.local_rank] if self.rt.device.type == "cuda" else None
                self.forward_model = DistributedDataParallel(self.model, device_ids=ids)
            else:
                self.forward_model = self.model
        self._resume()
        self._install_sigterm()

    def _load_model(self) -> Any:
        base = self.rc.model.base
        method = self.rc.method
        kwargs: dict[str, Any] = {
            "trust_remote_code": base.trust_remote_code,
            "use_safetensors": None if base.allow_pickle else True,
        }
        if method.type == "qlora":
            if self.rt.device.type != "cuda":
                raise UnsupportedHardwareError(
                    "spec.method.type: qlora loads the base in 4-bit with bitsandbytes, which needs a CUDA GPU; "
                    "this node has none. Use method.type lora on CPU."
                )
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16 if self.rt.precision == "bf16" else torch.float16,
            )
            kwargs["device_map"] = {"": self.rt.local_rank}
        else:
            # Weights in the compute dtype on GPU (memory); fp32 master weights on CPU.
            kwargs["dtype"] = self.rt.dtype if self.rt.device.type == "cuda" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(str(self.base_dir), **kwargs)
        model.config.use_cache = False
        if self.rc.training.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        if method.type == "full":
            for p in model.parameters():
                p.requires_grad_(True)
            return model
        if method.type == "qlora":
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=self.rc.training.gradient_checkpointing
            )
        if self.init_adapter_dir is not None:
            # A published stage's adapter, trained further (its saved config is the same method).
            return PeftModel.from_pretrained(model, str(self.init_adapter_dir), is_trainable=True)
        # LoRA / DoRA / rsLoRA / (IA)^3, optionally on selected layers only (adapters.py).
        return get_peft_model(model, build_peft_config(method, model))

    # --- resume -------------------------------------------------------------------------------
    def _resume(self) -> None:
        info = self.checkpoints.latest()
        if info is None:
            return
        local = self.checkpoints.download(info)
        state = json.loads((local / "state.json").read_text())
        # Exact resume or none: the same shards, effective batch and schedule (checkpoint.py).
        check_resume_plan(info.step, state.get("plan"), self.resume_plan())
        if self.engine is not None:
            self.engine.load_checkpoint(str(local / "deepspeed"), tag="ckpt", load_module_strict=False)
        else:
            trainable = load_file(str(local / "trainable.safetensors"))
            missing = self._trainable_names() - set(trainable)
            if missing:
                raise RuntimeError(f"checkpoint step {info.step} lacks parameters: {sorted(missing)[:5]}")
            self.model.load_state_dict(trainable, strict=False)
            self.optimizer.load_state_dict(
                torch.load(local / "optimizer.pt", map_location=self.rt.device, weights_only=True)
            )
            self.scheduler.load_state_dict(torch.load(local / "scheduler.pt", weights_only=True))
        rng_file = local / f"rng-rank{self.rt.rank}.pt"
        if rng_file.exists():
            set_rng_state(torch.load(rng_file, weights_only=False))  # our own file; numpy state needs pickle
        s = state["trainState"]
        self.state = TrainState(**s)
        self.resumed_from_step = info.step
        self._last_ckpt_step = info.step
        log.info(
            "resumed from checkpoint step %d (epoch %d, micro-batch %d)",
            info.step,
            self.state.epoch,
            self.state.micro_batch,
        )
        if self.rt.is_main:
            print(
                f"[kubetune] resumed from checkpoint at step {info.step}",
                file=self.reporter.stream,
                flush=True,
            )

    def resume_plan(self) -> ResumePlan:
        """What this run's checkpoints mean (recorded in each; a resume must match it)."""
        t = self.rc.training
        return ResumePlan(
            world_size=self.rt.world_size,
            strategy=self.rt.strategy,
            micro_batch_size=t.batch_size,
            gradient_accumulation_steps=t.gradient_accumulation_steps,
            micro_batches_per_epoch=self.micro_batches_per_epoch,
            train_examples=len(self.train_examples),
            data_order_seed=t.seed,
            total_steps=self.total_steps,
        )

    def _trainable_names(self) -> set[str]:
        return {n for n, p in self.model.named_parameters() if p.requires_grad}

    # --- checkpoint ---------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """Write this rank's part of a checkpoint and commit it (all ranks call this)."""
        step = self.state.step
        local = self.checkpoints.local_dir(step)
        if self.engine is not None:
            self.engine.save_checkpoint(str(local / "deepspeed"), tag="ckpt")
        elif self.rt.is_main:
            tensors = {
                n: p.detach().cpu().contiguous() for n, p in self.model.named_parameters() if p.requires_grad
            }
            save_file(tensors, str(local / "trainable.safetensors"))
            torch.save(self.optimizer.state_dict(), local / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), local / "scheduler.pt")
        torch.save(rng_state(), local / f"rng-rank{self.rt.rank}.pt")
        if self.rt.is_main:
            (local / "state.json").write_text(
                json.dumps(
                    {
                        "trainState": self.state.__dict__,
                        "totalSteps": self.total_steps,
                        "plan": self.resume_plan().to_dict(),
                    },
                    default=float,
                )
            )
        self.checkpoints.commit(
            step, local, {"configDigest": self.rc.config_digest(), "strategy": self.rt.strategy}
        )
        self._last_ckpt_time = time.monotonic()
        self._last_ckpt_step = step

    def _checkpoint_due(self) -> bool:
        ck = self.rc.training.checkpoint
        if ck.every_steps and self.state.step % ck.every_steps == 0:
            return True
        minutes = ck.every_minutes
        due = bool(minutes and time.monotonic() - self._last_ckpt_time >= minutes * 60)
        # Every rank must agree, or the collective inside commit() would hang.
        return bool(self.rt.broadcast(due))

    def _install_sigterm(self) -> None:
        def handler(signum: int, frame: FrameType | None) -> None:
            self._sigterm = True

        # Only the main thread may install handlers (not when embedded in a test runner thread).
        with contextlib.suppress(ValueError):
            self._previous_sigterm = signal.signal(signal.SIGTERM, handler)

    def _restore_sigterm(self) -> None:
        """The optimisation loop is over: SIGTERM acts as it did before (a stop during evaluation or
        publishing ends the process at once; the final checkpoint is saved). Left installed, the
        handler would swallow it, and the process would run on until SIGKILL."""
        previous, self._previous_sigterm = self._previous_sigterm, None
        if previous is not None:
            with contextlib.suppress(ValueError):
                signal.signal(signal.SIGTERM, previous)

    # --- train --------------------------------------------------------------------------------
    def _forward(self, batch: dict[str, Any], train: bool = False) -> Any:
        """Mean cross-entropy over the batch's labelled tokens (the LM head runs only there);
        with ``train`` and a distiller, the distillation loss instead."""
        # model_inputs adds use_cache=False: with a KV cache, packed rows would attend across examples.
        inputs = {k: v.to(self.rt.device) if hasattr(v, "to") else v for k, v in model_inputs(batch).items()}
        autocast = (
            torch.autocast(device_type=self.rt.device.type, dtype=self.rt.dtype)
            if self.rt.precision in ("bf16", "fp16") and self.engine is None
            else contextlib.nullcontext()
        )
        with autocast:
            out = self.label_head.forward(self.forward_model, inputs)
            if train and self.distiller is not None:
                return self.distiller.loss(out, inputs)
            return out.cross_entropy()

    def evaluate_loss(self) -> float | None:
        """Token-weighted mean loss on the eval set (all ranks; each takes its shard)."""
        if not self.eval_examples:
            return None
        t = self.rc.training
        self.forward_model.eval()
        total = count = 0.0
        with torch.no_grad():
            for batch in iter_batches(
                self.eval_examples,
                batch_size=t.batch_size,
                max_seq_length=t.max_seq_length,
                packing=t.packing,
                pad_token_id=self.pad_token_id,
                seed=t.seed,
                epoch=0,
                rank=self.rt.rank,
                world_size=self.rt.world_size,
                shuffle=False,
            ):
                n = float(batch["num_label_tokens"])
                total += float(self._forward(batch)) * n
                count += n
        self.forward_model.train()
        total, count = self.rt.all_reduce_sum([total, count])
        return total / count if count else None

    def train(self) -> TrainOutcome:
        """Run the optimisation loop to the planned step count (or early stop), then save."""
        try:
            return self._train()
        finally:
            self._restore_sigterm()

    def _train(self) -> TrainOutcome:
        t = self.rc.training
        gas = t.gradient_accumulation_steps
        self.forward_model.train()
        self.reporter.open_bar(self.total_steps, self.state.step)
        metrics_path = self.workdir / "training" / "metrics.jsonl"
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        if self.rt.is_main:
            # Rebuild the log from the checkpointed history so a resumed run has the whole curve.
            metrics_path.write_text("".join(json.dumps(row) + "\n" for row in self.state.history))
        started = time.monotonic()
        window_start, window_tokens, window_steps = time.monotonic(), 0, 0
        loss_window: list[float] = []
        last_loss: float | None = None
        monitor = DivergenceMonitor(
            RecipeFacts(
                learning_rate=self.rc.learning_rate,
                max_grad_norm=t.max_grad_norm,
                warmup_ratio=t.warmup_ratio,
                scheduler=t.scheduler,
                precision=self.rt.precision,
            )
        )
        monitor.load_state_dict(self.state.divergence)
        health = self._loss_health()
        grad_norms_path = metrics_path.parent / "grad-norms.jsonl"
        if self.rt.is_main:
            grad_norms_path.write_text("".join(json.dumps(r) + "\n" for r in self.state.grad_norm_history))
        # A checkpoint saved when early stopping fired resumes as stopped: it never trains on.
        done = self.state.step >= self.total_steps or self.state.stopped_early
        while not done:
            epoch = self.state.epoch
            accum_loss, accum_n = 0.0, 0
            batches = iter_batches(
                self.train_examples,
                batch_size=t.batch_size,
                max_seq_length=t.max_seq_length,
                packing=t.packing,
                pad_token_id=self.pad_token_id,
                seed=t.seed,
                epoch=epoch,
                rank=self.rt.rank,
                world_size=self.rt.world_size,
                start_batch=self.state.micro_batch,
                order_keys=self._order_keys(epoch),
            )
            for batch in batches:
                self.state.micro_batch += 1
                boundary = (
                    self.state.micro_batch % gas == 0
                    or self.state.micro_batch == self.micro_batches_per_epoch
                )
                loss = self._forward(batch, train=True)
                value = float(loss.detach())
                if not self.rt.distributed:
                    # One process: stop before a NaN reaches the weights. With several ranks the
                    # all-reduced step loss below is NaN on every rank, so all of them stop together.
                    monitor.check_finite(self.state.step + 1, value, self._lr())
                if self.engine is not None:
                    # Our boundary, not DeepSpeed's own micro-step counter: the partial accumulation
                    # that ends an epoch is an optimizer step (and an LR step) for both.
                    self.engine.set_gradient_accumulation_boundary(boundary)
                    self.engine.backward(loss)
                    self.engine.step()
                else:
                    # Mean over the micro-batches of one optimizer step; DDP syncs on the last.
                    scaled = loss / gas
                    if self.rt.distributed and not boundary:
                        with self.forward_model.no_sync():
                            scaled.backward()
                    else:
                        scaled.backward()
                accum_loss += value
                accum_n += 1
                window_tokens += int(batch["num_tokens"])
                if not boundary:
                    continue
                grad_norm: float | None = None
                if self.engine is None:
                    self._record_grad_norms(grad_norms_path)
                    total_norm = torch.nn.utils.clip_grad_norm_(
                        [p for p in self.model.parameters() if p.requires_grad], t.max_grad_norm
                    )
                    grad_norm = float(total_norm)
                    self.optimizer.step()
                    self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                else:
                    grad_norm = _as_float(self.engine.get_global_grad_norm())
                    if self.rt.precision == "fp16" and grad_norm is not None and not math.isfinite(grad_norm):
                        grad_norm = None  # an overflow DeepSpeed's loss scaler skipped, not a divergence
                self.state.step += 1
                window_steps += 1
                step_loss = self.rt.all_reduce_sum([accum_loss / max(accum_n, 1)])[0] / self.rt.world_size
                accum_loss, accum_n = 0.0, 0
                last_loss = step_loss
                loss_window.append(step_loss)
                spike = monitor.update(self.state.step, step_loss, grad_norm)
                self.state.divergence = monitor.state_dict()
                if spike is not None and self.rt.is_main:
                    self.state.health_warnings.append(spike)
                    print(f"[kubetune] {format_warning(spike)}", file=self.reporter.stream, flush=True)
                if self.state.step % t.log_every_steps == 0 or self.state.step == self.total_steps:
                    window_start, window_tokens, window_steps = self._log(
                        loss_window, window_start, window_tokens, window_steps, started, metrics_path
                    )
                    self._check_health(health, loss_window)
                    loss_window = []
                eval_due = bool(t.eval_every_steps) and self.state.step % (t.eval_every_steps or 1) == 0
                if eval_due and self._eval_and_check_early_stop(metrics_path):
                    done = True
                if self.state.step >= self.total_steps:
                    done = True
                stop = bool(self.rt.broadcast(self._sigterm))
                if stop or done or self._checkpoint_due():
                    self.save_checkpoint()
                if stop:
                    raise PreemptedError(
                        f"stopped by SIGTERM after saving a checkpoint at step {self.state.step}"
                    )
                if done:
                    break
            if not done:
                self.state.epoch += 1
                self.state.micro_batch = 0
                if not t.eval_every_steps and self._eval_and_check_early_stop(metrics_path):
                    done = True
                    self.save_checkpoint()  # stopped early at an epoch's end: a restart resumes here
        self.reporter.close_bar()
        self._restore_sigterm()  # from here a stop ends the process at once; a restart resumes
        if self.rt.broadcast(self._sigterm):  # it came while the last checkpoint was being saved
            raise PreemptedError(f"stopped by SIGTERM after saving a checkpoint at step {self.state.step}")
        if self.rt.is_main:
            (metrics_path.parent / "health.json").write_text(
                json.dumps({"warnings": self.state.health_warnings}, indent=2)
            )
        final_eval: float | None
        if self._last_eval is not None and self._last_eval[0] == self.state.step:
            final_eval = self._last_eval[1]  # evaluated at this very step already (evalEverySteps)
        else:
            final_eval = self.evaluate_loss()
            if self.rt.is_main and final_eval is not None:
                self._append_metrics(metrics_path, {"step": self.state.step, "eval_loss": final_eval})
        saved = self._save_final()
        return TrainOutcome(
            saved_dir=saved,
            steps=self.state.step,
            final_loss=last_loss,
            final_eval_loss=final_eval,
            resumed_from_step=self.resumed_from_step,
            stopped_early=self.state.stopped_early,
            metrics_path=metrics_path,
            tokens_seen=self.state.tokens_seen,
            train_seconds=time.monotonic() - started,
            learning=monitor.learning(),
        )

    def _lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    # --- curriculum and health ----------------------------------------------------------------
    def _order_keys(self, epoch: int) -> list[float] | None:
        """Curriculum keys for this epoch (the same on resume, so start_batch skips the same batches)."""
        if self.train_order_keys is None:
            return None
        if self.rc.data.curriculum.first_epoch_only and epoch > 0:
            return None
        return self.train_order_keys

    def _loss_health(self) -> LossHealth:
        h = self.rc.training.health
        health = LossHealth(
            RunFacts(
                train_examples=len(self.train_examples),
                truncated_examples=sum(1 for e in self.train_examples if e.truncated),
                max_seq_length=self.rc.training.max_seq_length,
                learning_rate=self.rc.learning_rate,
            ),
            windows=h.plateau_windows,
            min_improvement=h.plateau_min_improvement,
            warmup_steps=round(self.rc.training.warmup_ratio * self.total_steps),
        )
        # Replay the logged losses so a resumed run judges the whole curve, without re-warning.
        for row in self.state.history:
            if row.get("loss") is not None:
                health.update(int(row["step"]), float(row["loss"]))
        return health

    def _check_health(self, health: LossHealth, losses: list[float]) -> None:
        loss = sum(losses) / len(losses) if losses else None
        warning = health.update(self.state.step, loss)
        if warning is None or not self.rt.is_main:
            return
        self.state.health_warnings.append(warning)
        print(f"[kubetune] {format_warning(warning)}", file=self.reporter.stream, flush=True)

    def _record_grad_norms(self, path: Path) -> None:
        """Per-layer gradient norms before clipping, every logEverySteps, rank 0 (DDP grads are synced)."""
        step = self.state.step + 1  # the optimizer step these gradients are for
        t = self.rc.training
        if not (t.health.grad_norms and self.rt.is_main):
            return
        if step % t.log_every_steps != 0 and step != self.total_steps:
            return
        row = {"step": step, "norms": layer_grad_norms(self.model.named_parameters())}
        self.state.grad_norm_history.append(row)
        with path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")

    def _append_metrics(self, path: Path, row: dict[str, Any]) -> None:
        self.state.history.append(row)
        with path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")

    def _log(
        self,
        losses: list[float],
        window_start: float,
        window_tokens: int,
        window_steps: int,
        started: float,
        metrics_path: Path,
    ) -> tuple[float, int, int]:
        now = time.monotonic()
        tokens = int(self.rt.all_reduce_sum([float(window_tokens)])[0])
        self.state.tokens_seen += tokens
        elapsed = max(now - window_start, 1e-9)
        tps = tokens / elapsed
        step_time = elapsed / max(window_steps, 1)
        loss = sum(losses) / len(losses) if losses else None
        eta = (self.total_steps - self.state.step) * step_time
        epoch = self.state.epoch + self.state.micro_batch / self.micro_batches_per_epoch
        pct = 100.0 * self.state.step / self.total_steps
        # The KD and SFT parts of a distillation loss (every rank: the sums are all-reduced).
        parts = self.distiller.pop_metrics(self.rt.all_reduce_sum) if self.distiller is not None else {}
        if self.rt.is_main:
            row = {
                "step": self.state.step,
                "epoch": round(epoch, 4),
                "loss": loss,
                "learning_rate": self._lr(),
                "tokens_per_second": round(tps, 1),
                "elapsed_s": round(now - started, 3),
                **parts,
            }
            self._append_metrics(metrics_path, row)
        self.reporter.progress(
            Progress(
                stage="Training",
                step=self.state.step,
                total_steps=self.total_steps,
                percent=round(pct, 1),
                epoch=round(epoch, 3),
                loss=loss,
                learning_rate=self._lr(),
                tokens_per_second=round(tps, 1),
                eta_seconds=round(eta, 1),
                summary=f"{self.state.step}/{self.total_steps} ({pct:.0f}%)",
            ),
            force=self.state.step == self.total_steps,
        )
        return now, 0, 0

    def _eval_and_check_early_stop(self, metrics_path: Path) -> bool:
        eval_loss = self.evaluate_loss()
        if eval_loss is None:
            return False
        self._last_eval = (self.state.step, eval_loss)
        if self.rt.is_main:
            self._append_metrics(metrics_path, {"step": self.state.step, "eval_loss": eval_loss})
            print(
                f"[kubetune] step {self.state.step}: eval_loss {eval_loss:.4f}",
                file=self.reporter.stream,
                flush=True,
            )
        if self.on_eval is not None and self.on_eval(self.state.step, eval_loss):
            # A sweep's pruner: this trial is worse than the earlier ones at the same step.
            raise TrialPrunedError(self.state.step, eval_loss)
        es = self.rc.training.early_stopping
        best = self.state.best_eval_loss
        if best is None or eval_loss < best - (es.min_delta if es else 0.0):
            self.state.best_eval_loss = eval_loss
            self.state.evals_without_improvement = 0
        else:
            self.state.evals_without_improvement += 1
        if es and self.state.evals_without_improvement >= es.patience:
            self.state.stopped_early = True
            if self.rt.is_main:
                print(
                    f"[kubetune] early stopping at step {self.state.step}: eval loss did not improve for "
                    f"{es.patience} evaluations (best {self.state.best_eval_loss:.4f})",
                    file=self.reporter.stream,
                    flush=True,
                )
            return True
        return False

    # --- save ---------------------------------------------------------------------------------
    def _save_final(self) -> Path:
        """Rank 0 writes adapter/ (lora, qlora) or merged/ (full) under workdir/staging."""
        staging = self.workdir / "staging"
        out = staging / ("merged" if self.rc.method.type == "full" else "adapter")
        if self.engine is not None and self.rc.distributed.strategy == "deepspeed-zero3":
            import deepspeed  # deepspeed-* runs only (see setup)

            params = [p for p in self.model.parameters() if p.requires_grad or self.rc.method.type == "full"]
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                if self.rt.is_main:
                    self._save_model(out)
        elif self.rt.is_main:
            self._save_model(out)
        self.rt.barrier()
        return out

    def release_model(self) -> Any:
        """The trained model, unwrapped, for the next stage's recipe (this recipe is spent)."""
        self.label_head.remove()
        model = self.model
        self.model = self.forward_model = self.engine = self.optimizer = self.scheduler = None
        return model

    def _save_model(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        model = self.model
        if self.rc.method.type == "full":
            model.config.use_cache = True
        model.save_pretrained(str(out), safe_serialization=True)


def _as_float(value: Any) -> float | None:
    """DeepSpeed's global grad norm (a float, a 0-d tensor, or None when it kept none)."""
    if value is None:
        return None
    return float(value.item() if hasattr(value, "item") else value)
