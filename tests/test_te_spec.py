"""Transformer Engine spec selection, FP8 flags and config translation (CPU).

Transformer Engine cannot be installed here, so "TE available" is simulated: the import
probe and the GPU check are monkeypatched, and megatron's TE linears are replaced by
*fakes* — megatron's local Column/RowParallelLinear behind the exact keyword signatures of
megatron-core's ``TEColumnParallelLinear`` / ``TERowParallelLinear`` (checked against the
installed source), and carrying a non-empty ``_extra_state`` like TE's FP8 meta. With
them, a draft built from the TE spec must have the same parameter names, shapes, TP
attributes, initial values, checkpoint keys and loss as one built from the local spec
(gloo, TP=2 and TP=1). The real TE kernels and FP8 numerics need a GPU.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import inspect
import types
import warnings

import pytest
import torch

from megaspark import platform
from megaspark.models.dspark import te_spec
from tests import dspark_cases as dc
from tests.launcher import run_distributed


# ----------------------------------------------------------------------------- fakes
def make_fake_te_module(with_stride: bool = True):
    """A stand-in for ``megatron.core.extensions.transformer_engine``."""
    from megatron.core import tensor_parallel

    class TEColumnParallelLinear(tensor_parallel.ColumnParallelLinear):
        def __init__(self, input_size, output_size, *, config, init_method, gather_output,
                     bias, skip_bias_add, is_expert, skip_weight_param_allocation=False,
                     tp_comm_buffer_name=None, tp_group=None, stride=1):
            if gather_output:
                raise ValueError("Transformer Engine linear layers do not support gather_output = True")
            super().__init__(
                input_size, output_size, config=config, init_method=init_method, bias=bias,
                gather_output=False, stride=stride, skip_bias_add=skip_bias_add,
                skip_weight_param_allocation=skip_weight_param_allocation, is_expert=is_expert,
                tp_comm_buffer_name=tp_comm_buffer_name, tp_group=tp_group,
            )
            self.te_kwargs = dict(output_size=output_size, stride=stride,
                                  tp_comm_buffer_name=tp_comm_buffer_name)

        def get_extra_state(self):  # TE: serialized FP8 meta
            return torch.tensor([7.0])

        def set_extra_state(self, state):
            self.loaded_extra_state = state

    class TERowParallelLinear(tensor_parallel.RowParallelLinear):
        def __init__(self, input_size, output_size, *, config, init_method, bias,
                     input_is_parallel, skip_bias_add, is_expert, tp_comm_buffer_name=None,
                     tp_group=None):
            if not input_is_parallel:
                raise ValueError("Transformer Engine linear layers do not support input_is_parallel = False")
            super().__init__(
                input_size, output_size, config=config, init_method=init_method, bias=bias,
                input_is_parallel=True, skip_bias_add=skip_bias_add, is_expert=is_expert,
                tp_comm_buffer_name=tp_comm_buffer_name, tp_group=tp_group,
            )
            self.te_kwargs = dict(output_size=output_size, tp_comm_buffer_name=tp_comm_buffer_name)

        def get_extra_state(self):
            return torch.tensor([7.0])

        def set_extra_state(self, state):
            self.loaded_extra_state = state

    if not with_stride:
        class TEColumnParallelLinear(TEColumnParallelLinear):  # noqa: F811
            def __init__(self, input_size, output_size, *, config, init_method, gather_output,
                         bias, skip_bias_add, is_expert):
                raise AssertionError("must not be built")

    return types.SimpleNamespace(TEColumnParallelLinear=TEColumnParallelLinear,
                                 TERowParallelLinear=TERowParallelLinear)


def _installed_te_init_kwonly(class_name: str) -> list:
    """Keyword-only parameters of megatron-core's TE wrapper ``__init__`` (from source:
    the classes themselves are MagicMocks on a machine without TE)."""
    import megatron.core.extensions.transformer_engine as mte

    tree = ast.parse(open(mte.__file__).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                    return [a.arg for a in item.args.kwonlyargs]
    raise AssertionError(f"{class_name}.__init__ not found in {mte.__file__}")


@pytest.fixture
def simulated_te(monkeypatch):
    """TE 'imports' and a GPU 'is present'; the TE linears are the fakes."""
    fake = make_fake_te_module()
    monkeypatch.setattr(te_spec, "te_available", lambda: True)
    monkeypatch.setattr(te_spec, "_te_extension", lambda: fake)
    monkeypatch.setattr(platform, "gpu_available", lambda: True)
    return fake


@pytest.fixture
def gpu_without_te(monkeypatch):
    monkeypatch.setattr(platform, "gpu_available", lambda: True)
    monkeypatch.setattr(te_spec, "te_available", lambda: False)


# ----------------------------------------------------------------------------- spec choice
def test_local_is_the_default_on_cpu():
    assert not platform.gpu_available()
    assert te_spec.resolve_transformer_impl(None) == "local"
    from megatron.core import tensor_parallel

    spec = te_spec.select_layer_spec(None, qk_norm=False)
    assert spec.self_attention.linear_q is tensor_parallel.ColumnParallelLinear
    assert spec.self_attention.linear_proj is tensor_parallel.RowParallelLinear
    spec = te_spec.select_layer_spec("local", qk_norm=True)
    assert spec.self_attention.q_layernorm is not None


def test_te_cannot_be_probed_here():
    assert not te_spec.te_available()
    assert te_spec.te_unavailable_reason()


def test_te_requested_on_cpu_is_refused():
    with pytest.raises(RuntimeError, match="--transformer-impl transformer_engine") as e:
        te_spec.select_layer_spec("transformer_engine", qk_norm=False)
    assert "GPU" in str(e.value)
    with pytest.raises(te_spec.TransformerEngineUnavailableError, match="--transformer-impl"):
        te_spec.get_te_layer_spec(qk_norm=False)


def test_te_requested_on_gpu_without_te_is_refused(gpu_without_te):
    assert te_spec.resolve_transformer_impl(None) == "local"
    with pytest.raises(te_spec.TransformerEngineUnavailableError,
                       match="--transformer-impl transformer_engine.*Transformer Engine"):
        te_spec.select_layer_spec("transformer_engine", qk_norm=False)


def test_unknown_impl_is_refused():
    with pytest.raises(ValueError, match="--transformer-impl"):
        te_spec.resolve_transformer_impl("apex")
    with pytest.raises(ValueError, match="--transformer-impl"):
        te_spec.select_layer_spec("apex", qk_norm=False)


def test_te_is_the_default_where_it_runs(simulated_te):
    assert te_spec.resolve_transformer_impl(None) == "transformer_engine"
    assert te_spec.resolve_transformer_impl("local") == "local"
    assert te_spec.select_layer_spec("local", qk_norm=False).self_attention.linear_q is not \
        simulated_te.TEColumnParallelLinear


@pytest.mark.parametrize("qk_norm", [False, True])
def test_te_spec_slots(simulated_te, qk_norm):
    from megatron.core.transformer.mlp import MLP

    from megaspark.models.dspark.norms import HeadRMSNorm, RMSNorm

    for spec in (te_spec.select_layer_spec("transformer_engine", qk_norm),
                 te_spec.select_layer_spec(None, qk_norm),
                 te_spec.get_te_layer_spec(qk_norm)):
        col, row = simulated_te.TEColumnParallelLinear, simulated_te.TERowParallelLinear
        attn = spec.self_attention
        assert (attn.linear_q, attn.linear_kv, attn.linear_proj) == (col, col, row)
        assert spec.mlp.module is MLP
        assert (spec.mlp.submodules.linear_fc1, spec.mlp.submodules.linear_fc2) == (col, row)
        # norms stay megaspark's (not TENorm, not fused into the linears)
        assert spec.input_layernorm is RMSNorm and spec.pre_mlp_layernorm is RMSNorm
        expected = HeadRMSNorm if qk_norm else None
        assert attn.q_layernorm is expected and attn.k_layernorm is expected


def test_te_spec_refuses_a_column_linear_without_stride(monkeypatch):
    fake = make_fake_te_module(with_stride=False)
    monkeypatch.setattr(te_spec, "te_available", lambda: True)
    monkeypatch.setattr(te_spec, "_te_extension", lambda: fake)
    with pytest.raises(RuntimeError, match="stride.*--transformer-impl local"):
        te_spec.get_te_layer_spec(qk_norm=False)


@pytest.mark.parametrize("name", ["TEColumnParallelLinear", "TERowParallelLinear"])
def test_fakes_have_the_installed_te_signatures(name):
    """The fakes accept exactly the keywords of the installed megatron-core's wrappers, so
    the parallel test below also proves DualSourceAttention/MLP pass only accepted kwargs."""
    fake = getattr(make_fake_te_module(), name)
    fake_kw = [p.name for p in inspect.signature(fake.__init__).parameters.values()
               if p.kind is inspect.Parameter.KEYWORD_ONLY]
    installed = _installed_te_init_kwonly(name)
    assert fake_kw == [k for k in installed if k != "name"], (fake_kw, installed)
    if name == "TEColumnParallelLinear":
        assert "stride" in installed


# ----------------------------------------------------------------------------- FP8 flags
def _parse(argv, bf16=False):
    from megaspark.arguments import add_fp8_arguments

    p = argparse.ArgumentParser()
    p.add_argument("--bf16", action="store_true")
    add_fp8_arguments(p)
    return p.parse_args(argv + (["--bf16"] if bf16 else []))


def _validate(argv, bf16=False):
    from megaspark.arguments.validation import validate_fp8_args

    args = _parse(argv, bf16)
    validate_fp8_args(args)
    return args


def test_flag_defaults_on_cpu():
    args = _validate([])
    assert args.transformer_impl == "local" and args.fp8_format is None
    assert args.fp8_amax_history_len is None and args.fp8_amax_compute_algo is None
    assert _validate(["--transformer-impl", "local"]).transformer_impl == "local"


@pytest.mark.parametrize("argv", [["--fp8-format", "e5m2"], ["--transformer-impl", "te"],
                                  ["--fp8-amax-compute-algo", "mean"]])
def test_flag_choices(argv):
    with pytest.raises(SystemExit):
        _parse(argv)


@pytest.mark.parametrize("argv, flag", [
    (["--fp8-amax-history-len", "16"], "--fp8-amax-history-len"),
    (["--fp8-amax-compute-algo", "most_recent"], "--fp8-amax-compute-algo"),
    (["--fp8-margin", "1"], "--fp8-margin"),
])
def test_fp8_tuning_without_fp8_is_refused(argv, flag):
    from megaspark.arguments import ArgumentError

    with pytest.raises(ArgumentError, match=f"{flag} only applies to FP8 training: add --fp8-format"):
        _validate(argv)


def test_fp8_with_local_impl_is_refused():
    from megaspark.arguments import ArgumentError

    with pytest.raises(ArgumentError,
                       match="--fp8-format e4m3 needs --transformer-impl transformer_engine.*"
                             "--transformer-impl local"):
        _validate(["--fp8-format", "e4m3", "--transformer-impl", "local"])


@pytest.mark.parametrize("argv, message", [
    (["--fp8-amax-history-len", "0"], "--fp8-amax-history-len must be >= 1"),
    (["--fp8-margin", "-1"], "--fp8-margin must be >= 0"),
])
def test_bad_fp8_tuning_values_are_refused(argv, message):
    from megaspark.arguments import ArgumentError

    with pytest.raises(ArgumentError, match=message):
        _validate(["--fp8-format", "hybrid"] + argv)


def test_fp8_without_gpu_is_refused():
    for argv in (["--fp8-format", "e4m3"], ["--fp8-format", "hybrid", "--transformer-impl",
                                            "transformer_engine"]):
        with pytest.raises(RuntimeError, match="--fp8-format needs Transformer Engine FP8 GEMMs"
                                               ".*CUDA GPU"):
            _validate(argv, bf16=True)


def test_te_impl_without_gpu_is_refused():
    with pytest.raises(RuntimeError, match="--transformer-impl transformer_engine needs .*CUDA GPU"):
        _validate(["--transformer-impl", "transformer_engine"])


def test_fp8_and_te_impl_without_te_are_refused(gpu_without_te):
    with pytest.raises(te_spec.TransformerEngineUnavailableError,
                       match="--fp8-format needs NVIDIA Transformer Engine"):
        _validate(["--fp8-format", "hybrid"], bf16=True)
    with pytest.raises(te_spec.TransformerEngineUnavailableError,
                       match="--transformer-impl transformer_engine needs NVIDIA Transformer "
                             "Engine.*use --transformer-impl local"):
        _validate(["--transformer-impl", "transformer_engine"])


def test_fp8_accepted_where_te_runs(simulated_te):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        args = _validate(["--fp8-format", "hybrid"], bf16=True)
    assert args.transformer_impl == "transformer_engine"
    assert (args.fp8_margin, args.fp8_amax_history_len, args.fp8_amax_compute_algo) == (0, 1024, "max")
    args = _validate(["--fp8-format", "e4m3", "--transformer-impl", "transformer_engine",
                      "--fp8-amax-history-len", "16", "--fp8-amax-compute-algo", "most_recent",
                      "--fp8-margin", "2"], bf16=True)
    assert (args.fp8_margin, args.fp8_amax_history_len, args.fp8_amax_compute_algo) == (2, 16, "most_recent")
    with pytest.warns(UserWarning, match="without --bf16"):
        _validate(["--fp8-format", "e4m3"])
    assert _validate([]).transformer_impl == "transformer_engine"  # TE is the default there


# ----------------------------------------------------------------------------- translation
def test_config_kwargs_without_fp8():
    from megaspark.arguments.configs import fp8_settings
    from megaspark.fp8 import Fp8Settings, fp8_transformer_config_kwargs

    assert fp8_transformer_config_kwargs(fp8_settings(_validate([]))) == {"transformer_impl": "local"}
    assert fp8_transformer_config_kwargs(Fp8Settings()) == {"transformer_impl": "local"}


def test_config_kwargs_with_fp8(simulated_te):
    from megaspark.arguments.configs import fp8_settings
    from megaspark.fp8 import fp8_transformer_config_kwargs

    args = _validate(["--fp8-format", "hybrid", "--fp8-amax-history-len", "64"], bf16=True)
    kwargs = fp8_transformer_config_kwargs(fp8_settings(args))
    assert kwargs == dict(transformer_impl="transformer_engine", fp8="hybrid", fp8_recipe="delayed",
                          fp8_margin=0, fp8_amax_history_len=64, fp8_amax_compute_algo="max")
    # unset tuning flags get the documented defaults
    raw = fp8_settings(argparse.Namespace(fp8_format="e4m3", transformer_impl="transformer_engine"))
    assert fp8_transformer_config_kwargs(raw) == dict(
        transformer_impl="transformer_engine", fp8="e4m3", fp8_recipe="delayed", fp8_margin=0,
        fp8_amax_history_len=1024, fp8_amax_compute_algo="max")
    # megatron-core's TransformerConfig takes them as they are
    tcfg = dc.make_config("S_vanilla_conf").transformer_config(**kwargs)
    assert (tcfg.fp8, tcfg.fp8_recipe, tcfg.fp8_margin, tcfg.fp8_amax_history_len,
            tcfg.fp8_amax_compute_algo, tcfg.transformer_impl) == (
        "hybrid", "delayed", 0, 64, "max", "transformer_engine")


def test_fp8_context(monkeypatch):
    from megatron.core import fp8_utils

    from megaspark.fp8 import fp8_context

    d = dc.make_config("S_vanilla_conf")
    assert isinstance(fp8_context(d.transformer_config()), contextlib.nullcontext)
    tcfg = d.transformer_config(fp8="e4m3", fp8_recipe="delayed")
    # megatron's own helper would silently return nullcontext here; ours refuses
    with pytest.raises(te_spec.TransformerEngineUnavailableError, match="--fp8-format"):
        fp8_context(tcfg)
    seen = []
    sentinel = contextlib.nullcontext("fp8")
    monkeypatch.setattr(te_spec, "te_available", lambda: True)
    monkeypatch.setattr(fp8_utils, "get_fp8_context",
                        lambda config, layer_no=-1, is_init=False: seen.append((config, layer_no, is_init)) or sentinel)
    assert fp8_context(tcfg) is sentinel
    assert seen == [(tcfg, -1, False)]


def test_fp8_shapes():
    from megaspark.arguments import ArgumentError
    from megaspark.config import DSparkConfig
    from megaspark.fp8 import fp8_shape_problems, validate_fp8_shapes

    good = dict(dc.BASE, hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=16,
                ffn_hidden_size=128, block_size=4, num_anchors=6)
    d = DSparkConfig(**good).validate()
    assert fp8_shape_problems(d, seq_length=16, micro_batch_size=1, tensor_model_parallel_size=2) == []
    validate_fp8_shapes(d, 16, 1, 2)
    # 2·(S + N·B) = 2·(13 + 24) = 74 rows of [C; X] for the kv projection
    problems = fp8_shape_problems(d, seq_length=13, micro_batch_size=2)
    assert len(problems) == 1 and "--seq-length" in problems[0] and "74" in problems[0]
    bad = DSparkConfig(**dict(good, num_anchors=5, ffn_hidden_size=72)).validate()
    problems = fp8_shape_problems(bad, seq_length=16, micro_batch_size=1, tensor_model_parallel_size=2)
    assert any("--num-anchors" in p and "= 20 " in p for p in problems), problems
    assert any("FFN width per TP rank" in p and "= 36 " in p for p in problems), problems
    with pytest.raises(ArgumentError, match="--fp8-format: Transformer Engine FP8 GEMMs need"):
        validate_fp8_shapes(bad, 16, 1, 2)
    # the defaults (B = 7, N = 512, S = 512) are fine for any micro-batch size
    big = DSparkConfig(**dict(good, block_size=7, num_anchors=512)).validate()
    assert fp8_shape_problems(big, 512, 3) == []


def test_wired_into_the_pretrain_parser():
    from megaspark.arguments import build_parser

    p = build_parser()
    flags = {s for a in p._actions for s in a.option_strings}
    assert {"--transformer-impl", "--fp8-format", "--fp8-margin"} <= flags
    args = p.parse_args([])
    assert args.transformer_impl is None and args.fp8_amax_history_len is None


# ----------------------------------------------------------------------------- same names
CASES = ("S_vanilla_noconf_qwen3", "D_rnn_noconf_bias")  # q/k norm; q/k/v bias + convention D


def _tp_attrs(p):
    return (bool(getattr(p, "tensor_model_parallel", False)), getattr(p, "partition_dim", None),
            getattr(p, "partition_stride", 1))


def _worker(rank, world_size):
    from megaspark.models.dspark.layer_specs import get_local_layer_spec
    from megaspark.models.dspark.model import DSparkModel
    from megaspark.models.dspark.state_dict_adapter import hf_state_dict, load_hf_state_dict
    from megaspark.parallel import initialize_distributed

    fake = make_fake_te_module()
    te_spec.te_available = lambda: True  # this process only
    te_spec._te_extension = lambda: fake
    results = {}
    for tp in (2, 1):
        initialize_distributed(tensor_model_parallel_size=tp)
        for name in CASES:
            d, _, weights, batch = dc.make_case(name)
            tcfg = d.transformer_config(tensor_model_parallel_size=tp)
            local = DSparkModel(tcfg, d, layer_spec=get_local_layer_spec(d.qk_norm), seed=5)
            te = DSparkModel(tcfg, d, layer_spec=te_spec.get_te_layer_spec(d.qk_norm), seed=5)
            r = {}
            lp, tpar = dict(local.named_parameters()), dict(te.named_parameters())
            r["names"] = (list(lp), list(tpar))
            r["mismatch"] = [
                n for n in lp
                if n not in tpar or lp[n].shape != tpar[n].shape
                or _tp_attrs(lp[n]) != _tp_attrs(tpar[n]) or not torch.equal(lp[n], tpar[n])
            ]
            layer = te.layers[0]
            r["te_classes"] = all(
                isinstance(m, (fake.TEColumnParallelLinear, fake.TERowParallelLinear))
                for m in (layer.self_attention.linear_q, layer.self_attention.linear_kv,
                          layer.self_attention.linear_proj, layer.mlp.linear_fc1, layer.mlp.linear_fc2)
            )
            r["te_kwargs"] = [
                {slot: getattr(getattr(lyr, part), slot).te_kwargs
                 for part, slots in (("self_attention", ("linear_q", "linear_kv", "linear_proj")),
                                     ("mlp", ("linear_fc1", "linear_fc2")))
                 for slot in slots}
                for lyr in te.layers
            ]
            # checkpoint keys and kinds (ShardedTensor / factory / ShardedObject) are the same
            lsd, tsd = local.sharded_state_dict(), te.sharded_state_dict()
            r["sharded"] = ({k: type(v).__name__ for k, v in lsd.items()},
                            {k: type(v).__name__ for k, v in tsd.items()})
            # a local state dict loads strictly into the TE model and vice versa
            local_state = {k: v.clone() if torch.is_tensor(v) else v for k, v in local.state_dict().items()}
            te.load_state_dict(te.state_dict(), strict=True)
            te.load_state_dict(local_state, strict=True)
            local.load_state_dict(te.state_dict(), strict=True)
            r["state_keys"] = (sorted(local.state_dict()), sorted(te.state_dict()))
            # same global weights -> same loss and gradients, same HF export names
            losses, grads = [], []
            for model in (local, te):
                load_hf_state_dict(model, weights)
                sums = model(dc.draft_inputs(d, batch))
                loss = sums.loss(d.alpha_ce, d.alpha_l1, d.alpha_conf)
                loss.backward()
                losses.append(loss.detach())
                grads.append(hf_state_dict(model, grads=True))
            r["loss"] = losses
            r["grad_diff"] = max(float((grads[0][k] - grads[1][k]).abs().max()) for k in grads[0])
            r["grad_keys"] = (sorted(grads[0]), sorted(grads[1]))
            r["export_keys"] = (sorted(hf_state_dict(local)), sorted(hf_state_dict(te)))
            r["kv_width"] = 2 * d.num_query_groups * d.kv_channels
            r["fc1_width"] = 2 * d.ffn_hidden_size
            results[(tp, name)] = r
    return results


@pytest.fixture(scope="module")
def parallel_results():
    return run_distributed(_worker, 2)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("tp", [2, 1])
def test_te_spec_yields_the_local_names(parallel_results, tp, name):
    for rank_results in parallel_results:
        r = rank_results[(tp, name)]
        local_names, te_names = r["names"]
        assert local_names == te_names
        assert any(n.endswith("self_attention.linear_q.weight") for n in te_names)
        assert any(n.endswith("mlp.linear_fc1.weight") for n in te_names)
        assert any(n.endswith("input_layernorm.weight") for n in te_names)
        assert r["mismatch"] == []  # shapes, TP split/stride attributes and seeded values
        assert r["te_classes"]
        assert r["sharded"][0] == r["sharded"][1]
        assert any(k.endswith("linear_kv.weight") and v == "ShardedTensorFactory"
                   for k, v in r["sharded"][1].items())
        assert r["state_keys"][0] == r["state_keys"][1]
        assert torch.equal(r["loss"][0], r["loss"][1])
        assert r["grad_diff"] == 0.0 and r["grad_keys"][0] == r["grad_keys"][1]
        assert r["export_keys"][0] == r["export_keys"][1]


@pytest.mark.parametrize("name", CASES)
def test_te_linears_get_megatron_kwargs(parallel_results, name):
    """The fused [k; v] and [gate; up] projections reach the TE column linear with stride 2
    (TP-size independent layout); the MLP passes TE's user-buffer names."""
    r = parallel_results[0][(2, name)]
    assert len(r["te_kwargs"]) == dc.make_config(name).num_layers
    for kw in r["te_kwargs"]:
        assert kw["linear_q"]["stride"] == 1
        assert kw["linear_kv"] == dict(output_size=r["kv_width"], stride=2, tp_comm_buffer_name=None)
        assert kw["linear_fc1"] == dict(output_size=r["fc1_width"], stride=2, tp_comm_buffer_name="fc1")
        assert kw["linear_fc2"]["tp_comm_buffer_name"] == "fc2"
        assert kw["linear_proj"]["tp_comm_buffer_name"] is None
