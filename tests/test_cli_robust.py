"""The sam-optax command under faults: the toy in float64, atomic outputs, output paths
checked before training, Ctrl-C (a real SIGINT to a real process), the --out lock, absurd values."""

import errno
import json
import os
import signal
import stat
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_optax import cli, experiments
from sam_optax.experiments import _interrupt, _io, toy

TINY = ["--dataset", "digits", "--model", "mlp", "--no-progress"]
TINY_BENCH = ["--models", "mlp", "--rounds", "1", "--steps-per-round", "1", "--batch-size", "8", "--threads", "all"]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def _cli(*argv):
    return [sys.executable, "-m", "sam_optax.cli", *argv]


# --------------------------------------------------------------------------------------------
# 11. the toy in float64
# --------------------------------------------------------------------------------------------


def _reference(coef, steps=150, lr=5.0, rho=2.0):
    """SGD with momentum 0.9 on g + coef (g_adv - g), g_adv at w + rho g / |g|, in float64 NumPy
    (SAM: coef 1; coupled WSAM: coef gamma / (1 - gamma))."""
    with jax.enable_x64(True):
        grad = jax.jit(jax.grad(toy.toy_loss))
        w, m = np.array(toy.START, np.float64), np.zeros(2)
        for _ in range(steps):
            g = np.asarray(grad(w))
            g_adv = np.asarray(grad(w + rho * g / np.linalg.norm(g)))
            m = g + coef * (g_adv - g) + 0.9 * m
            w = w - lr * m
    return w


def test_toy_runs_in_float64_and_leaves_x64_off():
    runs = {t.label: t.points for t in toy.run()}
    assert all(p.dtype == np.float64 for p in runs.values())
    np.testing.assert_allclose(runs["SAM"][-1], _reference(1.0), atol=1e-5)
    # float32 ended at (19.842, 30.062), 0.29 away; float64 agrees to 3e-6 (gamma itself is rounded to float32)
    np.testing.assert_allclose(runs["WSAM coupled gamma=0.95"][-1], _reference(0.95 / 0.05), atol=1e-4)
    assert jnp.zeros(1).dtype == jnp.float32  # 64-bit mode only inside the toy


# --------------------------------------------------------------------------------------------
# 12. atomic outputs
# --------------------------------------------------------------------------------------------


def _no_space():
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_atomic_write_that_fails_midway_keeps_the_old_file(tmp_path):
    path = tmp_path / "results.json"
    path.write_text('{"old": true}')
    path.chmod(0o640)

    def write_part_then_fail(f):
        f.write('{"new": tr')
        raise _no_space()

    with pytest.raises(OSError, match="No space left"):
        _io.atomic_write(str(path), write_part_then_fail)
    assert json.loads(path.read_text()) == {"old": True}
    assert os.listdir(tmp_path) == ["results.json"]  # no temporary file left behind
    _io.write_json(str(path), {"new": True})
    assert json.loads(path.read_text()) == {"new": True}
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # the old file's mode is kept


def test_compare_whose_json_write_fails_keeps_the_old_results(tmp_path, monkeypatch, capsys):
    old = '{"results": "of an earlier run"}'
    (tmp_path / "results.json").write_text(old)

    def dump_part_then_fail(obj, f, **kwargs):
        f.write(json.dumps(obj)[:100])
        raise _no_space()

    monkeypatch.setattr(json, "dump", dump_part_then_fail)
    rc = cli.main(["compare", *TINY, "--epochs", "1", "--methods", "sgd", "--no-hessian", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "No space left on device" in err and "Traceback" not in err
    assert (tmp_path / "results.json").read_text() == old
    assert os.listdir(tmp_path) == ["results.json"]  # no temporary file, no lock left behind


def test_toy_whose_figure_write_fails_keeps_the_old_figure(tmp_path, monkeypatch, capsys):
    from matplotlib.figure import Figure

    (tmp_path / "wsam_toy.png").write_bytes(b"the old figure")

    def savefig_part_then_fail(self, fname, **kwargs):
        if isinstance(fname, (str, os.PathLike)):
            with open(fname, "wb") as f:
                f.write(b"\x89PNG partial")
        else:
            fname.write(b"\x89PNG partial")
        raise _no_space()

    monkeypatch.setattr(Figure, "savefig", savefig_part_then_fail)
    rc = cli.main(["toy", "--steps", "10", "--out", str(tmp_path)])
    assert rc == 2 and "No space left on device" in capsys.readouterr().err
    assert (tmp_path / "wsam_toy.png").read_bytes() == b"the old figure"
    assert os.listdir(tmp_path) == ["wsam_toy.png"]


# --------------------------------------------------------------------------------------------
# 13. output paths checked before any training
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["results.json", "accuracy.png", "under_a_file"])
def test_compare_checks_its_output_paths_before_training(bad, tmp_path, monkeypatch, capsys):
    out = tmp_path
    if bad == "under_a_file":
        (tmp_path / "file").write_text("x")
        out, expected = tmp_path / "file" / "runs", "cannot create the folder"
    else:
        (tmp_path / bad).mkdir()
        expected = f"{bad}' is a folder"
    monkeypatch.setattr(experiments, "load", lambda *a, **k: pytest.fail("trained before checking --out"))
    with pytest.raises(SystemExit) as e:
        cli.main(["compare", "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "usage: sam-optax compare" in err and "Traceback" not in err
    assert "sam-optax compare: error: argument --out: " in err and expected in err


@pytest.mark.slow
@pytest.mark.parametrize("bad", ["an existing file", "a folder named like the JSON"])
def test_bench_checks_its_output_path_before_running(bad, tmp_path):
    if bad == "an existing file":
        out, expected = tmp_path / "existing", "is a file, not a folder"
        out.write_text("x")
    else:
        out, expected = tmp_path, "step_cost_cpu.json' is a folder"
        (tmp_path / "step_cost_cpu.json").mkdir()
    r = subprocess.run(
        _cli("bench", "--out", str(out), *TINY_BENCH), capture_output=True, text=True, env=ENV, timeout=120
    )
    assert r.returncode == 2, r.stderr
    assert "usage: sam-optax bench" in r.stderr and expected in r.stderr and "Traceback" not in r.stderr
    assert "compiled" not in r.stdout  # nothing ran


# --------------------------------------------------------------------------------------------
# 14. Ctrl-C: a real SIGINT to a real process
# --------------------------------------------------------------------------------------------


def _interrupt_after(cmd, ready, timeout=60, signum=signal.SIGINT):
    """Starts ``cmd``, sends ``signum`` once a stdout line satisfies ``ready``; (returncode, stdout, stderr)."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        seen = []
        for line in p.stdout:
            seen.append(line)
            if ready(line):
                break
        else:
            pytest.fail(f"no progress line before exit: {''.join(seen)}{p.stderr.read()}")
        p.send_signal(signum)
        out, err = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return p.returncode, "".join(seen) + out, err


def _assert_one_clean_line(err):
    assert "Traceback" not in err and "Fatal" not in err and "Segmentation" not in err, err
    lines = [line for line in err.splitlines() if "interrupt" in line.lower()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.slow
def test_ctrl_c_in_compare_saves_the_methods_that_finished(tmp_path):
    methods = ["sgd", "sam", "wsam", "gsam"]
    rc, out, err = _interrupt_after(
        _cli("compare", *TINY, "--epochs", "5", "--methods", *methods, "--out", str(tmp_path)),
        lambda line: line.startswith("sgd: done"),
    )
    assert rc == 130, err
    line = _assert_one_clean_line(err)
    assert "marked incomplete" in line and "results.json" in line
    payload = json.loads((tmp_path / "results.json").read_text())
    assert payload["complete"] is False and payload["methods"] == methods
    done = [r["method"] for r in payload["results"]]
    assert 1 <= len(done) < len(methods) and done == methods[: len(done)]
    assert (tmp_path / "accuracy.png").stat().st_size > 10_000
    assert sorted(os.listdir(tmp_path)) == ["accuracy.png", "results.json"]  # no temporary file, no lock


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_in_bench_stops_cleanly(tmp_path, signum):
    """SIGTERM (``timeout``, ``kill``) to ``sam-optax bench`` is Ctrl-C too: it used to kill the
    launcher only, leaving the benchmark process running and, when killed, its lock file."""
    rc, out, err = _interrupt_after(
        _cli("bench", "--out", str(tmp_path), *TINY_BENCH), lambda line: "compiled base" in line, signum=signum
    )
    assert rc == 130, err
    assert "nothing saved" in _assert_one_clean_line(err)
    assert os.listdir(tmp_path) == []


def test_bench_interrupted_during_the_rounds_keeps_the_rounds_done(monkeypatch):
    from sam_optax import benchmarking

    def step(params, opt_state, batch):
        return params, opt_state, params

    methods = [benchmarking.Method(name, step, lambda p: None) for name in ("a", "b")]
    info = {m.name: {"times": []} for m in methods}
    state = {m.name: (jnp.zeros(()), None) for m in methods}
    monkeypatch.setattr(_interrupt, "_requested", True)
    done = benchmarking._time_rounds(
        "mlp", methods, state, info, None, rounds=5, steps_per_round=2, seed=0, progress=False
    )
    assert done == 1 and [len(i["times"]) for i in info.values()] == [1, 1]


def test_the_sigint_handler_is_restored_after_a_run(tmp_path):
    # the handler the run found (the default one, or SIG_IGN when pytest was started in the background)
    before = signal.getsignal(signal.SIGINT)
    assert cli.main(["toy", "--steps", "5", "--out", str(tmp_path)]) == 0
    assert signal.getsignal(signal.SIGINT) is before


# --------------------------------------------------------------------------------------------
# 15. two runs into the same --out
# --------------------------------------------------------------------------------------------


_HOLDER = """
import sys, time
from sam_optax.experiments import _io
with _io.lock_folder(sys.argv[1], command="sam-optax compare (the first run)"):
    print("locked", flush=True)
    time.sleep(120)
"""


@pytest.mark.slow
def test_a_second_run_into_a_locked_folder_stops_at_once(tmp_path, capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=ENV
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit) as e:
            cli.main(["toy", "--steps", "5", "--out", str(tmp_path)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "usage: sam-optax toy" in err and "Traceback" not in err
        assert f"is in use by another run (pid {holder.pid} on " in err and "the first run" in err
        assert not (tmp_path / "wsam_toy.png").exists()
        holder.kill()  # killed, not cleaned up: the kernel drops its lock, the lock file stays
        holder.wait()
        assert (tmp_path / _io.LOCK_NAME).exists()
        assert cli.main(["toy", "--steps", "5", "--out", str(tmp_path)]) == 0
        assert os.listdir(tmp_path) == ["wsam_toy.png"]  # lock removed at the end of the run
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


# --------------------------------------------------------------------------------------------
# 16. absurd values
# --------------------------------------------------------------------------------------------


def test_a_toy_run_that_diverges_is_an_error_not_a_sharp_minimum(tmp_path, capsys):
    rc = cli.main(["toy", "--lr", "1e30", "--steps", "20", "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert rc == 1
    rows = [line for line in out.splitlines() if line.startswith(("SAM", "WSAM"))]
    assert len(rows) == 5 and all(row.endswith("diverged (not a number)") for row in rows), out
    assert err.strip().startswith("sam-optax toy: error: 5 of 5 runs diverged") and "--lr" in err
    assert not (tmp_path / "wsam_toy.png").exists()


def test_a_single_training_step_reports_no_speed_rather_than_zero(tmp_path, capsys):
    rc = cli.main(
        [
            "compare",
            *TINY,
            "--batch-size",
            "1437",
            "--epochs",
            "1",
            "--methods",
            "sgd",
            "--no-hessian",
            "--out",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert json.loads((tmp_path / "results.json").read_text())["results"][0]["steps_per_second"] is None
    row = next(line for line in out.splitlines() if line.startswith("sgd "))
    assert row.split()[-1] == "-" and "no speed is measured" in out
