"""The training loop: megatron-core DDP, optimizer, LR schedule and pipeline schedules.

``pretrain(model_provider, forward_step)`` is the library half of
``pretrain_dspark.py`` (the script supplies the four small functions, as Megatron-LM's
``pretrain_gpt.py`` does). One iteration:

1. every DP rank draws its micro-batches of the global batch from a seekable sampler;
2. anchors and blocks are built for all of them on the host, the target's hidden states computed on
   TP rank 0 and broadcast to its TP peers, and the global denominator Σω all-reduced
   over DP (DESIGN.md decision 3);
3. megatron's forward-backward schedule runs the micro-batches; each loss is
   ``num_i / D_global · M · DP`` so that megatron's division by the micro-batch count and
   DDP's mean over DP leave exactly the token-pooled mean of the global batch;
4. the optimizer steps (grad clipping inside), the LR schedule advances, metrics are
   reduced Σnum/Σden over micro-batches and DP ranks and logged.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from megaspark import platform
from megaspark.losses import metrics_to_host, stack_metrics
from megaspark.training import resilience
from megaspark.training.batches import StepInputs, build_host_blocks, collate_micro_batch
from megaspark.training.logging import MetricsLogger, print_line


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0
    best_eval_tau: Optional[float] = None
    history: list = field(default_factory=list)  # per-iteration training loss (for tests/resume)
    skipped_nonfinite: int = 0  # steps skipped for a non-finite loss/gradient (--skip-nonfinite-steps)
    exit_reason: Optional[str] = None  # why the loop stopped early (a signal, the time budget)


def build_optimizer(optim, ddp_chunks, use_distributed_optimizer: bool = False):
    """megatron-core's Adam and LR/WD scheduler for an :class:`OptimizationConfig`."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad,
        bf16=optim.bf16,
        params_dtype=torch.bfloat16 if optim.bf16 else torch.float32,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, list(ddp_chunks))
    total = optim.train_iters * optim.global_batch_size  # the scheduler counts samples
    warmup = int(optim.lr_warmup_fraction * total)
    wsd_steps = int(optim.lr_wsd_decay_fraction * total) if optim.lr_decay_style == "WSD" else None
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=total,
        lr_decay_style=optim.lr_decay_style,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=total,
        wd_incr_style="constant",
        wsd_decay_steps=wsd_steps,
        lr_wsd_decay_style="cosine" if wsd_steps else None,
    )
    return optimizer, scheduler


def wrap_ddp(chunks, tcfg, use_distributed_optimizer: bool = False):
    """megatron-core DDP around every model chunk (one per virtual pipeline stage)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    return [
        DistributedDataParallel(config=tcfg, ddp_config=ddp_config, module=chunk,
                                disable_bucketing=(i > 0))
        for i, chunk in enumerate(chunks)
    ]


class Trainer:
    """Owns the model, optimizer, data position and logging of one run (a :class:`RunConfig`
    whose ``target`` is resolved)."""

    def __init__(self, cfg, chunks, ddp_chunks, tcfg, dcfg, target, train_data, valid_data,
                 forward_step: Callable, pad_id: int):
        from megatron.core import parallel_state
        from megatron.core.distributed import finalize_model_grads

        self.cfg = cfg
        self.chunks = list(chunks)  # this rank's model chunks (virtual pipeline stages)
        self.ddp_chunks = list(ddp_chunks)
        self.tcfg = tcfg
        self.dcfg = dcfg
        self.target = target
        self.train_data = train_data
        self.valid_data = valid_data
        self.forward_step = forward_step
        self.pad_id = pad_id
        self.state = TrainState()
        self.optimizer, self.scheduler = build_optimizer(cfg.optim, self.ddp_chunks,
                                                         cfg.parallel.use_distributed_optimizer)
        no_sync = [c.no_sync for c in self.ddp_chunks]
        tcfg.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        tcfg.finalize_model_grads_func = finalize_model_grads
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.dp_group = parallel_state.get_data_parallel_group()
        self.is_last_stage = parallel_state.is_pipeline_last_stage()
        self.rank = torch.distributed.get_rank()
        self.device = platform.compute_device()
        self.control = resilience.StepControl(cfg.exit, self.device)  # signal handlers: train()
        self.logger = MetricsLogger(cfg.logging, enabled=self._is_logging_rank(),
                                    train_iters=cfg.optim.train_iters)

    def _is_logging_rank(self) -> bool:
        from megatron.core import parallel_state

        return (
            parallel_state.is_pipeline_last_stage()
            and parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_data_parallel_rank() == 0
        )

    # ------------------------------------------------------------------ data
    def _micro_batches(self, dataset, consumed: int, count: int, shuffle: bool = True):
        """This rank's ``count`` micro-batches starting at global stream position ``consumed``."""
        from megaspark.data.dataset import BatchSampler

        mbs = self.cfg.optim.micro_batch_size
        grouped = shuffle and self.cfg.data.length_grouped_sampler
        # groups of one global batch: the order does not depend on the layout
        sampler = BatchSampler(len(dataset), mbs, self.dp_rank, self.dp_size, seed=self.cfg.optim.seed,
                               consumed_samples=consumed, shuffle=shuffle, length_grouped=grouped,
                               lengths=dataset.lengths() if grouped else None,
                               length_group_size=self.cfg.optim.global_batch_size if grouped else None)
        it = iter(sampler)
        out = []
        self.real_tokens = 0  # tokens of these micro-batches before padding (for tokens/s)
        self.micro_samples = []  # dataset indices of each micro-batch (named when one fails)
        for i in range(count):
            indices = next(it)
            self.micro_samples.append([int(j) for j in indices])
            start = consumed + i * mbs * self.dp_size + self.dp_rank * mbs
            samples = [dataset[j] for j in indices]
            self.real_tokens += sum(min(len(s["input_ids"]), self.cfg.data.seq_length) for s in samples)
            out.append(collate_micro_batch(samples, self.cfg.data.seq_length, self.pad_id,
                                           range(start, start + mbs),
                                           pad_multiple=self.cfg.data.pad_to_multiple))
        return out

    # ------------------------------------------------------------------ one step
    def _prepare(self, micro, training: bool) -> StepInputs:
        """The step's inputs: blocks and the global denominator now, each micro-batch's
        device inputs (target features included, only where this rank runs the target) when
        the schedule asks for it."""
        scale = float(len(micro) * self.dp_size)
        return StepInputs(
            build_host_blocks(micro, self.dcfg, self.cfg.optim.seed, training), self.dcfg, self.target,
            self.dp_group, feature_dtype=self.cfg.target.dtype, expect_features=True,
            chunks=len(self.ddp_chunks), annotate=dict(loss_scale=scale),
            target_tp=self.cfg.target.tensor_parallel_size,
        )

    def _run_schedule(self, step: StepInputs, forward_only: bool):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        forward_backward = get_forward_backward_func()
        iterators = [step.iterator() for _ in self.ddp_chunks]  # each chunk walks the micro-batches
        if not forward_only and resilience.FAULT_ENV in os.environ:
            iterators = [resilience.poisoned(i, self.state.iteration + 1) for i in iterators]
        return forward_backward(
            forward_step_func=self.forward_step,
            data_iterator=iterators[0] if len(iterators) == 1 else iterators,
            model=self.ddp_chunks,
            num_microbatches=len(step),
            seq_length=self._schedule_seq_length(step),
            micro_batch_size=self.cfg.optim.micro_batch_size,
            forward_only=forward_only,
        )

    def _schedule_seq_length(self, step) -> int:
        """The activation length megatron's schedule is told (DSpark: context + blocks)."""
        return self.cfg.data.seq_length + self.dcfg.num_anchors * self.dcfg.block_size

    def _combined_loss(self, metrics: dict) -> float:
        """The training objective from the reduced metrics (DSpark: α-weighted terms)."""
        d = self.dcfg
        return (d.alpha_ce * metrics.get("ce_loss", 0.0) + d.alpha_l1 * metrics.get("l1_loss", 0.0)
                + (d.alpha_conf * metrics.get("confidence_loss", 0.0) if d.confidence_head else 0.0))

    def train_step(self):
        it = self.state.iteration + 1
        timeout = self.cfg.parallel.distributed_timeout_minutes
        micro = self._micro_batches(self.train_data, self.state.consumed_samples, self.cfg.optim.num_microbatches)
        with resilience.collective_phase(f"forward/backward of iteration {it}", timeout):
            reports = self.forward_backward(micro)
        resilience.fault("step", it)
        with resilience.collective_phase(f"the step decision (all-reduce) of iteration {it}", timeout):
            per_micro = resilience.nonfinite_flags(reports)
            bad = resilience.grads_nonfinite(self.ddp_chunks, self.device)
            if per_micro is not None:
                bad = bad | per_micro.any()
            decision = self.control.decide(bad)
        if decision.nonfinite:
            self._nonfinite_step(it, per_micro)
            ok, grad_norm = False, None
        else:
            with resilience.collective_phase(f"the optimizer step of iteration {it}", timeout):
                ok, grad_norm, _ = self.optimizer.step()
        if ok:
            self.scheduler.step(increment=self.cfg.optim.global_batch_size)
        self.state.iteration += 1
        self.state.consumed_samples += self.cfg.optim.global_batch_size
        metrics = self._reduce_reports(reports, tokens=self.real_tokens)
        metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        metrics["skipped"] = not ok
        metrics["exit_reason"] = decision.exit_reason
        return metrics

    def _nonfinite_step(self, it: int, per_micro) -> None:
        """Every rank is here in the same step: name the samples whose loss was not finite
        (gathered from the ranks that computed one), then skip the step within
        --skip-nonfinite-steps, else stop without saving."""
        flags = per_micro.tolist() if per_micro is not None else []
        mine = [(self.rank, k, self.micro_samples[k]) for k, f in enumerate(flags) if f]
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, mine)
        found = sorted({(r, k, tuple(s)) for g in gathered for r, k, s in g})
        if found:
            where = "; ".join(f"samples {list(s)} (rank {r}, micro-batch {k})" for r, k, s in found)
            what = f"a non-finite loss in {where}"
        else:
            what = "a non-finite gradient (every loss was finite)"
        allowed = self.cfg.exit.skip_nonfinite_steps
        if self.state.skipped_nonfinite < allowed:
            self.state.skipped_nonfinite += 1
            print_line(f"megaspark: rank {self.rank}: iteration {it} skipped: {what}; the optimizer was "
                       f"not stepped ({self.state.skipped_nonfinite} of --skip-nonfinite-steps {allowed} used)")
            for chunk in self.ddp_chunks:
                chunk.zero_grad_buffer()
            return
        latest = None
        if self.cfg.checkpoint.save and os.path.isfile(os.path.join(self.cfg.checkpoint.save, "latest")):
            with open(os.path.join(self.cfg.checkpoint.save, "latest")) as f:
                latest = os.path.join(self.cfg.checkpoint.save, f.read().strip())
        print_line(f"megaspark: rank {self.rank}: stopping in iteration {it} (non-finite)")
        torch.distributed.barrier()  # every rank has said so before any exits
        raise resilience.NonFiniteStepError(
            f"iteration {it}: {what}. Stopped without saving"
            + (f"; the last checkpoint, {latest}, is untouched" if latest else "")
            + (f" ({allowed} skip(s) of --skip-nonfinite-steps already used)" if allowed else
               "; --skip-nonfinite-steps N skips up to N such steps"))

    def forward_backward(self, micro) -> list:
        """Everything of a training step before the optimizer: the step's inputs on the
        device (target features included), zeroed gradient buffers, forward and backward of
        every micro-batch. Returns the last stage's per-micro-batch reports."""
        step = self._prepare(micro, training=True)
        for chunk in self.ddp_chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        return self._run_schedule(step, forward_only=False)

    def stack_reports(self, reports, tokens: Optional[int] = None):
        """(keys, Σ[num, den] tensor) over micro-batches and DP ranks, on the device (last
        stage; ``([], None)`` elsewhere). ``tokens``: this rank's real (unpadded) tokens,
        summed over DP as ``count@tokens``."""
        if not self.is_last_stage:
            return [], None
        sums = [r["metrics"] for r in reports]
        if tokens is not None:
            one = torch.ones((), dtype=torch.float64)
            sums.append({"count@tokens": (one * tokens, one)})
        return stack_metrics(sums, group=self.dp_group)

    def _reduce_reports(self, reports, tokens: Optional[int] = None) -> dict:
        """Σnum/Σden over micro-batches and DP ranks, made known to every rank; with
        ``tokens``, ``metrics["tokens"]`` is the global batch's real token count."""
        from megatron.core import parallel_state

        metrics = metrics_to_host(*self.stack_reports(reports, tokens))
        if "count@tokens" in metrics:
            metrics["tokens"] = int(metrics.pop("count@tokens"))
        if self.is_last_stage:
            metrics["loss"] = self._combined_loss(metrics)
        # share with earlier pipeline stages so every rank logs/decides consistently
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            obj = [metrics]
            src = parallel_state.get_pipeline_model_parallel_last_rank()
            torch.distributed.broadcast_object_list(
                obj, src=src, group=parallel_state.get_pipeline_model_parallel_group()
            )
            metrics = obj[0]
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict:
        if self.valid_data is None or len(self.valid_data) == 0:
            return {}
        for chunk in self.ddp_chunks:
            chunk.eval()
        reports = []
        per_iter = self.cfg.optim.micro_batch_size * self.dp_size
        max_iters = max(1, min(self.cfg.logging.eval_iters, len(self.valid_data) // per_iter))
        for i in range(max_iters):
            micro = self._micro_batches(self.valid_data, i * per_iter, 1, shuffle=False)
            reports.extend(self._run_schedule(self._prepare(micro, training=False), forward_only=True) or [])
        for chunk in self.ddp_chunks:
            chunk.train()
        return self._reduce_reports(reports)

    # ------------------------------------------------------------------ loop
    def train(self, checkpointer=None):
        self.control.install()
        try:
            return self._train(checkpointer)
        finally:
            self.control.restore()
            self.logger.close()  # also when a step or a save raised

    def _save(self, checkpointer) -> None:
        timeout = self.cfg.parallel.distributed_timeout_minutes
        with resilience.collective_phase(f"saving the checkpoint of iteration {self.state.iteration}", timeout):
            checkpointer.save(self)

    def _train(self, checkpointer=None):
        start_iter = self.state.iteration
        t0 = time.time()
        window_tokens, window_t = 0, time.time()
        self.logger.start(total=self.cfg.optim.train_iters, initial=start_iter)
        while self.state.iteration < self.cfg.optim.train_iters:
            metrics = self.train_step()
            exit_reason = metrics.pop("exit_reason", None)
            it = self.state.iteration
            self.state.history.append(metrics.get("loss", float("nan")))
            window_tokens += metrics.get("tokens", 0)  # real tokens, padding excluded
            self.logger.progress(metrics)
            if it % self.cfg.logging.log_interval == 0 or it == self.cfg.optim.train_iters:
                elapsed = time.time() - window_t
                metrics["tokens_per_sec"] = window_tokens / max(elapsed, 1e-9)
                done = it - start_iter
                metrics["eta_sec"] = (time.time() - t0) / max(done, 1) * (self.cfg.optim.train_iters - it)
                self.logger.log_train(it, metrics)
                window_tokens, window_t = 0, time.time()
            eval_metrics = None
            if self.cfg.logging.eval_interval and (it % self.cfg.logging.eval_interval == 0 or it == self.cfg.optim.train_iters):
                eval_metrics = self.evaluate()
                self.logger.log_eval(it, eval_metrics)
                tau = eval_metrics.get("tau")
                if tau is not None and not math.isnan(tau):
                    if self.state.best_eval_tau is None or tau > self.state.best_eval_tau:
                        self.state.best_eval_tau = tau
                        if checkpointer is not None:
                            checkpointer.mark_best_pending(it)
            saved = False
            if checkpointer is not None and self.cfg.checkpoint.save_interval and it % self.cfg.checkpoint.save_interval == 0:
                self._save(checkpointer)
                saved = True
            if exit_reason is not None and it < self.cfg.optim.train_iters:
                if checkpointer is not None and not saved:
                    self._save(checkpointer)
                if self.rank == 0:
                    print_line(f"megaspark: {exit_reason}: stopped at iteration {it}"
                               + (f" after saving {os.path.join(self.cfg.checkpoint.save, f'iter_{it:07d}')}"
                               if checkpointer is not None else " (no --save: nothing saved)"))
                self.state.exit_reason = exit_reason
                self.logger.close()
                return self.state
            if self.cfg.exit.exit_interval and it % self.cfg.exit.exit_interval == 0 and it < self.cfg.optim.train_iters:
                if checkpointer is not None and not saved:
                    self._save(checkpointer)
                self.logger.close()
                return self.state
        if checkpointer is not None and self.cfg.checkpoint.save and not (
            self.cfg.checkpoint.save_interval and self.state.iteration % self.cfg.checkpoint.save_interval == 0
        ):
            self._save(checkpointer)
        self.logger.close()
        return self.state
