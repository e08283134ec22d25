"""seq_kd on a distilled corpus, then prune -> retrain with the mask -> export -> stock fairseq."""
import contextlib
import io

import pytest
import torch

import helpers
from fairseq_kd import cli
from fairseq_kd.errors import KDError
from fairseq_kd.pruning import MaskKeeper, magnitude_masks, prunable_weights
from helpers import STUDENT_ARCH, build_training, fairseq_train, first_batch, run, tool
from test_word_kd_loss import brute_force_word_kd

# A plugin architecture (sizes overridden to the tiny student's), so export must rewrite it.
PLUGIN_STUDENT = ["--arch", "transformer_student_tiny", *STUDENT_ARCH[2:]]


def kd_cli(*argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main([str(a) for a in argv]) == 0
    return out.getvalue()


@pytest.fixture(scope="module")
def distilled(tiny_data, tiny_teacher, tmp_path_factory):
    """The tiny teacher's distilled train split (+ gold valid/test), binarized."""
    out = tmp_path_factory.mktemp("distilled")
    kd_cli("corpus", tiny_data / "bin", "--path", tiny_teacher, "--out", out, "-s", "es", "-t", "en",
           "--cpu", "--no-progress-bar", "--beam", "2", "--max-len-b", "20", "--formats", "bin")
    return out


@pytest.fixture(scope="module")
def seq_kd_student(distilled, tmp_path_factory):
    save = tmp_path_factory.mktemp("seq_kd")
    proc = fairseq_train(distilled, save, *PLUGIN_STUDENT, "--task", "translation",
                         "--criterion", "seq_kd", "--label-smoothing", "0.1", "--max-epoch", "2")
    return save, proc.stdout + proc.stderr


def test_seq_kd_trains_on_the_distilled_corpus_without_teacher(seq_kd_student):
    save, log = seq_kd_student
    assert "| train | epoch 002 |" in log, log[-2000:]
    assert "loaded teacher" not in log
    state = torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert state["cfg"]["criterion"]["_name"] == "seq_kd"


def test_word_kd_alpha_matches_brute_force(distilled, tiny_teacher):
    _, task, model, criterion = build_training(
        distilled, "--task", "translation_kd", "--teacher-path", tiny_teacher, *STUDENT_ARCH,
        "--criterion", "seq_kd", "--word-kd-alpha", "0.3", "--kd-temperature", "2", "--label-smoothing", "0.1")
    model.eval().double()
    sample = first_batch(task, "train")
    loss, _, log = criterion(model, sample)
    [teacher] = task.teachers
    with torch.no_grad():  # teacher and student on the distilled targets (teacher prefixes)
        t_logits = teacher(**sample["net_input"])[0]
        s_logits = model(**sample["net_input"])[0]
    exp_loss, exp_nll, exp_kd = brute_force_word_kd(s_logits, t_logits, sample["target"], alpha=0.3, T=2.0, eps=0.1)
    assert loss.item() == pytest.approx(exp_loss, rel=1e-6)
    assert log["nll_loss"].item() == pytest.approx(exp_nll, rel=1e-6)
    assert log["kd_loss"].item() == pytest.approx(exp_kd, rel=1e-6)


def test_word_kd_alpha_needs_a_teacher_and_a_valid_value(distilled, tiny_teacher):
    with pytest.raises(KDError, match="--word-kd-alpha must be in"):
        build_training(distilled, "--task", "translation_kd", "--teacher-path", tiny_teacher, *STUDENT_ARCH,
                       "--criterion", "seq_kd", "--word-kd-alpha", "1.5")
    with pytest.raises(KDError, match="pass --teacher-path"):
        build_training(distilled, "--task", "translation_kd", *STUDENT_ARCH,
                       "--criterion", "seq_kd", "--word-kd-alpha", "0.5")


@pytest.mark.parametrize("per_layer", [False, True])
def test_prune_reaches_the_requested_sparsity(seq_kd_student, tmp_path, per_layer):
    save, _ = seq_kd_student
    out = tmp_path / "pruned.pt"
    report = kd_cli("prune", "--path", save / "checkpoint_last.pt", "--ratio", "0.6", "--out", out,
                    *(["--per-layer"] if per_layer else []))
    state = torch.load(out, map_location="cpu", weights_only=False)
    masks = torch.load(tmp_path / "pruned.mask.pt", weights_only=True)
    original = torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=False)["model"]
    weights = prunable_weights(state["model"])
    assert set(masks) == set(weights) and not any("embed" in n for n in weights)
    total = sum(w.numel() for w in weights.values())
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    assert zeros == round(0.6 * total) if not per_layer else abs(zeros / total - 0.6) < 1e-3
    for name, w in weights.items():
        assert torch.equal(w == 0, ~masks[name])
        kept, pruned = original[name][masks[name]].abs(), original[name][~masks[name]].abs()
        if per_layer:
            assert abs((w == 0).float().mean().item() - 0.6) <= 1 / w.numel()
            assert pruned.max() <= kept.min()  # the smallest of each tensor
    if not per_layer:  # one global threshold
        kept = torch.cat([original[n][m].abs() for n, m in masks.items()])
        pruned = torch.cat([original[n][~m].abs() for n, m in masks.items()])
        assert pruned.max() <= kept.min()
    assert "last_optimizer_state" not in state
    total_line = report.splitlines()[-2].split()
    assert total_line == ["total", str(total), str(zeros), f"{zeros / total:.4f}"]


def test_mask_keeper_keeps_zeros_through_adam_updates():
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 5)
    masks = magnitude_masks({"weight": layer.weight.detach()}, 0.5)
    with torch.no_grad():
        layer.weight.mul_(masks["weight"])
    opt = torch.optim.Adam(layer.parameters(), lr=0.1, weight_decay=0.01)
    # momenta left from before pruning would move the pruned weights on their own
    layer(torch.randn(4, 6)).pow(2).sum().backward()
    opt.step()
    with torch.no_grad():
        layer.weight.mul_(masks["weight"])
    keeper = MaskKeeper(masks)
    keeper.attach(layer)
    for _ in range(3):
        opt.zero_grad()
        layer(torch.randn(4, 6)).pow(2).sum().backward()
        assert torch.all(layer.weight.grad[~masks["weight"]] == 0)  # gradient hook
        opt.step()
        assert not torch.all(layer.weight[~masks["weight"]] == 0)  # Adam's old momenta moved them
        keeper.apply(layer)  # what translation_kd does after every optimizer step
        assert torch.all(layer.weight[~masks["weight"]] == 0)


@pytest.fixture(scope="module")
def retrained(seq_kd_student, distilled, tmp_path_factory):
    save, _ = seq_kd_student
    work = tmp_path_factory.mktemp("retrain")
    kd_cli("prune", "--path", save / "checkpoint_last.pt", "--ratio", "0.5", "--out", work / "pruned.pt")
    proc = fairseq_train(distilled, work / "ck", *PLUGIN_STUDENT, "--task", "translation_kd",
                         "--prune-mask", work / "pruned.mask.pt", "--restore-file", work / "pruned.pt",
                         "--reset-optimizer", "--reset-dataloader", "--reset-lr-scheduler",
                         "--criterion", "seq_kd", "--max-update", "6", "--no-epoch-checkpoints")
    return work, proc.stdout + proc.stderr


def test_pruned_weights_stay_zero_through_retraining(retrained):
    work, log = retrained
    assert "num_updates 6" in log or "num_updates\": 6" in log or "| num_updates 6" in log, log[-2000:]
    masks = torch.load(work / "pruned.mask.pt", weights_only=True)
    before = torch.load(work / "pruned.pt", map_location="cpu", weights_only=False)["model"]
    after = torch.load(work / "ck" / "checkpoint_last.pt", map_location="cpu", weights_only=False)["model"]
    for name, mask in masks.items():
        assert torch.all(after[name][~mask] == 0), name
        assert not torch.equal(after[name][mask], before[name][mask]), name  # it did train


def test_export_loads_in_stock_fairseq_and_translates_identically(retrained, distilled, tiny_data, tmp_path):
    work, _ = retrained
    original = work / "ck" / "checkpoint_last.pt"
    out = kd_cli("export", "--path", original, "--out", tmp_path / "student.pt")
    assert "dropped" in out and "MB" in out
    exported = torch.load(tmp_path / "student.pt", map_location="cpu", weights_only=True)  # no Namespace
    assert set(exported) == {"args", "cfg", "model", "optimizer_history", "extra_state", "fairseq_kd"}
    assert exported["args"] is None  # CTranslate2's converter reads it first
    assert exported["cfg"]["model"]["arch"] == "transformer"
    assert exported["cfg"]["task"]["_name"] == "translation" and "prune_mask" not in exported["cfg"]["task"]
    assert exported["cfg"]["model"]["encoder_embed_dim"] == 32
    gen = ["--gen-subset", "test", "--cpu", "--beam", "3", "--batch-size", "64",
           "--required-batch-size-multiple", "1", "-s", "es", "-t", "en"]
    plugin = run([tool("fairseq-generate"), tiny_data / "bin", "--user-dir", helpers.USER_DIR,
                  "--task", "translation_kd", "--path", original, *gen]).stdout
    env = helpers.env()
    env["PYTHONPATH"] = ""  # stock fairseq: the plugin is not importable at all
    import subprocess
    stock = subprocess.run([tool("fairseq-generate"), str(tiny_data / "bin"), "--task", "translation",
                            "--path", str(tmp_path / "student.pt"), *gen],
                           capture_output=True, text=True, env=env, cwd=tmp_path)
    assert stock.returncode == 0, stock.stderr[-3000:]
    hyps = lambda text: sorted(l for l in text.splitlines() if l.startswith("H-"))  # noqa: E731
    assert len(hyps(stock.stdout)) == 40
    assert hyps(stock.stdout) == hyps(plugin)


def test_half_export_stores_float16_and_stock_fairseq_translates_with_it(retrained, tiny_data, tmp_path):
    """--half: every float weight is the float32 weight rounded to float16, the
    file is about half the size, and stock fairseq (no plugin) translates with it."""
    work, _ = retrained
    original = work / "ck" / "checkpoint_last.pt"
    kd_cli("export", "--path", original, "--out", tmp_path / "full.pt")
    out = kd_cli("export", "--path", original, "--out", tmp_path / "half.pt", "--half")
    assert out.rstrip().endswith("float16 weights")
    full = torch.load(tmp_path / "full.pt", map_location="cpu", weights_only=True)["model"]
    half = torch.load(tmp_path / "half.pt", map_location="cpu", weights_only=True)["model"]
    assert full.keys() == half.keys()
    for name, weight in full.items():
        if weight.is_floating_point():
            assert half[name].dtype == torch.float16 and torch.equal(half[name], weight.to(torch.float16)), name
        else:
            assert torch.equal(half[name], weight), name
    # tied embeddings (--share-all-embeddings) stay one tensor, stored once
    tied = [half[k] for k in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
                              "decoder.output_projection.weight") if k in half]
    assert len(tied) >= 2 and len({t.data_ptr() for t in tied}) == 1
    assert (tmp_path / "half.pt").stat().st_size < 0.6 * (tmp_path / "full.pt").stat().st_size
    env = helpers.env()
    env["PYTHONPATH"] = ""  # stock fairseq
    import subprocess
    stock = subprocess.run([tool("fairseq-generate"), str(tiny_data / "bin"), "--task", "translation",
                            "--path", str(tmp_path / "half.pt"), "--gen-subset", "test", "--cpu", "--beam", "1",
                            "--batch-size", "64", "--required-batch-size-multiple", "1", "-s", "es", "-t", "en"],
                           capture_output=True, text=True, env=env, cwd=tmp_path)
    assert stock.returncode == 0, stock.stderr[-3000:]
    assert sum(line.startswith("H-") for line in stock.stdout.splitlines()) == 40


def test_half_is_refused_with_ctranslate2(capsys, tmp_path):
    from fairseq_kd import cli

    (tmp_path / "x.pt").write_bytes(b"")
    assert cli.main(["export", "--path", str(tmp_path / "x.pt"), "--out", str(tmp_path / "o"), "--half",
                     "--format", "ctranslate2"]) != 0
    assert "--half is for --format fairseq" in capsys.readouterr().err
