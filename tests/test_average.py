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


def interval_checkpoints(save):
    """The run's checkpoint_EPOCH_UPDATES.pt files, oldest first."""
    return sorted(save.glob("checkpoint_*_*.pt"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))


def test_average_of_a_runs_last_checkpoints_is_their_mean_and_fairseq_translates_with_it(
        interval_run, tiny_data, tmp_path):
    out = tmp_path / "avg.pt"
    proc = run([tool("fairseq-kd"), "average", "--dir", interval_run, "--last", "3", "--out", out])
    inputs = interval_checkpoints(interval_run)
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


# the one embedding matrix of a --share-all-embeddings transformer, under each of its keys
TIED = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "decoder.output_projection.weight")


def fp16_saved(checkpoint, out):
    """``checkpoint`` as fairseq's trainer saves an fp16 run: the model in half precision,
    its state dict moved to the CPU by fairseq's own ``utils.move_to_cpu``, which copies
    every tensor to float32 on its own (so tied keys no longer share storage)."""
    from fairseq import checkpoint_utils, utils

    state = torch.load(checkpoint, weights_only=False)
    [model], _ = checkpoint_utils.load_model_ensemble([str(checkpoint)])
    state["model"] = utils.move_to_cpu(model.half().state_dict())
    torch.save(state, out)
    return out


def storages(path):
    """The distinct storages holding the tied keys of the checkpoint at ``path``."""
    model = torch.load(path, weights_only=False)["model"]
    return {model[key].untyped_storage().data_ptr() for key in TIED}


def test_parameter_count_of_plain_fp16_saved_and_averaged_checkpoints_is_the_models(interval_run, tmp_path):
    from fairseq import checkpoint_utils

    from fairseq_kd.evaluation import count_parameters

    plain = interval_checkpoints(interval_run)[-1]
    [model], _ = checkpoint_utils.load_model_ensemble([str(plain)])
    expected = sum(p.numel() for p in model.parameters())  # a shared parameter appears once
    fp16 = fp16_saved(plain, tmp_path / "fp16.pt")
    assert len(storages(plain)) == 1 and len(storages(fp16)) == 3  # the tie survives only in the plain file
    averaged = tmp_path / "avg.pt"
    run([tool("fairseq-kd"), "average", "--dir", interval_run, "--last", "3", "--out", averaged])
    counts = {path.name: count_parameters(str(path)) for path in (plain, fp16, averaged)}
    assert counts == {path.name: expected for path in (plain, fp16, averaged)}


def test_average_keeps_tied_tensors_one_tensor(interval_run, tmp_path):
    """Inputs sharing storage (a CPU run) and inputs holding a copy per key (fp16-saved):
    either way the average of the shared matrix is stored once, under all three keys."""
    inputs = interval_checkpoints(interval_run)
    fp16_inputs = [fp16_saved(p, tmp_path / p.name) for p in inputs]
    for name, paths in (("plain", inputs), ("fp16", fp16_inputs)):
        out = tmp_path / f"avg_{name}.pt"
        run([tool("fairseq-kd"), "average", "--inputs", *paths, "--out", out])
        assert len(storages(out)) == 1, name
        mean = torch.stack([torch.load(p, weights_only=False)["model"][TIED[0]] for p in paths]).mean(0)
        assert torch.allclose(torch.load(out, weights_only=False)["model"][TIED[2]], mean, rtol=1e-6, atol=1e-7)


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
