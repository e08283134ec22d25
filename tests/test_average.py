"""fairseq-kd average: the mean of a real run's interval checkpoints, tensor by tensor; which
files --dir --last picks; one-line errors for checkpoints that do not belong together."""
import pytest
import torch

import helpers
from helpers import STUDENT_ARCH, run, tool


@pytest.fixture(scope="module")
def interval_run(tiny_data, tmp_path_factory):
    """A tiny student trained 8 updates with a checkpoint every 2, the last 3 kept."""
    save = tmp_path_factory.mktemp("interval_run")
    helpers.fairseq_train(tiny_data / "bin", save, *STUDENT_ARCH, "--task", "translation",
                          "--criterion", "label_smoothed_cross_entropy", "--max-update", "8",
                          "--save-interval-updates", "2", "--keep-interval-updates", "3",
                          "--no-epoch-checkpoints")
    return save


def test_average_of_a_runs_last_checkpoints_is_their_mean_and_fairseq_translates_with_it(
        interval_run, tiny_data, tmp_path):
    out = tmp_path / "avg.pt"
    proc = run([tool("fairseq-kd"), "average", "--dir", interval_run, "--last", "3", "--out", out])
    inputs = sorted(interval_run.glob("checkpoint_*_*.pt"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    assert [int(p.stem.rsplit("_", 1)[1]) for p in inputs] == [4, 6, 8]  # --keep-interval-updates 3
    assert "updates 4, 6, 8" in proc.stdout
    states = [torch.load(p, weights_only=False) for p in inputs]
    averaged = torch.load(out, weights_only=False)
    assert averaged["model"].keys() == states[0]["model"].keys()
    moved = 0
    for key, value in averaged["model"].items():
        stacked = torch.stack([s["model"][key] for s in states])
        if value.is_floating_point():
            assert value.dtype == stacked.dtype
            assert torch.allclose(value, stacked.mean(0), rtol=1e-6, atol=1e-7), key
            moved += not torch.equal(stacked[0], stacked[-1])
        else:
            assert torch.equal(value, stacked[-1]), key
    assert moved > 10  # the checkpoints really differ: an average, not a copy
    assert "last_optimizer_state" not in averaged
    assert averaged["extra_state"]["averaged_from"] == [p.name for p in inputs]
    helpers.assert_generate_loads_student(tiny_data, out)


def test_last_picks_the_newest_by_update_count_then_by_epoch(tmp_path):
    from fairseq_kd.averaging import last_checkpoints

    for name in ("checkpoint_1_90.pt", "checkpoint_1_250.pt", "checkpoint_2_1000.pt", "checkpoint_best.pt",
                 "checkpoint_last.pt", "checkpoint3.pt"):
        (tmp_path / name).touch()
    # numerically: as text "1000" < "250" < "90"
    assert [p.rsplit("/", 1)[1] for p in last_checkpoints(str(tmp_path), 2)] == [
        "checkpoint_1_250.pt", "checkpoint_2_1000.pt"]
    epochs = tmp_path / "epochs"
    epochs.mkdir()
    for name in ("checkpoint9.pt", "checkpoint10.pt", "checkpoint_best.pt"):
        (epochs / name).touch()
    assert [p.rsplit("/", 1)[1] for p in last_checkpoints(str(epochs), 2)] == ["checkpoint9.pt", "checkpoint10.pt"]


def one_line_error(proc):
    """The single ``fairseq-kd average: error:`` line of a failed run, without a traceback."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("fairseq-kd average: error: "), lines[0]
    return lines[0]


def test_bad_input_is_a_one_line_error(interval_run, tmp_path):
    too_many = run([tool("fairseq-kd"), "average", "--dir", interval_run, "--last", "4",
                    "--out", tmp_path / "a.pt"], check=False)
    assert "has 3 interval" in one_line_error(too_many)
    last = interval_run / "checkpoint_last.pt"
    onto_input = run([tool("fairseq-kd"), "average", "--inputs", last, interval_run / "checkpoint_best.pt",
                      "--out", last], check=False)
    assert "--out must not be one of the inputs" in one_line_error(onto_input)
    # a checkpoint of another model: same names, one shape changed
    other = torch.load(last, weights_only=False)
    key = next(k for k, v in other["model"].items() if v.dim() == 2)
    other["model"][key] = torch.zeros(3, 3)
    torch.save(other, tmp_path / "other.pt")
    mismatch = run([tool("fairseq-kd"), "average", "--inputs", last, tmp_path / "other.pt",
                    "--out", tmp_path / "b.pt"], check=False)
    assert f"{key}: shape (3, 3) in" in one_line_error(mismatch)
