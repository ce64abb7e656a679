"""The start-up memory plan (megaspark/memory_plan.py, tools/memory_plan.py).

* Parameter counts per rank are exact: for GQA and MLA drafts, every Markov head type,
  confidence with and without Markov features and a DFlash-shaped draft, the plan's trainable
  and frozen counts (and bytes, fp32 and bf16) equal those of the DSparkModel chunks that
  ``pretrain_dspark.model_provider`` builds at TP=2, TP=1, PP=2 (first and last stage) and
  interleaved PP=2 with two virtual stages.
* The estimate matches measured memory: one CPU training step (megatron-core DDP with fp32
  gradient buffers, the megatron optimizer with its state allocated, the trainer's input
  preparation and megatron's forward-backward schedule) at TP=1, TP=2, PP=2 with two
  micro-batches (both stages) and bf16 at TP=2 — the peak of live tensor bytes (tracked per
  storage by a dispatch mode) against the plan's activations (within 25 %) and total, the
  static part (parameters, gradients, optimizer state, inputs) within 2 %.
* The target's share: the parameter count from the config equals the built model's, and the
  inference peak of a small Qwen3 with ``output_hidden_states`` matches the estimate.
* The Qwen3-8B recipe (examples/qwen3_8b/train.sh, config.json only) fits 80 GB per rank
  through tools/memory_plan.py; a budget that is too small is refused with a message that
  names the largest items and the levers.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import weakref
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tests.launcher import run_distributed, tool

ROOT = Path(__file__).resolve().parents[1]
MEASURE_TOL = 0.25  # activations and totals: estimate within 25 % of the measured peak
STATIC_TOL = 0.02  # parameters, gradients, optimizer state, inputs: within 2 %


# ----------------------------------------------------------------------------- measuring
class LiveStorageTracker(TorchDispatchMode):
    """Bytes of tensor storages created while active and still alive (``current``) and their
    maximum (``peak``). A storage counts once, however many views share it; storages that
    existed before (or are an op's input: views, in-place ops) are not counted."""

    def __init__(self):
        super().__init__()
        self.live: dict = {}
        self.refs: dict = {}
        self.current = 0
        self.peak = 0

    def reset_peak(self):
        self.peak = self.current

    def _freed(self, key):
        self.current -= self.live.pop(key, 0)
        self.refs.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in self.live or key in inputs:
                continue
            self.live[key] = storage.nbytes()
            self.current += self.live[key]
            self.refs[key] = weakref.ref(storage, lambda _r, k=key: self._freed(k))
            self.peak = max(self.peak, self.current)
        return out


# ----------------------------------------------------------------------------- configs
def _config(**fields):
    from megaspark.config import DSparkConfig

    base = dict(hidden_size=64, num_layers=4, num_attention_heads=4, num_query_groups=2,
                kv_channels=16, ffn_hidden_size=96, vocab_size=256, target_model_type="llama",
                num_target_layers=8, target_layer_ids=[1, 3, 5], block_size=4, num_anchors=6,
                mask_token_id=3, markov_rank=8)
    base.update(fields)
    return DSparkConfig(**base).validate(2)


MLA = dict(attention_type="mla", num_query_groups=4, kv_channels=8, kv_lora_rank=32,
           qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
VARIANTS = {
    "gqa_vanilla_conf": {},
    "gqa_gated_conf_without_markov": dict(markov_head_type="gated", confidence_with_markov=False),
    "gqa_rnn_noconf_qknorm": dict(markov_head_type="rnn", confidence_head=False, qk_norm=True,
                                  target_model_type="qwen3"),
    "gqa_dflash_bias": dict(markov_rank=0, confidence_head=False, alpha_ce=1.0, alpha_l1=0.0,
                            attention_bias=True, target_model_type="qwen2"),
    "mla_vanilla_conf": dict(MLA),
    "mla_qlora_rnn_conf_without_markov": dict(MLA, q_lora_rank=24, markov_head_type="rnn",
                                              confidence_with_markov=False),
}
BF16_VARIANTS = ("gqa_vanilla_conf", "mla_qlora_rnn_conf_without_markov")
COUNT_LAYOUTS = [(2, 1, None), (1, 1, None), (1, 2, None), (1, 2, 2)]  # (TP, PP, VPP), 2 ranks

# The validation step (DESIGN: small but not tiny, activations dominate): hidden 256,
# S 512, N 64, B 7, V 8192; the prompt is the first quarter, so the anchors (and the context
# the attention sees) lie in the answer, as in chat data.
MEASURE_FIELDS = dict(hidden_size=256, num_layers=4, num_attention_heads=4, num_query_groups=2,
                      kv_channels=64, ffn_hidden_size=768, vocab_size=8192, num_target_layers=8,
                      target_layer_ids=[1, 3, 5], block_size=7, num_anchors=64, markov_rank=64,
                      loss_chunk_rows=128, attention_chunk_blocks=16)
MEASURE_S, MEASURE_B = 512, 1
MEASURE_LAYOUTS = [  # (name, TP, PP, micro-batches, bf16)
    ("tp1", 1, 1, 1, False),
    ("tp2", 2, 1, 1, False),
    ("pp2", 1, 2, 2, False),
    ("tp2_bf16", 2, 1, 1, True),
]


def _args(tp, pp, vpp=None, bf16=False, b=1, S=64, micro=1, dp=1, **extra):
    from megaspark.arguments import build_parser

    args = build_parser().parse_args(["--data-path", "."])  # defaults, no validation
    args.tensor_model_parallel_size, args.pipeline_model_parallel_size = tp, pp
    args.virtual_pipeline_model_parallel_size = vpp
    args.bf16, args.micro_batch_size, args.seq_length = bf16, b, S
    args.num_microbatches, args.global_batch_size = micro, micro * b * dp
    args.use_distributed_optimizer = False
    args.target_dtype = torch.bfloat16 if bf16 else torch.float32
    args.target_dtype_resolved = args.target_dtype
    args.memory_budget_gb = None
    args.train_iters, args.transformer_impl = 1, "local"
    for k, v in extra.items():
        setattr(args, k, v)
    return args


def _ranks():
    from megatron.core import parallel_state as ps

    return (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
            ps.get_data_parallel_world_size())


def _count_params(args, d):
    from megaspark.arguments.configs import run_config
    from megaspark.training.pretrain import build_model_chunks
    from pretrain_dspark import model_provider

    chunks, _ = build_model_chunks(run_config(args), d, model_provider)
    out = dict(trainable=0, frozen=0, trainable_bytes=0, frozen_bytes=0)
    for chunk in chunks:
        for p in chunk.parameters():
            kind = "trainable" if p.requires_grad else "frozen"
            out[kind] += p.numel()
            out[f"{kind}_bytes"] += p.numel() * p.element_size()
    return out


def _plan(args, d, computes_target=False, hf_config=None):
    from megaspark.arguments.configs import plan_settings
    from megaspark.memory_plan import plan_memory

    tp_rank, pp_rank, dp = _ranks()
    return plan_memory(plan_settings(args), d, hf_config, tp_rank=tp_rank, pp_rank=pp_rank, dp_size=dp,
                       computes_target=computes_target)


# ----------------------------------------------------------------------------- one training step
class _FakeTarget:
    """Random tapped features and last hidden state of the right shapes (the target's own cost
    is tested separately)."""

    def __init__(self, d, dtype):
        self.d, self.dtype = d, dtype

    def compute(self, input_ids, attention_mask=None):
        from megaspark.targets.base import TargetOutput

        b, S = input_ids.shape
        g = torch.Generator().manual_seed(int(input_ids.sum()))
        aux = torch.randn(b, S, self.d.context_width, generator=g).to(self.dtype)
        last = torch.randn(b, S, self.d.hidden_size, generator=g).to(self.dtype)
        return TargetOutput(aux_hidden_states=aux, last_hidden_states=last)


def _micro_batches(d, count, b, S):
    from megaspark.training.batches import MicroBatch

    out = []
    for i in range(count):
        g = torch.Generator().manual_seed(100 + i)
        ids = torch.randint(0, d.vocab_size, (b, S), generator=g)
        mask = torch.ones(b, S, dtype=torch.long)
        mask[:, : S // 4] = 0  # prompt, then the supervised answer
        out.append(MicroBatch(ids, mask, list(range(i * b, (i + 1) * b))))
    return out


def _measure_step(name, tp, pp, micro, bf16):
    """Peak live tensor bytes of one training step at the current layout, with the pieces
    the plan predicts."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megaspark.training.batches import computes_target, prepare_micro_batches
    from megaspark.arguments.configs import run_config
    from megaspark.training.pretrain import build_model_chunks
    from megaspark.training.trainer import build_optimizer, wrap_ddp
    from pretrain_dspark import forward_step, model_provider

    d = _config(**MEASURE_FIELDS)
    _, _, dp = _ranks()
    args = _args(tp, pp, bf16=bf16, b=MEASURE_B, S=MEASURE_S, micro=micro, dp=dp)
    dtype = torch.bfloat16 if bf16 else torch.float32
    torch.manual_seed(0)
    tracker = LiveStorageTracker()
    with tracker:
        cfg = run_config(args)
        chunks, tcfg = build_model_chunks(cfg, d, model_provider)
        ddp = wrap_ddp(chunks, tcfg, cfg.parallel.use_distributed_optimizer)
        tcfg.no_sync_func = ddp[0].no_sync
        tcfg.finalize_model_grads_func = finalize_model_grads
        optimizer, _ = build_optimizer(cfg.optim, ddp, cfg.parallel.use_distributed_optimizer)
        for chunk in ddp:
            chunk.zero_grad_buffer()
        optimizer.step()  # zero gradients: allocates Adam's state, leaves the weights alone
        static = tracker.current
        target = _FakeTarget(d, dtype) if computes_target() else None
        inputs, denominator = prepare_micro_batches(
            _micro_batches(d, micro, MEASURE_B, MEASURE_S), d, 1, target=target,
            dp_group=ps.get_data_parallel_group(), device="cpu", feature_dtype=dtype,
            expect_features=True)
        for x in inputs:
            x.loss_scale, x.global_denominator = float(micro * dp), denominator
        with_inputs = tracker.current
        tracker.reset_peak()
        for chunk in ddp:
            chunk.zero_grad_buffer()
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(inputs), model=ddp,
            num_microbatches=micro, seq_length=MEASURE_S + d.num_anchors * d.block_size,
            micro_batch_size=MEASURE_B, forward_only=False)
        peak = tracker.peak
    plan = _plan(args, d)
    return dict(name=name, static=static, inputs=with_inputs - static, peak=peak,
                activations=peak - with_inputs, plan=plan)


# ----------------------------------------------------------------------------- the worker
def _worker(rank, world_size):
    from megaspark.parallel import initialize_distributed

    counts = []
    for tp, pp, vpp in COUNT_LAYOUTS:
        initialize_distributed(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                               virtual_pipeline_model_parallel_size=vpp)
        for name, fields in VARIANTS.items():
            d = _config(**fields)
            for bf16 in (False, True) if name in BF16_VARIANTS else (False,):
                args = _args(tp, pp, vpp, bf16=bf16, dp=2 // (tp * pp))
                plan = _plan(args, d)
                got = _count_params(args, d)
                want = dict(trainable=plan.trainable_numel, frozen=plan.frozen_numel,
                            trainable_bytes=plan.draft_trainable_params,
                            frozen_bytes=plan.draft_frozen_params)
                counts.append(((tp, pp, vpp), name, bf16, _ranks()[1], got, want))
    measured = []
    for name, tp, pp, micro, bf16 in MEASURE_LAYOUTS:
        initialize_distributed(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        measured.append(_measure_step(name, tp, pp, micro, bf16))
    return dict(counts=counts, measured=measured)


@pytest.fixture(scope="module")
def distributed_results():
    return run_distributed(_worker, 2)


def test_parameter_counts_are_exact(distributed_results):
    seen = set()
    for rank, result in enumerate(distributed_results):
        for layout, name, bf16, pp_rank, got, want in result["counts"]:
            assert got == want, (layout, name, bf16, f"rank {rank}", f"pp stage {pp_rank}", got, want)
            seen.add((layout, pp_rank))
    # every layout, and both pipeline stages of the PP layouts, were compared
    assert seen == {((2, 1, None), 0), ((1, 1, None), 0), ((1, 2, None), 0), ((1, 2, None), 1),
                    ((1, 2, 2), 0), ((1, 2, 2), 1)}


def _measurements(distributed_results):
    for rank, result in enumerate(distributed_results):
        for m in result["measured"]:
            yield rank, m


def test_static_memory_matches(distributed_results):
    """Parameters, fp32 gradient buffers and Adam state (with fp32 master weights in bf16), and
    the inputs of the step's micro-batches: as allocated by megatron-core."""
    for rank, m in _measurements(distributed_results):
        p = m["plan"]
        want = p.draft_trainable_params + p.draft_frozen_params + p.grads + p.optimizer
        assert abs(m["static"] - want) <= STATIC_TOL * want, (m["name"], rank, m["static"], want)
        assert abs(m["inputs"] - p.inputs) <= STATIC_TOL * p.inputs, (m["name"], rank, m["inputs"], p.inputs)


def test_activation_estimate_matches_measured_peak(distributed_results):
    report = []
    for rank, m in _measurements(distributed_results):
        p = m["plan"]
        report.append(f"{m['name']} rank {rank}: activations measured {m['activations'] / 2**20:.1f} MiB, "
                      f"planned {p.activations / 2**20:.1f} MiB; peak {m['peak'] / 2**20:.1f} MiB, "
                      f"planned total {p.total / 2**20:.1f} MiB")
    print("\n".join(report))
    for rank, m in _measurements(distributed_results):
        p = m["plan"]
        assert abs(p.activations - m["activations"]) <= MEASURE_TOL * m["activations"], report
        assert abs(p.total - m["peak"]) <= MEASURE_TOL * m["peak"], report
    # the layouts really differ: TP=2 and the second pipeline stage hold less than TP=1
    by = {(m["name"], rank): m["activations"] for rank, m in _measurements(distributed_results)}
    assert by[("tp2", 0)] < 0.75 * by[("tp1", 0)]
    assert by[("pp2", 1)] < by[("pp2", 0)] or by[("pp2", 0)] < by[("tp1", 0)]


def test_pipeline_in_flight_counts():
    from megaspark.memory_plan import in_flight_units

    assert in_flight_units(1, None, 0, 8) == [1]
    assert in_flight_units(4, None, 0, 8) == [4] and in_flight_units(4, None, 3, 8) == [1]
    assert in_flight_units(4, None, 0, 2) == [2]  # never more than the micro-batches of a step
    # interleaved, 2 stages x 2 virtual: stage 0 warms up 2·1 + 1·2 = 4 chunk forwards, +1
    assert in_flight_units(2, 2, 0, 4) == [3, 2]
    assert sum(in_flight_units(2, 2, 1, 4)) == 3


# ----------------------------------------------------------------------------- the target
def _small_qwen3():
    from transformers import Qwen3Config

    return Qwen3Config(hidden_size=256, num_hidden_layers=8, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=64, intermediate_size=768, vocab_size=1000,
                       tie_word_embeddings=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_target_share_matches(dtype):
    from transformers import AutoModelForCausalLM

    from megaspark.memory_plan import target_activation_bytes, target_parameter_count

    cfg = _small_qwen3()
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").to(dtype).eval()
    assert target_parameter_count(cfg) == sum(p.numel() for p in model.parameters())
    b, S, taps = 2, 512, (1, 3, 5)
    ids = torch.randint(0, cfg.vocab_size, (b, S), generator=torch.Generator().manual_seed(0))
    tracker = LiveStorageTracker()
    with torch.no_grad(), tracker:  # what megaspark.targets.hf.HFTargetProvider.compute does
        out = model.get_decoder()(input_ids=ids, output_hidden_states=True, use_cache=False,
                                  return_dict=True)
        aux = torch.cat([out.hidden_states[k + 1] for k in taps], dim=-1)
    assert aux.shape == (b, S, len(taps) * cfg.hidden_size)
    features = b * S * len(taps) * cfg.hidden_size * dtype.itemsize
    est = target_activation_bytes(cfg, b, S, dtype.itemsize, features)
    assert abs(est - tracker.peak) <= MEASURE_TOL * tracker.peak, (est, tracker.peak)


# ----------------------------------------------------------------------------- the refusal
def _plan_for(budget_gb=None, **overrides):
    from megaspark.memory_plan import PlanSettings, plan_memory

    d = _config(**dict(MEASURE_FIELDS, num_layers=2))
    settings = dict(tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                    virtual_pipeline_model_parallel_size=None, micro_batch_size=1,
                    seq_length=512, bf16=True, use_distributed_optimizer=False,
                    target_dtype=torch.bfloat16, memory_budget_gb=budget_gb, num_microbatches=4)
    settings.update(overrides)
    return plan_memory(PlanSettings(**settings), d, _small_qwen3(), tp_rank=0, pp_rank=0, dp_size=4,
                       computes_target=True)


def test_check_refuses_with_levers():
    from megaspark.memory_plan import MemoryPlanError

    plan = _plan_for()
    assert plan.target_weights > 0 and plan.target_activations > 0 and plan.activations > 0
    assert plan.total > plan.activations + plan.grads + plan.optimizer + plan.target_weights
    plan.check(None)
    plan.check(plan.total)
    with pytest.raises(MemoryPlanError) as e:
        plan.check(plan.total // 2)
    message = str(e.value)
    assert "--memory-budget-gb" in message and "largest:" in message
    for lever in ("--micro-batch-size", "--seq-length", "--tensor-model-parallel-size"):
        assert lever in message, message
    assert "memory plan" in message and "total" in message  # the table comes with it


def test_distributed_optimizer_divides_optimizer_state():
    plain, sharded = _plan_for(), _plan_for(use_distributed_optimizer=True)
    assert sharded.optimizer == sharded.optimizer_distributed < plain.optimizer
    assert plain.optimizer == plain.optimizer_without_distributed == sharded.optimizer_without_distributed
    # bf16: Adam moments 8 B + fp32 master weights 4 B per parameter, over DP 4
    assert plain.optimizer == 12 * plain.trainable_numel
    assert sharded.optimizer_distributed == -(-plain.optimizer // 4)
    assert plain.total - sharded.total == plain.optimizer - sharded.optimizer


# ----------------------------------------------------------------------------- Qwen3-8B recipe
QWEN3_8B = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=4096,
                num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                intermediate_size=12288, vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1e6,
                max_position_embeddings=40960, tie_word_embeddings=False, hidden_act="silu",
                attention_bias=False, torch_dtype="bfloat16")


def _recipe_argv(tmp_path):
    """The flags of examples/qwen3_8b/train.sh (PRINT_ONLY=1) with Qwen3-8B's config.json alone."""
    target = tmp_path / "Qwen3-8B"
    target.mkdir()
    (target / "config.json").write_text(json.dumps(QWEN3_8B))
    data = tmp_path / "data"
    data.mkdir()
    (data / "meta.json").write_text(json.dumps({"counts": {"train": 100_000}}))
    env = dict(os.environ, PRINT_ONLY="1", DATA=str(data), TARGET_MODEL=str(target))
    env.pop("TRAIN_ITERS", None)
    r = subprocess.run(["bash", str(ROOT / "examples/qwen3_8b/train.sh")], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    argv = shlex.split(r.stdout)
    assert argv[:4] == ["torchrun", "--nproc-per-node", "8", "pretrain_dspark.py"]
    return argv[4:]


def _tool(*argv):
    """tools/memory_plan.py as a command (its exit status and output)."""
    return tool("memory_plan.py", *argv, timeout=120)


def _tool_main(capsys, *argv):
    """tools/memory_plan.py's main() in this process (no start-up cost): (status, out, err)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("memory_plan_tool", ROOT / "tools/memory_plan.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    capsys.readouterr()
    status = tool.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_qwen3_8b_recipe_fits_80gb(tmp_path, capsys):
    argv = _recipe_argv(tmp_path)
    status, out, err = _tool_main(capsys, "--world-size", "8", "--json", *argv)
    assert status == 0, out + err
    plans = json.loads(out)
    assert len(plans) == 1 and plans[0]["ranks"] == list(range(8))  # TP1 PP1 DP8: one role
    p = plans[0]
    assert p["fits"] and p["total"] <= 80e9
    assert p["target_numel"] == 8_190_735_360  # Qwen3-8B, untied embeddings
    assert p["target_weights"] == 2 * p["target_numel"]  # bf16
    assert p["frozen_numel"] == 2 * 151936 * 4096
    # one that does not fit: refused with status 1 and the levers
    status, out, err = _tool_main(capsys, "--world-size", "8", *argv, "--memory-budget-gb", "40")
    assert status == 1
    assert "DOES NOT FIT" in out and "--use-distributed-optimizer" in err
    # the command itself prints the table examples/qwen3_8b/README.md shows
    r = _tool("--world-size", "8", *argv)
    assert r.returncode == 0, r.stderr
    assert "-> fits" in r.stdout and "target weights" in r.stdout and "draft activations" in r.stdout
    # ... exactly (examples/qwen3_8b/README.md, "Memory per GPU")
    readme = (ROOT / "examples/qwen3_8b/README.md").read_text()
    block = readme.split("$ python tools/memory_plan.py --world-size 8 $ARGV\n", 1)[1].split("```", 1)[0]
    assert block.strip() == r.stdout.strip()


def test_tool_prints_every_role(tmp_path, capsys):
    argv = _recipe_argv(tmp_path)
    status, out, err = _tool_main(
        capsys, "--world-size", "8", "--json", *argv, "--tensor-model-parallel-size", "2",
        "--pipeline-model-parallel-size", "4", "--num-layers", "8", "--global-batch-size", "4")
    assert status == 0, out + err
    plans = json.loads(out)
    roles = [(p["role"].split(",")[1].strip(), p["target_weights"] > 0) for p in plans]
    # first stage with and without the target, the largest middle stage, the last stage
    assert roles[0] == ("PP stage 0 of 4 (first)", True) and roles[1] == ("PP stage 0 of 4 (first)", False)
    assert any("middle" in r for r, _ in roles) and "(last)" in roles[-1][0]
    assert plans[0]["frozen_numel"] == 151936 * 4096 // 2  # embedding, vocab split over TP 2
    assert plans[0]["ranks"] == [0] and plans[1]["ranks"] == [1]  # TP ranks of stage 0 (DP 1)
    # bad flags: status 2 and the flag named
    status, out, err = _tool_main(capsys, "--world-size", "3", *argv, "--tensor-model-parallel-size", "2")
    assert status == 2 and "--tensor-model-parallel-size" in err
