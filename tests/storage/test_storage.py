"""``lens_jax.storage``: the emulator variable mapping, whole-object writes, folders uploaded in
order, the record cache and the mirror of growing files, locally and on ``gs://`` (the emulator)."""

import os

import pytest

from lens_jax import storage
from lens_jax.output_guard import atomic_output_dir


def test_emulator_variable_is_mapped_for_every_library():
    env = {"STORAGE_EMULATOR_HOST": "127.0.0.1:9023"}
    assert storage.configure_emulator(env) == "http://127.0.0.1:9023"
    assert env["TENSORSTORE_GCS_HTTP_URL"] == "http://127.0.0.1:9023"
    assert env["GOOGLE_AUTH_TOKEN_FOR_TESTING"] and env["NO_GCE_CHECK"] == "true"
    assert env["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] == "false" and env["FSSPEC_GCS_TOKEN"] == "anon"
    unset = {}
    assert storage.configure_emulator(unset) is None and unset == {}


def test_upload_order_puts_json_last_and_deepest_folders_first(tmp_path):
    for name in ("model_index.json", "transformer/config.json", "transformer/w.safetensors",
                 "vae/config.json", "vae/w.safetensors", "scheduler/a/b.json"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    order = [f.relative_to(tmp_path).as_posix() for f in storage._upload_order(tmp_path)]
    assert order[0] == "scheduler/a/b.json" and order[-1] == "model_index.json"
    assert order.index("transformer/w.safetensors") < order.index("transformer/config.json")
    assert order.index("vae/w.safetensors") < order.index("vae/config.json")


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_files_folders_and_mirror(where, tmp_path, request):
    root = str(tmp_path / "root") if where == "local" else request.getfixturevalue("gcs_bucket") + "/root"
    storage.write_text(f"{root}/a/b.json", "{}")
    storage.write_bytes(f"{root}/c.bin", b"\x00\x01")
    assert storage.listdir(root) == ["a", "c.bin"] and storage.listdir(f"{root}/missing") == []
    assert storage.read_text(f"{root}/a/b.json") == "{}"
    assert [name for name, _ in storage.files_under(root)] == ["a/b.json", "c.bin"]
    if where == "local":
        assert not [n for n in os.listdir(tmp_path / "root") if ".tmp-" in n]

    with atomic_output_dir(f"{root}/out") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "x.txt").write_text("x")
    with pytest.raises(FileExistsError, match="--overwrite"):
        with atomic_output_dir(f"{root}/out"):
            pass
    with pytest.raises(RuntimeError):
        with atomic_output_dir(f"{root}/out", overwrite=True) as tmp:
            (tmp / "y.txt").write_text("y")
            raise RuntimeError("a failed conversion")
    assert storage.read_text(f"{root}/out/sub/x.txt") == "x"  # untouched by the failed write
    with storage.local_dir(f"{root}/out") as local:
        assert (local / "sub" / "x.txt").read_text() == "x"
    storage.move(f"{root}/out", f"{root}/moved")
    assert not storage.exists(f"{root}/out") and storage.exists(f"{root}/moved/sub/x.txt")

    mirror = storage.Mirror(f"{root}/run", min_interval_s=3600)
    with open(mirror.pull("metrics.jsonl"), "a") as f:
        f.write("1\n")
    mirror.sync(force=True)
    with open(mirror.local / "metrics.jsonl", "a") as f:
        f.write("2\n")
    mirror.sync()  # within the interval: not uploaded (remote); in place (local)
    assert storage.read_text(f"{root}/run/metrics.jsonl") == ("1\n" if where == "gcs" else "1\n2\n")
    mirror.close()
    assert storage.read_text(f"{root}/run/metrics.jsonl") == "1\n2\n"
    again = storage.Mirror(f"{root}/run")
    assert again.pull("metrics.jsonl").read_text() == "1\n2\n"  # continued, not restarted
    again.close()
    storage.rmtree(root)
    assert not storage.exists(root)


def test_remote_file_is_cached_locally_once(gcs_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("LENS_CACHE_DIR", str(tmp_path / "cache"))
    storage.write_bytes(f"{gcs_bucket}/r/shard.array_record-00000-of-00001", b"abc")
    local = storage.local_file(f"{gcs_bucket}/r/shard.array_record-00000-of-00001")
    assert local.startswith(str(tmp_path / "cache")) and open(local, "rb").read() == b"abc"
    mtime = os.stat(local).st_mtime_ns
    assert storage.local_file(f"{gcs_bucket}/r/shard.array_record-00000-of-00001") == local
    assert os.stat(local).st_mtime_ns == mtime  # reused, not downloaded again
    assert storage.local_file(str(tmp_path / "x")) == str(tmp_path / "x")


def test_versioned_object_is_a_compare_and_swap(gcs_bucket):
    """The workdir lock's store on gs://: writes and deletes only at the generation read."""
    p = f"{gcs_bucket}/lens_jax.lock"
    first = storage.write_if_generation(p, "a", 0)
    assert first and storage.write_if_generation(p, "b", 0) is None  # exists already
    assert storage.read_versioned(p) == ("a", first)
    second = storage.write_if_generation(p, "c", first)
    assert second and second != first
    assert storage.write_if_generation(p, "d", first) is None  # stale version
    assert not storage.delete_if_generation(p, first)
    assert storage.delete_if_generation(p, second)
    assert storage.read_versioned(p) == (None, None)


def test_workdir_lock_on_gcs(gcs_bucket):
    from lens_jax.train import workdir_lock

    run = f"{gcs_bucket}/run"
    lock = workdir_lock.acquire(run, "lens-train", heartbeat_s=0)
    assert storage.exists(f"{run}/{workdir_lock.LOCK_NAME}")
    with pytest.raises(workdir_lock.WorkdirLocked, match="in use by"):
        workdir_lock.acquire(run, "lens-train export", heartbeat_s=0)
    lock.release()
    assert not storage.exists(f"{run}/{workdir_lock.LOCK_NAME}")
    workdir_lock.acquire(run, "lens-train", heartbeat_s=0).release()  # free again
