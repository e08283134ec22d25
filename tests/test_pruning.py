"""Pruning with tied embeddings on a checkpoint saved tensor by tensor, as from a GPU/fp16 run."""
import pytest
import torch

from fairseq_kd.pruning import canonical_names, config_ties
from helpers import TEACHER_ARCH, fairseq_train
from test_seq_kd_train import kd_cli

TIED = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
        "decoder.output_projection.weight")


@pytest.fixture(scope="module")
def untied_copies(tiny_teacher, tmp_path_factory):
    """The tiny teacher (--share-all-embeddings) with one separate tensor per key, as fairseq
    writes a checkpoint of a GPU or fp16 run (state moved to CPU tensor by tensor)."""
    state = torch.load(tiny_teacher, map_location="cpu", weights_only=False)
    model = state["model"]
    assert model[TIED[0]].data_ptr() == model[TIED[1]].data_ptr()  # tied as saved from CPU
    state["model"] = {k: v.clone() for k, v in model.items()}
    assert len({state["model"][k].data_ptr() for k in TIED}) == 3
    path = tmp_path_factory.mktemp("fp16_saved") / "checkpoint.pt"
    torch.save(state, path)
    return path


def test_ties_come_from_the_config_not_the_storage(untied_copies):
    state = torch.load(untied_copies, map_location="cpu", weights_only=False)
    ties = config_ties(state["cfg"]["model"])
    assert ties == {TIED[1]: TIED[0], TIED[2]: TIED[1]}
    canonical = canonical_names(state["model"], state["cfg"]["model"])
    assert all(canonical[k] == TIED[0] for k in TIED)
    assert sum(canonical[k] != k for k in canonical) == 2  # nothing else is tied
    # without the config only storage is left, and these copies share none
    assert canonical_names(state["model"])[TIED[1]] == TIED[1]


def test_prune_fp16_saved_checkpoint_with_embeddings_then_retrain(
        untied_copies, tiny_data, tmp_path):
    out = tmp_path / "pruned.pt"
    report = kd_cli("prune", "--path", untied_copies, "--ratio", "0.5", "--out", out,
                    "--include-embeddings")
    masks = torch.load(tmp_path / "pruned.mask.pt", weights_only=True)
    pruned = torch.load(out, map_location="cpu", weights_only=False)["model"]
    original = torch.load(untied_copies, map_location="cpu", weights_only=False)["model"]
    # the embedding matrix is ranked and reported once, under named_parameters()'s name
    assert TIED[0] in masks and not set(TIED[1:]) & set(masks)
    n_selected = sum(m.numel() for m in masks.values())
    expected = sum(w.numel() for k, w in original.items()
                   if k.endswith(".weight") and w.dim() == 2 and k not in TIED[1:])
    assert n_selected == expected
    total_line = report.splitlines()[-2].split()
    assert total_line[:3] == ["total", str(n_selected), str(round(0.5 * n_selected))]
    # one global threshold over the unique tensors
    kept = torch.cat([original[n][m].abs() for n, m in masks.items()])
    dropped = torch.cat([original[n][~m].abs() for n, m in masks.items()])
    assert dropped.max() <= kept.min()
    # the results' non-zero parameter count: the model's parameters (ties once) that are not zero
    from fairseq import checkpoint_utils

    from fairseq_kd.evaluation import count_parameters

    [model], _ = checkpoint_utils.load_model_ensemble([str(out)])
    assert count_parameters(str(out), nonzero=True) == sum(int((p != 0).sum()) for p in model.parameters())
    assert count_parameters(str(out)) == sum(p.numel() for p in model.parameters())
    assert count_parameters(str(out), nonzero=True) <= count_parameters(str(out)) - round(0.5 * n_selected)
    # every copy of the tied matrix carries the same pruning (fairseq loads each key in turn)
    for key in TIED:
        assert torch.equal(pruned[key] == 0, ~masks[TIED[0]]), key
        assert torch.equal(pruned[key], pruned[TIED[0]]), key

    # retraining with the mask: the architecture's parameters match the mask's names
    save = tmp_path / "retrained"
    fairseq_train(tiny_data / "bin", save, *TEACHER_ARCH, "--task", "translation_kd",
                  "--prune-mask", tmp_path / "pruned.mask.pt", "--restore-file", out,
                  "--reset-optimizer", "--reset-dataloader", "--reset-lr-scheduler",
                  "--criterion", "label_smoothed_cross_entropy", "--max-update", "2",
                  "--no-epoch-checkpoints", "--no-save-optimizer-state")
    after = torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=False)["model"]
    for name, mask in masks.items():
        assert torch.all(after[name][~mask] == 0), name
    for key in TIED[1:]:
        assert torch.equal(after[key], after[TIED[0]]), key
    assert not torch.equal(after[TIED[0]], pruned[TIED[0]])  # it did train


def test_a_shipped_student_is_pruned_and_retrained(tiny_teacher, tiny_data, tmp_path):
    """A student as shipped (fairseq-kd export --half --portable: float16, no training state)
    prunes to a checkpoint fairseq-train restores: the retraining starts at epoch 1 from the
    pruned float16 weights (now float32) and keeps the mask."""
    shipped = tmp_path / "student.pt"
    kd_cli("export", "--path", tiny_teacher, "--out", shipped, "--half", "--portable")
    out = tmp_path / "pruned.pt"
    kd_cli("prune", "--path", shipped, "--ratio", "0.5", "--out", out)
    pruned = torch.load(out, map_location="cpu", weights_only=False)
    masks = torch.load(tmp_path / "pruned.mask.pt", weights_only=True)
    save = tmp_path / "retrained"
    proc = fairseq_train(tiny_data / "bin", save, *TEACHER_ARCH, "--task", "translation_kd",
                         "--prune-mask", tmp_path / "pruned.mask.pt", "--restore-file", out,
                         "--reset-optimizer", "--reset-dataloader", "--reset-lr-scheduler", "--reset-meters",
                         "--criterion", "label_smoothed_cross_entropy", "--max-update", "2",
                         "--no-epoch-checkpoints", "--no-save-optimizer-state")
    assert "epoch 001" in proc.stdout + proc.stderr
    after = torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert after["optimizer_history"][-1]["num_updates"] == 2
    for name, mask in masks.items():
        assert torch.all(after["model"][name][~mask] == 0), name
        kept = pruned["model"][name].float()[mask]
        assert after["model"][name].dtype == torch.float32
        assert 0 < (after["model"][name][mask] - kept).abs().max() < 0.1, name  # trained from the pruned weights
