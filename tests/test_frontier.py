"""benchmarks/frontier.py: tuning choice, Pareto front, cost prediction, targets, table, docs page block
and the resumable store on synthetic runs; one tiny real run (1 epoch, 500 samples)."""

import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import frontier  # noqa: E402

S = frontier.Settings(methods=("sgd", "sam", "msam", "periodic"), seeds=2, epochs=1, samples=500)


class Bar:
    def __init__(self):
        self.n = 0

    def update(self, k):
        self.n += k

    def set_postfix_str(self, text):
        pass


def result(acc, fraction=None, speed=100.0):
    return {"test_accuracy": acc, "seconds": 6.0, "second_pass_fraction": fraction, "steps_per_second": speed}


def synthetic_store(path):
    """Search, test and cost rows written as the runs would (no training)."""
    store = frontier.claims.Store(path)
    for c, acc in zip(frontier.search_configs(store, S, "sam"), (0.80, 0.86, 0.86, 0.70)):
        store.add(c, result(acc, 1.0))  # tie 0.05 / 0.1: the first of the grid wins
    for c, acc in zip(frontier.search_configs(store, S, "msam"), (0.81, 0.84, 0.83, 0.5)):
        store.add(c, result(acc))
    for c, acc in zip(frontier.search_configs(store, S, "periodic"), (0.82, 0.85, 0.83, 0.83)):
        store.add(c, result(acc, 0.1))
    accs = {"sgd": (0.88, 0.86), "sam": (0.90, 0.90), "msam": (0.89, 0.90), "periodic": (0.88, 0.88)}
    for c in frontier.accuracy_configs(store, S):
        store.add(c, result(accs[c["method"]][c["seed"]], {"sam": 1.0, "periodic": 0.1}.get(c["method"])))
    times = {
        "sgd": [1.0, 1.0, 1.2],
        "sam": [2.0, 2.2, 2.4],
        "msam": [1.05, 1.05, 1.26],
        "periodic": [1.5, 1.5, 1.8],
        "periodic_cond": [1.12, 1.12, 1.344],
    }
    fractions = {"sgd": None, "sam": [1.0] * 3, "msam": None, "periodic": [0.1] * 3, "periodic_cond": [0.1] * 3}
    store.add(
        frontier.cost_config(store, S),
        {"machine": {"backend": "cpu"}, "rows": frontier.summarize_cost(times, fractions)},
    )
    return store


def test_pareto_front_keeps_only_undominated_points():
    pts = {
        "sgd": (1.0, 0.87),
        "sam": (2.0, 0.90),
        "msam": (1.05, 0.895),
        "periodic": (1.5, 0.88),
        "same_cost_worse": (2.0, 0.85),
        "twin": (1.05, 0.895),
    }
    front = frontier.pareto_front(pts)
    assert set(front) == {"sgd", "msam", "twin", "sam"} and front[0] == "sgd" and front[-1] == "sam"
    assert frontier.pareto_front({"a": (1.0, 0.5)}) == ["a"] and frontier.pareto_front({}) == []


def test_cost_summary_pairs_rounds_and_predicts_from_passes():
    rows = frontier.summarize_cost(
        {"sgd": [1.0, 2.0, 4.0], "sam": [2.0, 3.0, 8.0], "p": [1.2, 2.2, 4.4]},
        {"sgd": None, "sam": [1.0, 1.0, 1.0], "p": [0.0, 0.2, 0.1]},
    )
    assert rows["sam"]["ratio_to_base"] == 2.0  # median of 2, 1.5, 2 (paired within each round)
    assert rows["p"]["ratio_to_base"] == pytest.approx(1.1)  # median of 1.2, 1.1, 1.1
    assert rows["p"]["second_pass_fraction"] == pytest.approx(0.1)
    assert rows["p"]["predicted"] == pytest.approx(1 + 0.1 * (2.0 - 1))
    assert rows["p"]["naive"] == pytest.approx(1.1) and rows["sgd"]["predicted"] is None
    assert rows["sgd"]["median_step_ms"] == 2000.0


def test_report_tunes_draws_the_front_and_checks_the_targets(tmp_path):
    store = synthetic_store(tmp_path / "runs.jsonl")
    stale = dict(frontier.accuracy_configs(store, S)[0], epochs=30)  # another setting's run: not read
    store.add(stale, result(0.1))
    page = tmp_path / "frontier.md"
    page.write_text("intro\n")
    with pytest.raises(ValueError, match="markers"):  # no markers: nothing written
        frontier.write_report(store, S, tmp_path, True, page)
    text = frontier.write_report(store, S, tmp_path, False, page)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["tuned"] == {
        "sgd": {},
        "sam": {"rho": 0.05},
        "msam": {"msam_rho": 0.1},
        "periodic": {"periodic_rho": 0.1},
    }
    assert summary["runs"] == summary["runs_expected"] == 4 + 4 + 4 + 8
    rows = {r["method"]: r for r in summary["rows"]}
    assert rows["sgd"]["accuracy"]["mean"] == pytest.approx(0.87) and rows["sgd"]["cost"] == 1.0
    assert rows["sam"]["cost"] == pytest.approx(2.0) and rows["msam"]["cost"] == pytest.approx(1.05)
    assert rows["periodic"]["predicted"] == pytest.approx(1.1) and rows["periodic"]["cost"] == pytest.approx(1.5)
    assert [m for m in rows if rows[m]["pareto"]] == ["sgd", "sam", "msam"]  # periodic: msam is cheaper and better
    assert rows["periodic_cond"]["accuracy"] == rows["periodic"]["accuracy"] and not rows["periodic_cond"]["pareto"]
    a, b = summary["targets"]["a"], summary["targets"]["b"]
    assert a["met"] is True and a["method"] == "msam" and a["value"] == pytest.approx((0.895 - 0.87) / 0.03)
    assert a["candidates"] == ["msam"]
    assert b["periodic"]["met"] is False and b["periodic"]["diff"] == pytest.approx(0.4)
    assert b["periodic_cond"]["met"] is True and set(b) == {"periodic", "periodic_cond"}
    assert "| msam | msam_rho=0.1 | 89.5 ± 0.7 | +2.5 | 1.05 | - | - | - | yes |" in text
    assert "| (b) periodic | 1.50 measured vs 1.10 predicted (naive 1.10; f = 0.10) | within 0.05 | NO |" in text
    assert "jax-ml/jax#12868" in text and (tmp_path / "frontier.png").stat().st_size > 10_000
    assert page.read_text() == "intro\n"
    page.write_text(f"a\n{frontier.START}\nold\n{frontier.END}\nb\n")
    frontier.write_report(store, S, tmp_path, True, page)
    assert page.read_text() == f"a\n{frontier.START}\n{text}\n{frontier.END}\nb\n"


def test_target_a_fails_when_no_cheap_method_keeps_the_gain():
    acc = lambda m: {"mean": m, "std": 0.0, "n": 3}  # noqa: E731
    rows = [
        {"method": "sgd", "accuracy": acc(0.88), "cost": 1.0},
        {"method": "sam", "accuracy": acc(0.90), "cost": 2.0},
        {"method": "msam", "accuracy": acc(0.894), "cost": 1.05},  # 70% of the gain
        {"method": "esam", "accuracy": acc(0.90), "cost": 1.5},
    ]  # all of it, too dear
    a = frontier.check_targets(rows)["a"]
    assert a["met"] is False and a["method"] == "msam" and a["value"] == pytest.approx(0.7)
    rows[1]["accuracy"] = acc(0.87)
    assert frontier.check_targets(rows)["a"]["met"] is None


def test_store_resumes_without_training_again(tmp_path, monkeypatch):
    import sam_optax.experiments as ex

    calls = []

    class Fake:
        def to_dict(self):
            return result(0.5)

    monkeypatch.setattr(ex, "train_method", lambda *a, **k: calls.append(k) or Fake())
    monkeypatch.setattr(frontier, "_dataset", lambda samples, validation: None)
    store = frontier.claims.Store(tmp_path / "runs.jsonl")
    configs = frontier.search_configs(store, S, "msam")
    bar = Bar()
    for c in configs[:2]:
        frontier._run(store, c, bar)
    assert len(calls) == 2 and calls[0]["hyper"].msam_rho == 0.03 and calls[0]["epochs"] == 1
    again = frontier.claims.Store(tmp_path / "runs.jsonl")  # re-read from the file
    for c in configs:
        frontier._run(again, c, bar)
    assert len(calls) == 4 and bar.n == 6  # only the two missing runs trained
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == 4
    monkeypatch.setattr(frontier.subprocess, "call", lambda *a, **k: pytest.fail("the cost is saved"))
    saved = synthetic_store(tmp_path / "other.jsonl")
    frontier._measure_cost(saved, frontier.cost_config(saved, S))


@pytest.mark.slow
def test_tiny_real_run_then_report_only_and_cost_rows(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(frontier, "GRIDS", {"msam": ("msam_rho", (0.3,))})
    argv = ["--epochs", "1", "--samples", "500", "--seeds", "1", "--methods", "sgd", "msam", "--out", str(tmp_path)]
    assert frontier.main(argv + ["--skip-cost"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert [(r["config"]["experiment"], r["config"]["method"]) for r in rows] == [
        ("search", "msam"),
        ("test", "sgd"),
        ("test", "msam"),
    ]
    assert all(0.0 <= r["result"]["test_accuracy"] <= 1.0 for r in rows)
    assert "| msam | msam_rho=0.3 |" in capsys.readouterr().out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["cost_source"] for r in summary["rows"]] == ["training steps/s"] * 2
    import sam_optax.experiments as ex

    monkeypatch.setattr(ex, "train_method", lambda *a, **k: pytest.fail("--report must not train"))
    assert frontier.main(argv + ["--report"]) == 0
    s = frontier.Settings(("sgd", "sam", "msam"), 1, 1, 500, cost_rounds=2, cost_steps=2)
    config = frontier.cost_config(frontier.claims.Store(tmp_path / "runs.jsonl"), s)
    cost = frontier.cost_worker(config, progress=False, pin=False)["rows"]
    assert cost["sgd"]["ratio_to_base"] == 1.0 and cost["sam"]["second_pass_fraction"] == 1.0
    assert cost["msam"]["second_pass_fraction"] is None and len(cost["sam"]["times_ms"]) == 2
