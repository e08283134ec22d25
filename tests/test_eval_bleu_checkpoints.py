"""Runs validated by BLEU (``--eval-bleu --best-checkpoint-metric bleu``, as the
converged recipe profile trains): their checkpoints resume and export under
torch >= 2.6's weights-only loading (fairseq stores the BLEU meters' numpy
arrays and scalars in them), and a validation whose hypotheses are all empty
scores BLEU 0 instead of stopping training."""
import re

import numpy as np
import torch

from helpers import STUDENT_ARCH, TEACHER_ARCH, fairseq_train, run, tool

EVAL_BLEU = ["--eval-bleu", "--eval-bleu-remove-bpe", "sentencepiece", "--eval-bleu-args", '{"beam":1}',
             "--best-checkpoint-metric", "bleu", "--maximize-best-checkpoint-metric", "--no-epoch-checkpoints",
             "--task", "translation_kd", "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1"]


def holds_numpy(obj):
    """Whether a (nested) checkpoint entry holds a numpy array or scalar."""
    if isinstance(obj, (np.ndarray, np.generic)):
        return True
    if isinstance(obj, dict):
        return any(holds_numpy(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(holds_numpy(v) for v in obj)
    return False


def valid_bleu(log):
    return [float(b) for b in re.findall(r"valid on 'valid' subset \|.*?\| bleu ([\d.]+)", log)]


def test_a_bleu_validated_run_resumes_and_exports(tiny_data, tiny_teacher, tmp_path):
    save = tmp_path / "model"
    # from the trained tiny teacher's weights, so that validation BLEU is above 0 from the start
    first = fairseq_train(tiny_data / "bin", save, *TEACHER_ARCH, *EVAL_BLEU, "--max-epoch", "1",
                          "--restore-file", tiny_teacher, "--reset-optimizer", "--reset-dataloader",
                          "--reset-meters", "--reset-lr-scheduler")
    assert valid_bleu(first.stdout)[-1] > 0
    # what weights-only loading refused without the plugin's allow-list
    state = torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert holds_numpy(state["extra_state"])
    # fairseq's own loader (torch.load, weights-only by default) resumes the run
    resumed = fairseq_train(tiny_data / "bin", save, *TEACHER_ARCH, *EVAL_BLEU, "--max-epoch", "2")
    assert "Loaded checkpoint" in resumed.stdout and len(valid_bleu(resumed.stdout)) == 1
    run([tool("fairseq-kd"), "export", "--path", save / "checkpoint_best.pt", "--out", tmp_path / "model.pt"])
    assert torch.load(tmp_path / "model.pt", weights_only=True)["model"]


def test_validation_with_only_empty_hypotheses_scores_bleu_zero(tiny_data, tmp_path):
    # the tiny student after one epoch writes EOS only (it has learnt that much): fairseq logs no BLEU
    proc = fairseq_train(tiny_data / "bin", tmp_path / "s", *STUDENT_ARCH, *EVAL_BLEU, "--max-epoch", "1")
    assert valid_bleu(proc.stdout) == [0.0]
    assert (tmp_path / "s" / "checkpoint_best.pt").is_file()
