"""--ray: the measured budget's curves and sweep's settings as Ray tasks on a local two-node cluster give the
same curves (bit for bit) and the same ranks as a local run; a failed task is retried; a missing ray is one line."""
import builtins
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnx_tucker import UsageError, compress
from onnx_tucker.cli import main
from onnx_tucker.errors import OnnxTuckerError

from conftest import residual_model

ROOT = Path(__file__).resolve().parents[1]
try:
    import ray
except ImportError:  # the tests that need a cluster skip; the missing-ray error is still tested
    ray = None
needs_ray = pytest.mark.skipif(ray is None, reason="ray is not installed (pip install 'onnx-tucker[ray]')")


def feeds(n=64, seed=0):
    return {"x": np.random.default_rng(seed).standard_normal((n, 3, 10, 10)).astype(np.float32)}


def test_a_missing_ray_is_one_line(monkeypatch, tmp_path, capsys):
    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    monkeypatch.delitem(sys.modules, "ray", raising=False)
    with pytest.raises(UsageError, match=r"^--ray needs ray: pip install 'onnx-tucker\[ray\]'$"):
        compress(residual_model(), target_macs=0.6, calibration=feeds(), ray="auto")
    src = tmp_path / "in.onnx"
    onnx.save(residual_model(), str(src))
    np.savez(tmp_path / "cal.npz", x=feeds()["x"])
    assert main([str(src), str(tmp_path / "out.onnx"), "--target-macs", "0.6", "--calibrate", str(tmp_path / "cal.npz"),
                 "--ray", "auto"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--ray needs ray: pip install 'onnx-tucker[ray]'" in err, err


@pytest.mark.parametrize("args, needle", [
    (["--ray", "auto"], "--ray only applies with --target-macs and --calibrate"),
    (["--target-macs", "0.5", "--ray", "auto"], "--ray only applies with --target-macs and --calibrate"),
    (["--target-macs", "0.5", "--calibrate", "CAL", "--ray", "head"], "expected 'auto' or a cluster address"),
])
def test_ray_flag_without_effect_or_with_a_bad_address_is_a_usage_error(tmp_path, capsys, args, needle):
    src = tmp_path / "in.onnx"
    onnx.save(residual_model(), str(src))
    np.savez(tmp_path / "cal.npz", x=feeds()["x"])
    args = [str(tmp_path / "cal.npz") if a == "CAL" else a for a in args]
    assert main([str(src), str(tmp_path / "out.onnx"), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err


@needs_ray
def test_an_unreachable_cluster_is_one_line_at_once():
    assert not ray.is_initialized()
    with pytest.raises(OnnxTuckerError, match=r"^--ray: cannot connect to the Ray cluster at 127.0.0.1:1: .*ray start --head"):
        compress(residual_model(), target_macs=0.6, calibration=feeds(), ray="127.0.0.1:1")


@needs_ray
def test_auto_with_a_ray_address_that_nothing_listens_at_is_one_line_at_once(monkeypatch):
    """`--ray auto` joins RAY_ADDRESS's cluster: with nothing there Ray waited minutes, printing its own warnings."""
    assert not ray.is_initialized()
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    with pytest.raises(OnnxTuckerError, match=r"^--ray: cannot connect to the Ray cluster at 127.0.0.1:1: .*from RAY_ADDRESS"):
        compress(residual_model(), target_macs=0.6, calibration=feeds(), ray="auto")


@needs_ray
def test_rays_own_task_error_lines_stay_off_the_commands_output(capsys):
    """A task failing inside Ray printed ~20 lines of '(raylet) Task _task failed. There are 3 retries remaining ...'
    tracebacks on stdout, beside the command's one error line. While a connection the command made is open, Ray's
    driver printer drops them; it is restored after."""
    from ray._private import worker

    from onnx_tucker.fanout import _quiet_task_errors

    original = worker.print_to_stdstream
    undo = _quiet_task_errors()
    worker.print_to_stdstream({"lines": ["Task _task failed. There are 3 retries remaining"], "pid": "raylet", "is_err": False},
                              ignore_prefix=False)
    undo()
    assert capsys.readouterr().out == "" and worker.print_to_stdstream is original


@pytest.fixture(scope="module")
def two_nodes():
    """A Ray cluster of two nodes with one CPU each, on this machine (as two machines would be)."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False,
             runtime_env={"py_modules": [str(ROOT / "onnx_tucker")]})
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@needs_ray
def test_curves_and_ranks_on_two_nodes_are_the_local_ones(two_nodes, tmp_path):
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    model, cal = residual_model(), feeds()
    local_model, local = compress(model, target_macs=0.6, calibration=cal)
    path = tmp_path / "curves.json"
    remote_model, remote = compress(model, target_macs=0.6, calibration=cal, ray="auto", curves=str(path))
    assert remote.sensitivity["ray"] == "auto" and "ray" not in local.sensitivity
    assert any(n.startswith("--ray auto: the measured budget's") and "ran as Ray tasks" in n for n in remote.notes)
    assert remote.sensitivity["curves"] == local.sensitivity["curves"]  # bit for bit, not only close
    assert [(r.layer, r.ranks) for r in remote.layers] == [(r.layer, r.ranks) for r in local.layers]
    assert [i.SerializeToString() for i in remote_model.graph.initializer] == [i.SerializeToString() for i in local_model.graph.initializer]
    # the curves file the driver wrote as each task finished: a local run reuses all of it
    _, again = compress(model, target_macs=0.6, calibration=cal, curves=str(path))
    assert again.sensitivity["cached_layers"] == len(local.sensitivity["curves"])


@pytest.mark.slow
@needs_ray
def test_a_real_cnn_gets_the_same_allocation_on_two_nodes(two_nodes):
    """The seed CIFAR-10 CNN on 128 test-sample images, its last three convs measured (the others left whole)."""
    from onnx_tucker.data import load_labelled
    from onnx_tucker.pipeline import factorable_sites

    model = onnx.load(str(ROOT / "models" / "cifar10_cnn.onnx"))
    cal, _ = load_labelled(ROOT / "models" / "cifar10_test_sample.npz", model, limit=128)
    names = [s.name for s in factorable_sites(model)[1] if s.eligible]
    options = dict(target_macs=0.85, calibration=cal, exclude=tuple(names[:-3]), refit=False)
    _, local = compress(model, **options)
    _, remote = compress(model, **options, ray="auto")
    assert remote.sensitivity["curves"] == local.sensitivity["curves"]
    assert [r.ranks for r in remote.layers] == [r.ranks for r in local.layers]
    assert sum(r.decomposed for r in remote.layers) >= 1


@needs_ray
def test_a_failed_task_is_retried_and_never_lost(two_nodes, tmp_path):
    from onnx_tucker.fanout import cluster, map_tasks

    # defined here, so that Ray ships them by value (the workers cannot import this test module)
    def flaky(item, marker_dir):
        """Fails the first time it runs for ``item`` (a marker file remembers), then returns its square."""
        marker = Path(marker_dir) / f"tried_{item}"
        if not marker.exists():
            marker.write_text("once")
            raise RuntimeError(f"transient failure on {item}")
        return item * item

    def always_fails(item):
        raise RuntimeError(f"broken input {item}")

    def refuses(item):
        raise UsageError(f"bad setting {item}")

    seen = []
    with cluster("auto") as cpus:
        assert cpus == 2
        out = map_tasks(flaky, [1, 2, 3, 4], shared={"marker_dir": str(tmp_path)}, progress=False,
                        on_result=lambda i, r: seen.append(i))
    assert out == [1, 4, 9, 16]  # in input order, every one of them
    assert sorted(seen) == [0, 1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tried_1", "tried_2", "tried_3", "tried_4"]
    with pytest.raises(OnnxTuckerError, match=r"^--ray: item two failed \(retried up to 3 times\): RuntimeError: broken input 2$"):
        map_tasks(always_fails, [2], labels=["item two"], progress=False)
    with pytest.raises(UsageError, match="^bad setting 5$"):  # the input's own error: as locally, not retried
        map_tasks(refuses, [5], progress=False)


@needs_ray
def test_sweep_settings_fan_out_with_the_same_rows(two_nodes, tmp_path):
    from onnx_tucker.sweep import SweepConfig, run_sweep

    model = tmp_path / "m.onnx"
    onnx.save(residual_model(), str(model))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 3, 10, 10)).astype(np.float32)
    np.savez(tmp_path / "test.npz", x=x, y=rng.integers(0, 4, 64))
    np.savez(tmp_path / "train.npz", x=feeds(128, seed=1)["x"])
    rows = {}
    for ray_address in (None, "auto"):
        config = SweepConfig(model=model, data=tmp_path / "test.npz", targets=[0.6, 0.8], calibrate=tmp_path / "train.npz",
                             out_dir=tmp_path / f"out_{ray_address}", batches=(1,), runs=1, warmup=0, progress=False, ray=ray_address)
        result = run_sweep(config)
        rows[ray_address] = [{k: r[k] for k in ("setting", "error", "ranks", "conv_macs", "top1", "agreement")} for r in result["results"]]
        files = sorted(p.name for p in config.out_dir.glob("*.onnx"))
        assert len(files) == 2
    assert rows["auto"] == rows[None]
    for a, b in zip(sorted((tmp_path / "out_None").glob("*.onnx")), sorted((tmp_path / "out_auto").glob("*.onnx"))):
        assert a.read_bytes() == b.read_bytes()


def test_connecting_keeps_the_commands_signal_handlers(monkeypatch):
    """ray.init installs its own SIGTERM handler: `compress --ray auto` then died on SIGTERM with Ray's crash dump and
    exit 15 instead of unwinding (staged outputs removed, one line, exit 143). The handlers before the connection are
    put back as soon as it is made (a stand-in for Ray that does what ray.init does to them)."""
    import signal
    from types import SimpleNamespace

    import onnx_tucker.fanout as fanout

    def init(**kwargs):
        signal.signal(signal.SIGTERM, lambda *a: None)
        signal.signal(signal.SIGINT, lambda *a: None)

    fake = SimpleNamespace(is_initialized=lambda: False, init=init, cluster_resources=lambda: {"CPU": 3}, shutdown=lambda: None)
    monkeypatch.setattr(fanout, "require_ray", lambda: fake)
    mine = lambda *a: None  # noqa: E731
    before = signal.signal(signal.SIGTERM, mine)
    try:
        with fanout.cluster("auto") as cpus:
            assert cpus == 3
            assert signal.getsignal(signal.SIGTERM) is mine and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, before)
