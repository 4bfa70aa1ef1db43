"""seq2seq_attention at smoke size: its records agree with its own curves, the speed comparison treats a run that never
reached the target as the slowest (a tie of two such runs is no win), and the exact-answer scores are fractions of
the decoded strings."""

import pytest

pytestmark = pytest.mark.experiment


def test_seq2seq_attention_smoke_records_and_rules(tmp_path):
    from jaxnn.experiments import run_experiment, seq2seq_attention as experiment

    history = [{"step": 25, "val_accuracy": 0.3}, {"step": 30, "loss": 1.0}, {"step": 50, "val_accuracy": 0.7},
               {"step": 75, "val_accuracy": 0.9}]
    assert experiment.steps_to_target(history, 0.7) == 50 and experiment.steps_to_target(history, 0.95) is None
    assert experiment._faster(50, None) and experiment._faster(50, 75)
    assert not experiment._faster(None, None) and not experiment._faster(75, 75) and not experiment._faster(None, 50)

    record = run_experiment("seq2seq_attention", smoke=True, out_dir=tmp_path, progress=False)
    config = record["setting"]
    assert set(record["measured"]) == set(experiment.SETTINGS) and len(record["checks"]) == 3
    decoded = config["decode_examples"]
    for rows in record["measured"].values():
        for row in rows:
            for name in ("greedy_accuracy", "beam_accuracy"):
                assert 0 <= row[name] <= 1 and (row[name] * decoded) == pytest.approx(round(row[name] * decoded))
            reached = row["steps_to_target"]
            assert reached is None or (reached % config["eval_every"] == 0 and reached <= config["steps"])
    assert (tmp_path / "seq2seq_attention.png").stat().st_size > 0
