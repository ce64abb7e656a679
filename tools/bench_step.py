#!/usr/bin/env python
"""Benchmark megaspark's whole DSpark training step, and (optionally) DeepSpec's side by side.

One *training step* is what ``pretrain_dspark.py`` does per iteration: draw the samples,
build anchors and blocks, get the target's features, forward the draft, the DSpark loss,
backward, clip and step the optimizer. It is run here through the same public code:
``pretrain_dspark.model_provider`` (via ``megaspark.training.pretrain.build_model_chunks``),
megatron-core DDP (``wrap_ddp``), megatron's optimizer and LR schedule
(``megaspark.training.trainer.build_optimizer``, inside ``Trainer``) and
``Trainer.train_step()`` with ``pretrain_dspark.forward_step``: single process, TP = PP =
DP = 1, a one-rank gloo group (``megaspark.parallel.init_single_process_group``). Flags are
parsed by ``megaspark.arguments.parse_args`` and the draft's config derived from a target
config by ``megaspark.training.pretrain.draft_config``, exactly as a run does; so whatever
the trainer, batches and losses do today is what is measured.

Nothing passes or fails on time. The tool does fail (exit status 1) when DeepSpec is
compared and the two implementations do not give the same loss and gradient norm on the
same batch with the same weights: the time ratio would then not be of the same work.

Configurations (``--config``)
-----------------------------
* ``issue``: H = 256, 2 draft layers, 4/2 heads x 64, FFN 768, V = 8,192, S = 512,
  N = 64 anchors, block B = 7, 7 samples per micro-batch (= per step); DSpark with
  Convention S, vanilla Markov head of rank 256 (DeepSpec's default), confidence head
  with Markov features, alpha = (0.1, 0.9, 1.0), gamma = 4; 5 tapped target layers
  [1, 9, 17, 25, 33] of a 36-layer target (Qwen3-4B's taps).
* ``smollm2``: SmolLM2-shaped: H = 576, V = 49,152, 9/3 heads x 64, FFN 1536, 2 layers,
  taps [1, 8, 14, 20, 27] of 30; S, N, B and the heads as above, 2 samples per step
  (``--batch`` changes it).
* ``--quick``: one tiny configuration (H 64, V 512, S 64, N 8), for the test.

Both use the **qwen3** family (per-head q/k RMSNorm): DeepSpec's DSpark model exists only
for Qwen3 and Gemma-4 targets, and the same model must run on both sides. (SmolLM2 itself is
a Llama; the per-head norms cost < 1 % of this step.)

Target features: **random**. A stand-in target provider (``RandomFeatureTarget``) returns,
for each sample, tapped-layer features and a last hidden state drawn once at start-up; the
trainer calls it like a real target (``target.compute(input_ids)``) and the time spent in it
is reported as the "target" stage: ~0. DeepSpec trains from a cache of target features, so
this is the like-for-like comparison; an online target's forward would come on top.

What is printed per configuration
---------------------------------
* **step time**: median of ``--steps`` (default 9) timed steps after ``--warmup`` (default
  2) untimed ones, wall clock around ``Trainer.train_step()``;
* **tokens/s**: real (non-padding) tokens of the step's samples / median step time;
* **MFU**: the step's model matmul FLOPs / median step time / the peak of a large GEMM
  (``--gemm-size``, default 2048^3) timed in the same run on the same thread count (best of
  5). With ``--bf16`` a bf16 GEMM is timed too and both fractions are printed;
* **stages**: explicit ``time.perf_counter`` stamps taken by hooks on the public objects
  (no code of megaspark is changed): ``target.compute`` (target), a forward pre-hook on
  the draft (end of input preparation), ``DSparkModel.loss_sums`` (heads + loss forward),
  a gradient hook on the draft's final hidden states ``h`` (end of the loss backward), a
  gradient hook on the context projector's output (end of the draft layers' backward), and
  the optimizer's ``step``:

      inputs     = step start -> draft forward, minus target (sampling, collation, anchors,
                   blocks, device transfer, zeroed gradient buffers)
      layers fwd = draft forward -> loss_sums   (embedding, context projector, draft layers,
                   final norm)
      loss fwd   = loss_sums                    (Markov + confidence heads, DSpark loss)
      loss bwd   = loss_sums end -> grad of h   (megatron's loss_func, backward of the loss
                   and heads; a fused loss that computes its gradients in the forward shows
                   up as a larger "loss fwd" and a small "loss bwd")
      layers bwd = grad of h -> grad of the context projector's output
      optimizer  = optimizer.step()  (grad-norm, clipping, Adam; megatron's)
      other      = the rest (projector weight gradient, finalize_model_grads, LR scheduler,
                   the metrics read-back)

  Each stage is its median over the timed steps; shares are of the median step.
* **loss peak extra memory** against a naive full-logits loss: ``tools/bench_loss.py``'s
  measurement (``_measure``: the maximum of the running sum of the CPU allocator's
  ``[memory]`` events under ``torch.profiler``, i.e. live tensor bytes allocated during
  one forward+backward, inputs excluded) of ``DSparkModel.loss_sums(h, inputs)`` on the
  last step's inputs against ``bench_loss.naive_ce_l1`` (full ``[rows, V]`` logits, CE,
  softmax, L1) plus the same heads and confidence term, both with gradients to ``h`` and
  the heads' parameters. In-process, after the timed steps (not the RSS cross-check,
  which needs a fresh process).

The matmul FLOP count (model FLOPs: multiply-add = 2, no activation recomputation counted)
------------------------------------------------------------------------------------------
Per step of ``b`` samples of ``S`` tokens, ``Q = N·B`` block slots per sample, taps ``L``,
heads ``n_h``/``n_kv`` x ``d``, FFN ``F``, Markov rank ``r``, ``R`` supervised rows (eval mask):

    forward  fc           2·b·S·(L·H)·H
             per layer    2·b·Q·H·n_h·d            (q)
                        + 2·b·(S+Q)·H·2·n_kv·d     (k, v of the context and the blocks)
                        + 2·b·Q·n_h·d·H            (o)
                        + 2·b·Q·3·H·F              (SwiGLU MLP)
                        + 4·n_h·d·B·Σ_j (a_j + B)  (scores and P·V over the keys a query may
                                                   see: context < a_j and its own block, kept
                                                   blocks j only)
             per row      2·H·V (draft logits) + 2·r·V (Markov bias) + 2·H·V (target logits,
                          no grad) + 2·(H + r) (confidence)
    backward = 2x forward for every matmul whose input and weight both need gradients
             (layers, attention, Markov bias, confidence), 1x for the context projector
             (weight only: the features need none) and the draft logits (input only: the LM
             head is frozen), 0 for the target logits.

Both implementations are charged the same FLOPs for the same batch (megaspark skips the
unsupervised rows and the masked-out keys; DeepSpec computes them but they count as 0).

DeepSpec side by side (``DEEPSPEC_SRC``)
-----------------------------------------
When the environment variable ``DEEPSPEC_SRC`` points at an extracted checkout of
github.com/deepseek-ai/DeepSpec (MIT; never vendored or depended on), the tool also imports
DeepSpec's DSpark from that source: its own draft config (``build_draft_config`` of
``deepspec/modeling/dspark/qwen3/config.py``, from the same target config), its
``Qwen3DSparkModel``, its ``compute_dspark_loss`` and its ``BF16Optimizer`` (AdamW on fp32
master copies + warm-up/cosine LR, what its trainer uses in every precision) after
``clip_grad_norm_`` (its trainer's ``max_grad_norm`` = 1.0). It loads megaspark's initial
weights (``hf_state_dict``: the DeepSpec tensor names, see ``megaspark/export/tensors.py``) and
trains its own copy from there. Adjustments, all in this process only:

* anchors: DeepSpec samples them inside ``forward`` (``sample_anchor_positions`` of
  ``common.py``, imported by name into ``qwen3/modeling.py``); that name is replaced by a
  function returning megaspark's anchors and keep mask of the same step (same layout:
  sorted, kept first, dummies at 0), so both see the same blocks;
* attention: the **dense SDPA mask path**: ``_attn_implementation = "sdpa"`` and
  ``create_dspark_attention_mask`` replaced by a dense boolean ``[b, 1, N·B, S+N·B]`` mask
  with exactly its ``mask_mod`` (FlexAttention's block mask needs ``torch.compile`` kernels
  that this CPU setup does not run as in DeepSpec's GPU training);
* its metric buffer (``deepspec.utils.metrics``) is cleared after each step, as its
  logger's flush does.

No DeepSpec import needs a stub with the packages installed here (transformers 5.x,
torch 2.13 CPU); an import that fails is reported with the missing module's name.

Each step, megaspark runs first, then DeepSpec on the same samples, anchors and features
(alternating step by step in one process, so slow drifts of outside load hit both alike).
The first warm-up step of each is the **parity check**: same weights, same batch — the loss
and the gradient norm (before clipping) of the two are printed with their difference.
Printed: megaspark's step time as a ratio of DeepSpec's (the aim at ``issue``, 1 thread:
<= 0.67), from the medians and as the median of the per-step ratios.

The machine may be shared: the header and footer print the load average, and each
implementation's CPU time / wall time (< 1.0 means outside load took its core).

Usage::

    python tools/bench_step.py                          # --config issue, 1 thread
    DEEPSPEC_SRC=/tmp/deepspec python tools/bench_step.py --config both --json out.json
    python tools/bench_step.py --quick                  # tiny shapes, CI smoke
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import importlib.util
import json
import math
import os
import statistics
import sys
import tempfile
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

STEP_RATIO_AIM = 0.67  # megaspark / DeepSpec step time at config "issue", 1 thread

# Shapes. heads = (query heads, KV heads, head dim); taps of a target with target_layers layers.
CONFIGS = {
    "issue": dict(hidden=256, layers=2, heads=(4, 2, 64), ffn=768, vocab=8192, seq=512,
                  anchors=64, block=7, markov_rank=256, batch=7, target_layers=36,
                  taps=[1, 9, 17, 25, 33], gemm=2048),
    "smollm2": dict(hidden=576, layers=2, heads=(9, 3, 64), ffn=1536, vocab=49152, seq=512,
                    anchors=64, block=7, markov_rank=256, batch=2, target_layers=30,
                    taps=[1, 8, 14, 20, 27], gemm=2048),
    "quick": dict(hidden=64, layers=2, heads=(4, 2, 16), ffn=128, vocab=512, seq=64,
                  anchors=8, block=7, markov_rank=16, batch=2, target_layers=6,
                  taps=[1, 3], gemm=256),
}
STAGES = ("inputs", "target", "layers_fwd", "loss_fwd", "loss_bwd", "layers_bwd", "optimizer", "other")
DEEPSPEC_MODULE = os.path.join("deepspec", "modeling", "dspark", "qwen3", "modeling.py")


class DeepSpecSourceError(RuntimeError):
    """DEEPSPEC_SRC is set but does not hold an importable DeepSpec checkout."""


# ============================================================================ small helpers
def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def _ratio(a, b):
    return a / b if b else float("nan")


def _bench_loss_module():
    """tools/bench_loss.py as a module (its naive loss and its peak-memory measurement)."""
    spec = importlib.util.spec_from_file_location("megaspark_bench_loss",
                                                  os.path.join(_REPO, "tools", "bench_loss.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_deepspec_src(path: str) -> str:
    """The absolute DeepSpec checkout at ``path`` or :class:`DeepSpecSourceError`."""
    path = os.path.abspath(os.path.expanduser(path))
    needed = [DEEPSPEC_MODULE, os.path.join("deepspec", "modeling", "dspark", "common.py"),
              os.path.join("deepspec", "modeling", "dspark", "loss.py"),
              os.path.join("deepspec", "utils", "optim.py")]
    missing = [p for p in needed if not os.path.isfile(os.path.join(path, p))]
    if not os.path.isdir(path) or missing:
        raise DeepSpecSourceError(
            f"DEEPSPEC_SRC={path} is not a DeepSpec checkout: missing {', '.join(missing) or path} "
            "(extract github.com/deepseek-ai/DeepSpec there, e.g. `git archive HEAD deepspec | "
            "tar -x -C DIR`, or unset DEEPSPEC_SRC to benchmark megaspark alone)")
    return path


# ============================================================================ FLOPs and GEMM peak
def step_matmul_flops(d, cfg: dict, b: int, S: int, anchors, keep, supervised_rows: int) -> dict:
    """Model matmul FLOPs of one step (see the module docstring for the formula)."""
    H, V, r = d.hidden_size, d.vocab_size, d.markov_rank
    nh, nkv, hd, F = d.num_attention_heads, d.num_query_groups, d.kv_channels, d.ffn_hidden_size
    B, N, L = d.block_size, d.num_anchors, len(d.target_layer_ids)
    Q = N * B
    keys = float(((anchors.double() + B) * keep.double()).sum())  # Σ_j (a_j + B) over kept blocks
    fc = 2.0 * b * S * L * H * H
    per_layer = (2.0 * b * Q * H * nh * hd + 2.0 * b * (S + Q) * H * 2 * nkv * hd
                 + 2.0 * b * Q * nh * hd * H + 2.0 * b * Q * 3 * H * F)
    attn = 4.0 * nh * hd * B * keys
    layers_fwd = fc + d.num_layers * (per_layer + attn)
    layers_total = layers_fwd + fc + 2.0 * (layers_fwd - fc)  # fc: weight grad only
    R = float(supervised_rows)
    logits, markov, target = 2.0 * R * H * V, 2.0 * R * r * V if d.has_markov else 0.0, 2.0 * R * H * V
    conf = 2.0 * R * (H + (r if d.confidence_with_markov else 0)) if d.confidence_head else 0.0
    loss_total = (logits * 2) + (markov * 3) + target + (conf * 3)
    return dict(total=layers_total + loss_total, layers=layers_total, loss=loss_total)


def gemm_peak(n: int, dtype, repeats: int = 5) -> float:
    """Best FLOP/s of an n x n x n GEMM on the current torch thread count."""
    import torch

    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


# ============================================================================ data and target
class BenchDataset:
    """``batch`` fixed samples (token ids, loss mask with an unsupervised prompt); records
    the order in which the trainer reads them, so the same batch can be given to DeepSpec."""

    def __init__(self, n: int, S: int, vocab: int, seed: int):
        import torch

        g = torch.Generator().manual_seed(seed)
        self.samples = []
        for _ in range(n):
            ids = torch.randint(0, vocab - 1, (S,), generator=g)  # vocab - 1: the mask token
            prompt = int(torch.randint(S // 16, S // 4 + 1, (1,), generator=g))
            mask = torch.ones(S, dtype=torch.long)
            mask[:prompt] = 0
            self.samples.append({"input_ids": ids, "loss_mask": mask})
        self.reads: list = []

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, j):
        self.reads.append(int(j))
        return self.samples[j]


def random_feature_target(dcfg, dataset: BenchDataset, dtype, seed: int):
    """A target provider returning per-sample random features drawn once (see docstring)."""
    import torch

    from megaspark.targets.base import TargetOutput, TargetProvider

    g = torch.Generator().manual_seed(seed)
    table = {}
    for s in dataset.samples:
        S = s["input_ids"].numel()
        aux = torch.randn(S, dcfg.context_width, generator=g).to(dtype)
        last = torch.randn(S, dcfg.hidden_size, generator=g).to(dtype)
        table[s["input_ids"].numpy().tobytes()] = (aux, last)

    class RandomFeatureTarget(TargetProvider):
        layer_ids = list(dcfg.target_layer_ids)

        def __init__(self):
            self.seconds = 0.0
            self.last = None  # the last TargetOutput, for DeepSpec

        def compute(self, input_ids, attention_mask=None):
            t0 = time.perf_counter()
            rows = [table[row.numpy().tobytes()] for row in input_ids.cpu()]
            out = TargetOutput(aux_hidden_states=torch.stack([a for a, _ in rows]),
                               last_hidden_states=torch.stack([l for _, l in rows]))
            self.last = out
            self.seconds += time.perf_counter() - t0
            return out

    return RandomFeatureTarget()


def target_hf_config(cfg: dict):
    """The (Qwen3) target config both implementations derive their draft from."""
    from transformers import Qwen3Config

    nh, nkv, hd = cfg["heads"]
    return Qwen3Config(
        vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], intermediate_size=cfg["ffn"],
        num_hidden_layers=cfg["target_layers"], num_attention_heads=nh, num_key_value_heads=nkv,
        head_dim=hd, max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, attention_bias=False,
        use_sliding_window=False, sliding_window=None, pad_token_id=None,
    )


# ============================================================================ megaspark
class StepTimer:
    """Time stamps of one step, set by hooks; ``stages()`` turns them into durations."""

    def __init__(self):
        self.t = {}

    def reset(self):
        self.t = {}

    def stamp(self, name):
        self.t.setdefault(name, time.perf_counter())

    def stages(self, total: float, target_s: float) -> dict:
        t = self.t

        def span(a, b):
            return t[b] - t[a] if a in t and b in t else float("nan")

        out = dict(
            inputs=span("start", "fwd") - target_s, target=target_s,
            layers_fwd=span("fwd", "loss_start"), loss_fwd=span("loss_start", "loss_end"),
            loss_bwd=span("loss_end", "h_grad"), layers_bwd=span("h_grad", "ctx_grad"),
            optimizer=span("opt_start", "opt_end"),
        )
        known = [v for v in out.values() if not math.isnan(v)]
        out["other"] = total - sum(known)
        return out


def _hook_grad(tensor, timer: StepTimer, name: str):
    if isinstance(tensor, (tuple, list)):
        tensor = tensor[0]
    if tensor is not None and tensor.requires_grad:
        tensor.register_hook(lambda g: (timer.stamp(name), None)[1])


class MegasparkSide:
    def __init__(self, cfg: dict, args, workdir: str):
        import torch

        import pretrain_dspark
        from megaspark import platform
        from megaspark.arguments import parse_args
        from megaspark.arguments.configs import run_config
        from megaspark.training.pretrain import build_model_chunks, draft_config
        from megaspark.training.trainer import Trainer, wrap_ddp

        nh, nkv, hd = cfg["heads"]
        b = args.batch or cfg["batch"]
        argv = [
            "--data-path", workdir, "--target-model", "bench-step-random-target",
            "--seq-length", str(cfg["seq"]), "--micro-batch-size", str(b), "--global-batch-size", str(b),
            "--num-layers", str(cfg["layers"]), "--num-attention-heads", str(nh),
            "--num-query-groups", str(nkv), "--kv-channels", str(hd), "--ffn-hidden-size", str(cfg["ffn"]),
            "--target-layer-ids", *map(str, cfg["taps"]), "--block-size", str(cfg["block"]),
            "--num-anchors", str(cfg["anchors"]), "--markov-rank", str(cfg["markov_rank"]),
            "--markov-head-type", "vanilla", "--train-iters", "100000", "--seed", str(args.seed),
            "--device", "cpu", "--no-progress-bar",
        ] + (["--bf16"] if args.bf16 else [])
        self.args = parse_args(argv, world_size=1)
        self.hf_config = target_hf_config(cfg)
        dcfg = draft_config(self.args, self.hf_config)
        dcfg.mask_token_id = cfg["vocab"] - 1
        dcfg.validate(1)
        self.dcfg = dcfg
        self.args.target_layer_ids_resolved = list(dcfg.target_layer_ids)
        self.args.target_dtype_resolved = platform.target_dtype(self.args.target_dtype, self.args.bf16,
                                                                platform.compute_device())
        torch.manual_seed(args.seed)
        run = run_config(self.args)
        chunks, tcfg = build_model_chunks(run, dcfg, pretrain_dspark.model_provider)
        self.model = chunks[0]
        g = torch.Generator().manual_seed(args.seed + 7)
        H, V = dcfg.hidden_size, dcfg.vocab_size
        embedding = torch.randn(V, H, generator=g)
        lm_head = torch.randn(V, H, generator=g) * (2.0 / math.sqrt(H))  # logits of std ~2
        self.model.load_target_embeddings(embedding, lm_head)
        self.dataset = BenchDataset(b, cfg["seq"], V, args.seed + 1)
        self.target = random_feature_target(dcfg, self.dataset, self.args.target_dtype_resolved,
                                            args.seed + 2)
        ddp_chunks = wrap_ddp(chunks, tcfg, run.parallel.use_distributed_optimizer)
        self.trainer = Trainer(run, chunks, ddp_chunks, tcfg, dcfg, self.target, self.dataset,
                               None, pretrain_dspark.forward_step, pad_id=0)
        self.batch = b
        self.timer = StepTimer()
        self.captured = None
        self._install_hooks()

    def _install_hooks(self):
        model, timer = self.model, self.timer

        def pre_forward(module, inputs):
            timer.stamp("fwd")
            self.captured = inputs[0]

        model.register_forward_pre_hook(pre_forward)
        if getattr(model, "fc", None) is not None:
            model.fc.register_forward_hook(lambda m, i, out: _hook_grad(out, timer, "ctx_grad"))
        final_hidden, loss_sums = model.final_hidden, model.loss_sums

        def timed_final_hidden(*a, **k):
            h = final_hidden(*a, **k)
            _hook_grad(h, timer, "h_grad")
            return h

        def timed_loss_sums(*a, **k):
            timer.stamp("loss_start")
            out = loss_sums(*a, **k)
            timer.stamp("loss_end")
            return out

        model.final_hidden, model.loss_sums = timed_final_hidden, timed_loss_sums
        opt = self.trainer.optimizer
        step = opt.step

        def timed_step(*a, **k):
            timer.stamp("opt_start")
            out = step(*a, **k)
            timer.stamp("opt_end")
            return out

        opt.step = timed_step

    def state_dict(self) -> dict:
        from megaspark.models.dspark.state_dict_adapter import hf_state_dict

        return hf_state_dict(self.model)

    def step(self) -> dict:
        """One ``Trainer.train_step()``; returns its timing, metrics and the batch it used."""
        from megaspark.data.dataset import collate

        self.timer.reset()
        self.dataset.reads.clear()
        self.target.seconds = 0.0
        c0 = time.process_time()
        self.timer.t["start"] = t0 = time.perf_counter()
        metrics = self.trainer.train_step()
        total = time.perf_counter() - t0
        cpu = time.process_time() - c0
        samples = [self.dataset.samples[j] for j in self.dataset.reads]
        batch = collate(samples, self.args.seq_length, 0)
        x = self.captured
        batch.update(anchors=x.anchors.detach().cpu(), keep=x.keep.detach().cpu().bool(),
                     target_hidden_states=self.target.last.aux_hidden_states,
                     target_last_hidden_states=self.target.last.last_hidden_states)
        self._check_batch(x, batch)
        return dict(time=total, cpu=cpu, stages=self.timer.stages(total, self.target.seconds),
                    loss=metrics.get("loss"), grad_norm=metrics.get("grad_norm"), batch=batch,
                    supervised_rows=int(x.eval_mask.sum()) if x.eval_mask is not None else 0,
                    real_tokens=int(batch["attention_mask"].sum()))

    def _check_batch(self, x, batch) -> None:
        """The batch rebuilt from the dataset's read order must be the one the draft saw: the
        anchor token opens every kept block (Convention S block inputs)."""
        import torch

        ids, keep = batch["input_ids"], batch["keep"]
        b, N = batch["anchors"].shape
        first = x.noise_ids.detach().cpu().view(b, N, -1)[..., 0]
        expect = torch.gather(ids, 1, batch["anchors"])
        if ids.shape[0] != b or not torch.equal(first[keep], expect[keep]):
            raise RuntimeError("could not rebuild the step's batch (sample order) for DeepSpec")

    def loss_memory(self, bench_loss) -> dict:
        """Peak extra memory of the model's loss vs the naive full-logits loss (see docstring)."""
        import torch
        import torch.nn.functional as F

        x, d, model = self.captured, self.dcfg, self.model
        g = torch.Generator().manual_seed(0)
        b, N, B = x.labels.shape
        h = torch.randn(b, N, B, d.hidden_size, generator=g).to(model.output_layer.weight.dtype)
        h.requires_grad_()

        def megaspark_loss():
            h.grad = None
            sums = model.loss_sums(h, x)
            loss = sums.loss(d.alpha_ce, d.alpha_l1, d.alpha_conf)
            loss.backward()
            return dict(loss=loss.detach())

        def naive_loss():
            h.grad = None
            feat, _, conf = model.heads(h, x.prev_ids)
            rows = x.loss_rows if x.loss_rows is not None else torch.arange(b * N * B)

            def flat(t):
                return None if t is None else t.reshape(b * N * B, *t.shape[3:])[rows]

            w2 = model.markov_head.w2_local() if d.has_markov else None
            if feat is None:  # no Markov head: a zero-rank bias
                feat_r, w2 = flat(h)[:, :0], model.output_layer.weight[:, :0]
            else:
                feat_r = flat(feat)
            ce, l1 = bench_loss.naive_ce_l1(flat(h), flat(x.labels), model.output_layer.weight,
                                            feat_r, w2, flat(x.target_hidden))
            w = flat(x.weights).float()
            total = d.alpha_ce * (w * ce).sum() + d.alpha_l1 * (w * l1).sum()
            if conf is not None:
                c_star = (1.0 - 0.5 * l1.detach()).clamp(0.0, 1.0)
                bce = F.binary_cross_entropy_with_logits(flat(conf).float(), c_star, reduction="none")
                total = total + d.alpha_conf * (w * bce).sum()
            loss = total / (x.weights.float().sum() + 1e-6)
            loss.backward()
            return dict(loss=loss.detach())

        naive, out_n = bench_loss._measure(naive_loss, 1)
        ours, out_m = bench_loss._measure(megaspark_loss, 1)
        for chunk in self.trainer.ddp_chunks:
            chunk.zero_grad_buffer()
        return dict(megaspark_bytes=ours["peak_bytes"], naive_bytes=naive["peak_bytes"],
                    ratio=_ratio(ours["peak_bytes"], naive["peak_bytes"]),
                    loss_megaspark=float(out_m["loss"]), loss_naive=float(out_n["loss"]),
                    rows=int(x.loss_rows.numel()) if x.loss_rows is not None else b * N * B)


# ============================================================================ DeepSpec
class AttrDict(dict):
    """DeepSpec's model_args: attribute access and ``in``."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as e:
            raise AttributeError(name) from e


def dense_dspark_mask(*, anchor_positions, block_keep_mask, seq_len, block_size, device):
    """DeepSpec's ``dspark_mask_mod`` (common.py ``create_dspark_attention_mask``) evaluated on
    the full grid: a boolean ``[b, 1, N·B, S + N·B]`` SDPA mask (True = attend)."""
    import torch

    b, n = anchor_positions.shape
    Q = n * block_size
    q_block = torch.arange(Q, device=device) // block_size
    kv = torch.arange(seq_len + Q, device=device)
    anchor = anchor_positions[:, q_block]  # [b, Q]
    context = (kv < seq_len)[None, None, :] & (kv[None, None, :] < anchor[:, :, None])
    kv_block = torch.div(kv - seq_len, block_size, rounding_mode="floor")
    draft = (kv >= seq_len)[None, None, :] & (q_block[None, :, None] == kv_block[None, None, :])
    valid = block_keep_mask[:, q_block][:, :, None]
    return ((context | draft) & valid)[:, None]


class DeepSpecSide:
    def __init__(self, src: str, ms: MegasparkSide, cfg: dict, args):
        import torch

        if src not in sys.path:
            sys.path.insert(0, src)
        try:
            modeling = importlib.import_module("deepspec.modeling.dspark.qwen3.modeling")
            config_mod = importlib.import_module("deepspec.modeling.dspark.qwen3.config")
            loss_mod = importlib.import_module("deepspec.modeling.dspark.loss")
            optim_mod = importlib.import_module("deepspec.utils.optim")
            self.metrics_mod = importlib.import_module("deepspec.utils.metrics")
        except ImportError as e:
            raise DeepSpecSourceError(
                f"importing DeepSpec from DEEPSPEC_SRC={src} failed: {type(e).__name__}: {e} "
                f"(missing module: {getattr(e, 'name', None)})") from e
        d = ms.dcfg
        self.d = d
        self.loss_fn = loss_mod.compute_dspark_loss
        self.current = None  # (anchors, keep) of the step being run
        modeling.sample_anchor_positions = self._anchors
        modeling.create_dspark_attention_mask = dense_dspark_mask
        model_args = AttrDict(
            num_draft_layers=d.num_layers, target_layer_ids=list(d.target_layer_ids),
            block_size=d.block_size, mask_token_id=d.mask_token_id, num_anchors=d.num_anchors,
            markov_rank=d.markov_rank, markov_head_type=d.markov_head_type,
            confidence_head_alpha=d.alpha_conf if d.confidence_head else 0.0,
            confidence_head_with_markov=d.confidence_with_markov,
        )
        ds_config = config_mod.build_draft_config(target_config=ms.hf_config, model_args=model_args)
        ds_config._attn_implementation = "sdpa"
        self.dtype = torch.bfloat16 if args.bf16 else torch.float32
        model = modeling.Qwen3DSparkModel(ds_config)
        state = {k: v.to(torch.float32) for k, v in ms.state_dict().items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"DeepSpec model vs megaspark export: missing {missing}, unexpected {unexpected}")
        model.set_embedding_head_trainable(False)
        self.model = model.to(dtype=self.dtype)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = optim_mod.BF16Optimizer(self.model, lr=ms.args.lr, total_steps=100000,
                                                 warmup_ratio=ms.args.lr_warmup_fraction,
                                                 weight_decay=ms.args.weight_decay)
        self.max_grad_norm = ms.args.clip_grad
        self.timer = StepTimer()
        self._install_hooks()

    def _anchors(self, *, seq_len, loss_mask, num_anchors, device):
        anchors, keep = self.current
        assert anchors.shape == (loss_mask.shape[0], num_anchors), (anchors.shape, num_anchors)
        return anchors.to(device), keep.to(device)

    def _install_hooks(self):
        model, timer = self.model, self.timer
        backbone = model._forward_backbone

        def timed_backbone(*a, **k):
            timer.stamp("fwd")
            out = backbone(*a, **k)
            _hook_grad(out, timer, "h_grad")
            timer.stamp("loss_start")
            return out

        model._forward_backbone = timed_backbone
        model.fc.register_forward_hook(lambda m, i, out: _hook_grad(out, timer, "ctx_grad"))

    def step(self, batch: dict) -> dict:
        import torch

        d = self.d
        self.current = (batch["anchors"], batch["keep"])
        self.timer.reset()
        c0 = time.process_time()
        self.timer.t["start"] = t0 = time.perf_counter()
        outputs = self.model(
            input_ids=batch["input_ids"], target_hidden_states=batch["target_hidden_states"].to(self.dtype),
            loss_mask=batch["loss_mask"],
            target_last_hidden_states=batch["target_last_hidden_states"].to(self.dtype),
        )
        loss = self.loss_fn(outputs=outputs, loss_decay_gamma=d.gamma, ce_loss_alpha=d.alpha_ce,
                            l1_loss_alpha=d.alpha_l1,
                            confidence_head_alpha=d.alpha_conf if d.confidence_head else 0.0)
        self.timer.stamp("loss_end")
        loss.backward()
        self.timer.stamp("opt_start")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.timer.stamp("opt_end")
        self.metrics_mod._metrics.clear()  # the trainer's logger flushes them every few steps
        total = time.perf_counter() - t0
        cpu = time.process_time() - c0
        return dict(time=total, cpu=cpu, stages=self.timer.stages(total, 0.0),
                    loss=float(loss.detach()), grad_norm=float(grad_norm))


# ============================================================================ one configuration
def _stage_line(name: str, stages: dict, total: float) -> str:
    def fmt(key, label):
        v = stages[key]
        if math.isnan(v):
            return f"{label} n/a"
        return f"{label} {v:.3f} s ({100 * v / total:.1f}%)"

    return (f"{name:10s} stages: {fmt('inputs', 'inputs')} | {fmt('target', 'target')} | "
            f"{fmt('layers_fwd', 'layers fwd')} | {fmt('layers_bwd', 'layers bwd')} | "
            f"{fmt('loss_fwd', 'loss fwd')} | {fmt('loss_bwd', 'loss bwd')} | "
            f"{fmt('optimizer', 'optimizer')} | {fmt('other', 'other')}")


def _summary(runs: list, flops: float, peaks: dict, tokens: int) -> dict:
    times = [r["time"] for r in runs]
    t = _median(times)
    stages = {k: _median([r["stages"][k] for r in runs]) for k in STAGES}
    out = dict(step_time_s=t, step_times_s=times, min_s=min(times), max_s=max(times),
               cpu_over_wall=_median([r["cpu"] / r["time"] for r in runs]),
               tokens_per_s=tokens / t, stages_s=stages,
               stage_shares={k: v / t for k, v in stages.items()})
    out["mfu"] = {name: flops / t / peak for name, peak in peaks.items()}
    return out


def run_config(name: str, args, deepspec_src) -> tuple:
    import torch

    cfg = dict(CONFIGS[name])
    if args.gemm_size:
        cfg["gemm"] = args.gemm_size
    ok = True
    res = dict(config=name, shape=cfg, threads=torch.get_num_threads(), dtype="bf16" if args.bf16 else "fp32")
    with tempfile.TemporaryDirectory(prefix="bench_step_") as workdir:
        ms = MegasparkSide(cfg, args, workdir)
        d = ms.dcfg
        nh, nkv, hd = cfg["heads"]
        print(f"# config {name}: H {d.hidden_size}, {d.num_layers} layers, heads {d.num_attention_heads}/"
              f"{d.num_query_groups}x{d.kv_channels}, FFN {d.ffn_hidden_size}, V {d.vocab_size}, "
              f"S {cfg['seq']}, N {d.num_anchors}, B {d.block_size}, taps {len(d.target_layer_ids)}, "
              f"markov {d.markov_head_type} r{d.markov_rank}, confidence "
              f"{'on (with markov)' if d.confidence_head and d.confidence_with_markov else d.confidence_head}, "
              f"convention {d.convention}, loss chunk rows {d.loss_chunk_rows}, attention backend "
              f"{d.attention_backend}; {ms.batch} sample(s) per step (one micro-batch); "
              f"{res['dtype']}, {res['threads']} thread(s); target features: random (stage ~0)",
              flush=True)
        peaks = {"fp32": gemm_peak(cfg["gemm"], torch.float32)}
        if args.bf16:
            peaks["bf16"] = gemm_peak(cfg["gemm"], torch.bfloat16)
        print("# GEMM peak " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peaks.items())
              + f" ({cfg['gemm']}^3, best of 5, {res['threads']} thread(s))", flush=True)
        ds = None
        if deepspec_src:
            ds = DeepSpecSide(deepspec_src, ms, cfg, args)
            print(f"# DeepSpec from {deepspec_src}: Qwen3DSparkModel, compute_dspark_loss, "
                  f"clip_grad_norm_ + BF16Optimizer (AdamW), dense SDPA mask, megaspark's anchors; "
                  f"no import stubs", flush=True)
        ms_runs, ds_runs, flops_list = [], [], []
        parity = None
        n_total = args.warmup + args.steps
        for i in range(n_total):
            gc.collect()
            r = ms.step()
            flops_list.append(step_matmul_flops(d, cfg, ms.batch, r["batch"]["input_ids"].shape[1],
                                                r["batch"]["anchors"], r["batch"]["keep"],
                                                r["supervised_rows"]))
            rd = None
            if ds is not None:
                gc.collect()
                rd = ds.step(r["batch"])
            if i == 0 and ds is not None:
                parity = dict(loss_megaspark=r["loss"], loss_deepspec=rd["loss"],
                              loss_abs_diff=abs(r["loss"] - rd["loss"]),
                              loss_rel_diff=abs(r["loss"] - rd["loss"]) / max(abs(rd["loss"]), 1e-30),
                              grad_norm_megaspark=r["grad_norm"], grad_norm_deepspec=rd["grad_norm"],
                              grad_norm_rel_diff=abs(r["grad_norm"] - rd["grad_norm"])
                              / max(abs(rd["grad_norm"]), 1e-30))
                tol = 2e-2 if args.bf16 else 1e-4
                parity["tolerance"] = tol
                parity["equal"] = bool(parity["loss_rel_diff"] <= tol and parity["grad_norm_rel_diff"] <= tol)
                ok &= parity["equal"]
                print(f"parity  loss megaspark {r['loss']:.8f} deepspec {rd['loss']:.8f} "
                      f"|diff| {parity['loss_abs_diff']:.2e} (rel {parity['loss_rel_diff']:.1e}) | "
                      f"grad norm megaspark {r['grad_norm']:.8f} deepspec {rd['grad_norm']:.8f} "
                      f"(rel {parity['grad_norm_rel_diff']:.1e})  -> "
                      f"{'EQUAL' if parity['equal'] else 'MISMATCH'} (rel tol {tol:g})", flush=True)
            tag = "warm-up" if i < args.warmup else f"step {i - args.warmup + 1}/{args.steps}"
            if args.verbose:
                print(f"#   {tag}: megaspark {r['time']:.3f} s"
                      + (f", deepspec {rd['time']:.3f} s" if rd else ""), flush=True)
            if i >= args.warmup:
                ms_runs.append(r)
                if rd is not None:
                    ds_runs.append(rd)
        flops = _median([f["total"] for f in flops_list[args.warmup:]])
        tokens = ms_runs[0]["real_tokens"]
        fl = flops_list[-1]
        print(f"# matmul FLOPs per step: {flops / 1e9:.2f} GFLOP (draft layers {fl['layers'] / 1e9:.2f}, "
              f"heads + loss {fl['loss'] / 1e9:.2f}; {ms_runs[-1]['supervised_rows']} supervised rows); "
              f"{tokens} real tokens per step", flush=True)
        res.update(flops_per_step=flops, gemm_peak_flops=peaks, real_tokens_per_step=tokens,
                   supervised_rows=ms_runs[-1]["supervised_rows"])
        impls = [("megaspark", ms_runs)] + ([("deepspec", ds_runs)] if ds is not None else [])
        for impl, runs in impls:
            s = _summary(runs, flops, peaks, tokens)
            res[impl] = s
            mfu = ", ".join(f"{v:.3f} of the {k} peak" for k, v in s["mfu"].items())
            print(f"{impl:10s} step {s['step_time_s']:.3f} s (median of {len(runs)}; min {s['min_s']:.3f} "
                  f"max {s['max_s']:.3f}; cpu/wall {s['cpu_over_wall']:.2f}) | tokens/s "
                  f"{s['tokens_per_s']:.0f} | MFU {mfu}", flush=True)
            print(_stage_line(impl, s["stages_s"], s["step_time_s"]), flush=True)
        if ds is not None:
            ratio = _ratio(res["megaspark"]["step_time_s"], res["deepspec"]["step_time_s"])
            paired = _median([_ratio(a["time"], b["time"]) for a, b in zip(ms_runs, ds_runs)])
            aim = ""
            if name == "issue" and res["threads"] == 1 and not args.bf16:
                aim = f"  (aim <= {STEP_RATIO_AIM}: {'met' if ratio <= STEP_RATIO_AIM else 'NOT met'})"
            print(f"step time  megaspark/deepspec = {ratio:.3f}{aim}", flush=True)
            print(f"step time  megaspark/deepspec per step (median of paired ratios) = {paired:.3f}", flush=True)
            res["ratio"] = dict(step_time=ratio, paired_median=paired)
            res["parity"] = parity
        if not args.skip_memory:
            mem = ms.loss_memory(_bench_loss_module())
            res["loss_memory"] = mem
            print(f"loss  peak extra memory  megaspark/naive = {mem['ratio']:.3f}  (megaspark "
                  f"{mem['megaspark_bytes'] / 2**30:.3f} GiB, naive full-logits {mem['naive_bytes'] / 2**30:.3f} "
                  f"GiB; {mem['rows']} rows, loss {mem['loss_megaspark']:.6f} vs {mem['loss_naive']:.6f})",
                  flush=True)
        del ds, ms
        gc.collect()
    return res, ok


# ============================================================================ driver
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Time megaspark's whole DSpark training step (fwd + loss + bwd + optimizer), "
        "its stages, MFU and the loss's peak memory; with DEEPSPEC_SRC set, DeepSpec's step side "
        "by side on the same batch, anchors and weights.")
    p.add_argument("--config", choices=["issue", "smollm2", "both"], default="issue",
                   help="issue: H 256, V 8192, S 512, N 64, B 7, 7 samples; smollm2: H 576, V 49152, "
                   "9/3x64 heads, FFN 1536, 2 samples; both (default: issue)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per implementation (default 9; --quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first; the first is the parity "
                   "check (default 2; --quick 1)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--bf16", action="store_true", help="bf16 parameters/activations (megaspark --bf16; "
                   "DeepSpec's model in bf16 with its BF16Optimizer); also times a bf16 GEMM peak")
    p.add_argument("--batch", type=int, default=None, help="samples per step (default: the configuration's)")
    p.add_argument("--gemm-size", type=int, default=None, help="n of the n^3 peak GEMM (default 2048; --quick 256)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--json", metavar="PATH", help="also write all results to this JSON file")
    p.add_argument("--quick", action="store_true", help="one tiny configuration (CI smoke), ignores --config")
    p.add_argument("--no-deepspec", action="store_true", help="ignore DEEPSPEC_SRC")
    p.add_argument("--skip-memory", action="store_true", help="skip the loss peak-memory measurement")
    p.add_argument("--verbose", action="store_true", help="print every step's time")
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 2 if args.quick else 9
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    if args.steps < 1 or args.warmup < 1:
        p.error("--steps and --warmup must be >= 1 (the first warm-up step is the parity check)")
    if args.threads < 1:
        p.error("--threads must be >= 1")
    if args.batch is not None and args.batch < 1:
        p.error("--batch must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    deepspec_src = None
    if os.environ.get("DEEPSPEC_SRC") and not args.no_deepspec:
        try:
            deepspec_src = check_deepspec_src(os.environ["DEEPSPEC_SRC"])
        except DeepSpecSourceError as e:
            print(f"bench_step.py: error: {e}", file=sys.stderr)
            return 2
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(args.threads)
    from megaspark.parallel import init_single_process_group

    with contextlib.redirect_stdout(sys.stderr):  # megatron's start-up chatter
        init_single_process_group(seed=args.seed, device="cpu")
    torch.set_num_threads(args.threads)
    names = ["quick"] if args.quick else (["issue", "smollm2"] if args.config == "both" else [args.config])
    results = dict(load_start=_loadavg(), torch=torch.__version__, threads=args.threads,
                   deepspec_src=deepspec_src, configs={})
    print(f"# bench_step: load average {results['load_start']} at start, torch {torch.__version__}, "
          f"{args.threads} thread(s), {args.warmup} warm-up + {args.steps} timed steps"
          + ("" if deepspec_src else "; DeepSpec: not compared (DEEPSPEC_SRC unset)"), flush=True)
    if args.quick:
        print("# --quick: tiny shapes; the numbers measure overheads, not the real trade-off", flush=True)
    ok = True
    try:
        for name in names:
            res, good = run_config(name, args, deepspec_src)
            results["configs"][name] = res
            ok &= good
    except DeepSpecSourceError as e:
        print(f"bench_step.py: error: {e}", file=sys.stderr)
        return 2
    results["load_end"] = _loadavg()
    results["parity_ok"] = bool(ok)
    print(f"# load average {results['load_end']} at the end", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=float)
        print(f"# results written to {args.json}")
    if not ok:
        print("ERROR: megaspark and DeepSpec differ on the same batch; the time ratio is meaningless",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
