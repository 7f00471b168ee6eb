"""launch/tpu.sh and launch/gpu.sh against stub gcloud / srun / scontrol and a fake python.

Nothing here touches the network or a cloud: the stubs record every call, and the remote
commands tpu.sh hands to `gcloud ... ssh --command` are run by a real local bash, so the test
sees exactly the argv the worker's python would get.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TPU_SH = REPO / "launch" / "tpu.sh"
GPU_SH = REPO / "launch" / "gpu.sh"

# Words a shell would mangle: parentheses (the README's labels), spaces, both quotes, $, `, ;.
NASTY = ["--config=configs/xl.py", "--config.sample.labels=(3,5,8)",
         "--config.note=a b  'c' \"d\" $HOME `touch pwned` ; echo | & *", "--config.x=",
         "--config.train.num_steps=1000"]

# gcloud stand-in: records argv (one JSON list a line) and keeps a tiny state machine. `describe`
# answers the next scripted state (which then sticks, as a PREEMPTED TPU stays preempted),
# create makes the TPU READY (queued resource ACTIVE), delete makes it NOT_FOUND, and ssh with
# the run-status query answers the next scripted run state.
GCLOUD_STUB = r'''
import json, os, sys
d = os.environ["STUB_DIR"]
argv = sys.argv[1:]
with open(os.path.join(d, "calls.jsonl"), "a") as f:
    f.write(json.dumps(argv) + "\n")
path = os.path.join(d, "state.json")
with open(path) as f:
    st = json.load(f)
kind = "qr" if "queued-resources" in argv else "tpu"
verb = argv[3] if len(argv) > 3 else ""

def next_state(k):
    if st["queue"][k]:
        st["current"][k] = st["queue"][k].pop(0)
    return st["current"][k]

out = ""
if verb == "describe" and "--format=value(networkEndpoints[].ipAddress)" in argv:
    out = ";".join(f"10.0.0.{i}" for i in range(st.get("workers", 1)))
elif verb == "describe":
    s = next_state(kind)
    if s == "NOT_FOUND":
        print(f"ERROR: (gcloud) NOT_FOUND: Resource {argv[4]!r} was not found", file=sys.stderr)
    out = s
elif verb == "create":
    st["current"]["tpu"] = "READY"
    if kind == "qr":
        st["current"]["qr"] = "ACTIVE"
elif verb == "delete":
    st["current"]["tpu"] = "NOT_FOUND"
    if kind == "qr":
        st["current"]["qr"] = "NOT_FOUND"
elif verb == "ssh":
    cmd = next(a.split("=", 1)[1] for a in argv if a.startswith("--command="))
    if "radar_jax_status" in cmd:
        out = "radar_jax_status worker=0 " + next_state("run")
with open(path, "w") as f:
    json.dump(st, f)
if out == "NOT_FOUND":
    sys.exit(1)
if out:
    print(out)
'''

# python stand-in: records its argv, working folder and JAX_* environment to
# $FAKE_PY_OUT/python-<JAX_PROCESS_ID>.json; with FAKE_PY_WAIT it runs until SIGTERM and then
# exits 143, as radar_jax does after saving a checkpoint; else it exits FAKE_PY_EXIT (0).
FAKE_PYTHON = r'''
import json, os, signal, sys, time
keep = ("JAX_", "XLA_", "VIRTUAL_ENV", "CUDA_")
rec = {"argv": sys.argv[1:], "cwd": os.getcwd(),
       "env": {k: v for k, v in os.environ.items() if k.startswith(keep)}}
path = os.path.join(os.environ["FAKE_PY_OUT"], f"python-{os.environ.get('JAX_PROCESS_ID', 0)}.json")
signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
with open(path + ".tmp", "w") as f:
    json.dump(rec, f)
os.replace(path + ".tmp", path)
while os.environ.get("FAKE_PY_WAIT"):
    time.sleep(0.02)
sys.exit(int(os.environ.get("FAKE_PY_EXIT", "0")))
'''

# srun stand-in: records argv, then runs the command once per task (FAKE_NTASKS) with the
# variables a real step sets, forwarding SIGTERM to the tasks as srun does.
SRUN_STUB = r'''#!/usr/bin/env bash
printf '%s\n' "$@" > "$STUB_DIR/srun.args"
while [ "${1#--}" != "$1" ]; do shift; done
pids=()
for ((i = 0; i < FAKE_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=0 SLURM_NTASKS=$FAKE_NTASKS SLURM_STEP_ID=0 \
    CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7 "$@" &
  pids+=($!)
done
trap 'kill -TERM "${pids[@]}"' TERM
status=0
for p in "${pids[@]}"; do
  s=0; wait "$p" || s=$?
  while kill -0 "$p" 2>/dev/null; do s=0; wait "$p" || s=$?; done
  [ "$s" -gt "$status" ] && status=$s
done
exit "$status"
'''

SCONTROL_STUB = r'''#!/usr/bin/env bash
echo "$*" >> "$STUB_DIR/scontrol.log"
if [ "$1 $2" = "show hostnames" ]; then printf 'gpu007\ngpu008\n'; fi
'''


def _write_exe(path, text, python=False):
    # -S: no site import, so each stub call starts in tens of milliseconds.
    path.write_text((f"#!{sys.executable} -S\n" if python else "") + text)
    path.chmod(0o755)
    return path


@pytest.fixture
def sandbox(tmp_path):
    """Fake bin folder (gcloud, python, curl, srun, scontrol), HOME and stub state."""
    fakebin = tmp_path / "bin"
    fakebin.mkdir()
    _write_exe(fakebin / "gcloud", GCLOUD_STUB, python=True)
    _write_exe(fakebin / "python", FAKE_PYTHON, python=True)
    _write_exe(fakebin / "curl", "#!/bin/sh\nexit 7\n")  # the metadata server is not here
    _write_exe(fakebin / "srun", SRUN_STUB)
    _write_exe(fakebin / "scontrol", SCONTROL_STUB)
    home = tmp_path / "home"
    (home / "radar_jax").mkdir(parents=True)
    out = tmp_path / "out"
    out.mkdir()
    env = {"PATH": f"{fakebin}:/usr/bin:/bin", "HOME": str(home), "STUB_DIR": str(tmp_path),
           "GCLOUD": str(fakebin / "gcloud"), "FAKE_PY_OUT": str(out), "TPU_WORKER_ID": "0",
           "TMPDIR": str(tmp_path), "LANG": "C.UTF-8"}
    return {"tmp": tmp_path, "bin": fakebin, "home": home, "out": out, "env": env}


def _set_states(sb, tpu=(), qr=(), run=(), workers=1):
    state = {"workers": workers, "queue": {"tpu": list(tpu), "qr": list(qr), "run": list(run)},
             "current": {"tpu": "NOT_FOUND", "qr": "NOT_FOUND", "run": "none"}}
    (sb["tmp"] / "state.json").write_text(json.dumps(state))


def _tpu(sb, *args, check=True):
    proc = subprocess.run(["bash", str(TPU_SH), *args], env=sb["env"], capture_output=True,
                          text=True, timeout=60)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def _calls(sb):
    return [json.loads(line) for line in (sb["tmp"] / "calls.jsonl").read_text().splitlines()]


def _remote_commands(calls, marker):
    return [a.split("=", 1)[1] for c in calls if c[3] == "ssh" for a in c
            if a.startswith("--command=") and marker in a]


def _wait_for(path, timeout=10.0):
    end = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.02)
    return path


def _remote_bash(sb, script, **env):
    return subprocess.run(["bash", "-c", script], env={**sb["env"], **env}, capture_output=True,
                          text=True, timeout=30, check=True).stdout


# --- syntax ---------------------------------------------------------------------------------

@pytest.mark.parametrize("script", [TPU_SH, GPU_SH], ids=["tpu.sh", "gpu.sh"])
def test_bash_syntax(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.parametrize("script", [TPU_SH, GPU_SH], ids=["tpu.sh", "gpu.sh"])
def test_shellcheck(script):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    proc = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


# --- tpu.sh ---------------------------------------------------------------------------------

def test_tpu_overrides_reach_python_intact(sandbox):
    sb = sandbox
    _set_states(sb, tpu=["READY"], run=["none", "exit=0"], workers=8)  # a v5p-64 has 8 hosts
    _tpu(sb, "up", "--name=t1", "--zone=us-east5-a", "--type=v5p-64",
         "--workdir=gs://bucket/run", "--poll=0", "--", *NASTY)
    calls = _calls(sb)
    assert not [c for c in calls if c[3] == "create"], "a READY TPU is reused"
    assert [c for c in calls if c[3] == "scp" and "--worker=all" in c]
    for cmd in _remote_commands(calls, ""):  # setup, run, status: all parse as bash
        subprocess.run(["bash", "-n", "-c", cmd], check=True)
    assert any("uv venv" in cmd for cmd in _remote_commands(calls, "--python 3.11"))
    (run_cmd,) = _remote_commands(calls, "radar_jax.main")
    # What the worker's login shell does with --command: bash -c.
    print(_remote_bash(sb, run_cmd))
    exit_file = _wait_for(sb["home"] / "radar_jax_logs" / "worker-0.exit")
    rec = json.loads((sb["out"] / "python-0.json").read_text())
    assert rec["argv"] == ["-m", "radar_jax.main", "--workdir=gs://bucket/run", "--multihost",
                           *NASTY]
    assert rec["cwd"] == str(sb["home"] / "radar_jax")
    assert not (sb["home"] / "radar_jax" / "pwned").exists()
    assert exit_file.read_text().strip() == "0"
    assert "start on worker 0" in (sb["home"] / "radar_jax_logs" / "worker-0.log").read_text()
    # The status query the watch loop sends, run for real on this "worker".
    (status_cmd,) = set(_remote_commands(calls, "radar_jax_status"))
    assert _remote_bash(sb, status_cmd).strip() == "radar_jax_status worker=0 exit=0"


def test_tpu_stop_sends_sigterm_and_records_status(sandbox):
    sb = sandbox
    _set_states(sb, tpu=["READY"])
    _tpu(sb, "run", "--name=t1", "--zone=z", "--workdir=gs://b/r", "--", "--config=configs/xl.py")
    _tpu(sb, "stop", "--name=t1", "--zone=z")
    (run_cmd,) = _remote_commands(_calls(sb), "radar_jax.main")
    (stop_cmd,) = _remote_commands(_calls(sb), "SIGTERM")
    _remote_bash(sb, run_cmd, FAKE_PY_WAIT="1")
    _wait_for(sb["out"] / "python-0.json")
    assert "already running" in _remote_bash(sb, run_cmd, FAKE_PY_WAIT="1")
    out = _remote_bash(sb, stop_cmd)
    assert "exit status 143" in out, out
    # One host: no --multihost.
    assert json.loads((sb["out"] / "python-0.json").read_text())["argv"] == [
        "-m", "radar_jax.main", "--workdir=gs://b/r", "--config=configs/xl.py"]
    assert (sb["home"] / "radar_jax_logs" / "worker-0.exit").read_text().strip() == "143"


@pytest.mark.parametrize("flag", ["--spot", "--queued"])
def test_tpu_queued_resource_create(sandbox, flag):
    sb = sandbox
    _set_states(sb)  # nothing exists yet
    _tpu(sb, "create", "--name=t2", "--zone=us-east5-a", "--project=p", "--type=v5p-64", flag,
         "--poll=0")
    creates = [c for c in _calls(sb) if c[3] == "create"]
    assert len(creates) == 1
    c = creates[0]
    assert c[:5] == ["compute", "tpus", "queued-resources", "create", "t2"]
    assert {"--node-id=t2", "--accelerator-type=v5p-64", "--runtime-version=v2-alpha-tpuv5",
            "--zone=us-east5-a", "--project=p"} <= set(c)
    assert ("--spot" in c) == (flag == "--spot")


def test_tpu_preemption_recreates_and_restarts(sandbox):
    sb = sandbox
    # Reused READY, running; then PREEMPTED (sticks until deleted); the new TPU finishes.
    _set_states(sb, tpu=["READY", "READY", "PREEMPTED"], run=["none", "running", "exit=0"])
    proc = _tpu(sb, "up", "--name=t3", "--zone=z", "--type=v5p-8", "--workdir=gs://b/r",
                "--poll=0", "--", "--config=configs/xl.py")
    assert "restart 1 of 20" in proc.stderr
    calls = _calls(sb)
    verbs = [c[3] + (":run" if _remote_commands([c], "radar_jax.main") else "") for c in calls]
    assert verbs.count("ssh:run") == 2
    first_run = verbs.index("ssh:run")
    delete, create = verbs.index("delete"), verbs.index("create")
    second_scp = len(verbs) - 1 - verbs[::-1].index("scp")
    second_run = len(verbs) - 1 - verbs[::-1].index("ssh:run")
    assert first_run < delete < create < second_scp < second_run
    assert calls[create][:5] == ["compute", "tpus", "tpu-vm", "create", "t3"]
    assert "--version=v2-alpha-tpuv5" in calls[create]


def test_tpu_preempted_exit_status_restarts_on_same_tpu(sandbox):
    sb = sandbox
    _set_states(sb, tpu=["READY"], run=["none", "exit=143", "exit=0"])
    proc = _tpu(sb, "up", "--name=t4", "--zone=z", "--workdir=gs://b/r", "--poll=0", "--",
                "--config=configs/xl.py")
    verbs = [c[3] for c in _calls(sb)]
    assert "create" not in verbs and "delete" not in verbs
    assert len(_remote_commands(_calls(sb), "radar_jax.main")) == 2, proc.stderr


def test_tpu_failed_run_is_not_restarted(sandbox):
    sb = sandbox
    _set_states(sb, tpu=["READY"], run=["none", "exit=2"])
    proc = _tpu(sb, "up", "--name=t5", "--zone=z", "--workdir=gs://b/r", "--poll=0", "--",
                "--config=configs/xl.py", check=False)
    assert proc.returncode == 2
    assert "failed with status 2" in proc.stderr
    assert len(_remote_commands(_calls(sb), "radar_jax.main")) == 1


@pytest.mark.parametrize("args,message", [
    (["run", "--workdir=/local/dir", "--", "--config=c.py"], "gs://"),
    (["run", "--workdir=gs://b/r"], "after --"),
    (["create", "--name=x"], "--type"),
    (["up", "configs/xl.py"], "after --"),
    (["run", "--colour=red"], "unknown option --colour"),
])
def test_tpu_usage_errors(sandbox, args, message):
    _set_states(sandbox)
    proc = _tpu(sandbox, *args, check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


# --- gpu.sh ---------------------------------------------------------------------------------

@pytest.fixture
def venv(sandbox):
    """A stand-in virtualenv whose bin/ holds the fake python; `activate` only sets PATH."""
    v = sandbox["tmp"] / "venv"
    (v / "bin").mkdir(parents=True)
    shutil.copy(sandbox["bin"] / "python", v / "bin" / "python")
    (v / "bin" / "activate").write_text(f'export VIRTUAL_ENV={v}\nexport PATH="{v}/bin:$PATH"\n')
    (sandbox["bin"] / "python").unlink()  # only the activated venv provides python
    return v


def _slurm_env(sb, venv, ntasks):
    return {**sb["env"], "VENV": str(venv), "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NODELIST": "gpu[007-008]", "SLURM_JOB_NUM_NODES": str(ntasks),
            "SLURM_SUBMIT_DIR": str(REPO), "SLURM_GPUS_PER_NODE": "8",
            "JAX_COORDINATOR_PORT": "12345", "FAKE_NTASKS": str(ntasks)}


def test_gpu_one_node_without_slurm(sandbox, venv):
    sb = sandbox
    subprocess.run(["bash", str(GPU_SH), *NASTY], env={**sb["env"], "VENV": str(venv)},
                   cwd=sb["tmp"], check=True, timeout=30)
    rec = json.loads((sb["out"] / "python-0.json").read_text())
    assert rec["argv"] == ["-m", "radar_jax.main", *NASTY]
    assert rec["cwd"] == str(REPO)
    assert rec["env"]["VIRTUAL_ENV"] == str(venv)
    assert not [k for k in rec["env"] if k.startswith("JAX_")]


def test_gpu_sbatch_two_nodes(sandbox, venv):
    sb = sandbox
    subprocess.run(["bash", str(GPU_SH), *NASTY], env=_slurm_env(sb, venv, 2), cwd=sb["tmp"],
                   check=True, timeout=30)
    srun_args = (sb["tmp"] / "srun.args").read_text().splitlines()
    assert {"--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--gpus-per-node=8"} <= set(
        srun_args)
    for pid in (0, 1):
        rec = json.loads((sb["out"] / f"python-{pid}.json").read_text())
        assert rec["argv"] == ["-m", "radar_jax.main", *NASTY]
        assert rec["cwd"] == str(REPO)
        assert rec["env"]["JAX_COORDINATOR_ADDRESS"] == "gpu007:12345"
        assert rec["env"]["JAX_NUM_PROCESSES"] == "2"
        assert rec["env"]["JAX_PROCESS_ID"] == str(pid)
        # One process per node owns all eight GPUs, not just GPU SLURM_LOCALID.
        assert rec["env"]["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3,4,5,6,7"
    assert "requeue" not in (sb["tmp"] / "scontrol.log").read_text()


def test_gpu_sigterm_is_forwarded_and_job_requeued(sandbox, venv):
    sb = sandbox
    proc = subprocess.Popen(["bash", str(GPU_SH), "--config=configs/xl.py"],
                            env={**_slurm_env(sb, venv, 1), "FAKE_PY_WAIT": "1"}, cwd=sb["tmp"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(sb["out"] / "python-0.json")
        proc.send_signal(signal.SIGTERM)  # what --signal=B:TERM@180 does before the time limit
        out, _ = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 143, out
    assert "requeue 4242" in (sb["tmp"] / "scontrol.log").read_text()


def test_gpu_bad_config_is_not_requeued(sandbox, venv):
    sb = sandbox
    proc = subprocess.run(["bash", str(GPU_SH), "--config=configs/xl.py"],
                          env={**_slurm_env(sb, venv, 1), "FAKE_PY_EXIT": "2"}, cwd=sb["tmp"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "requeue" not in (sb["tmp"] / "scontrol.log").read_text()
