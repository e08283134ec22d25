"""onpolicy_kd end to end: fairseq-train logs its metrics, and a resumed run continues
exactly as the unbroken run (same sampled outputs, hence the same losses)."""
import re
import shutil

import pytest

from helpers import STUDENT_ARCH, fairseq_train

UPDATE_LINE = re.compile(r"\| train_inner \| epoch \d+:\s+\d+ / \d+ (.*)$", re.M)
# what a rerun cannot reproduce: clocks
TIMING = ("gen_seconds", "wps", "ups", "train_wall", "wall")


def updates(log):
    """{num_updates: {metric: value}} of fairseq's per-update lines (--log-interval 1)."""
    out = {}
    for m in UPDATE_LINE.finditer(log):
        fields = dict(kv.split("=", 1) for kv in m.group(1).split(", "))
        out[int(fields["num_updates"])] = fields
    return out


def train(tiny_data, teacher, save, *extra):
    return fairseq_train(
        tiny_data / "bin", save, *STUDENT_ARCH, "--task", "translation_kd", "--teacher-path", teacher,
        "--criterion", "onpolicy_kd", "--onpolicy-ratio", "0.5", "--jsd-beta", "0.5",
        "--update-freq", "2", "--max-tokens", "1000", "--max-update", "6",
        "--save-interval-updates", "3", *extra)


@pytest.fixture(scope="module")
def unbroken(tiny_data, tiny_teacher, tmp_path_factory):
    save = tmp_path_factory.mktemp("onpolicy_kd")
    proc = train(tiny_data, tiny_teacher, save)
    return save, proc.stdout + proc.stderr


def test_training_logs_the_onpolicy_metrics(unbroken):
    _, log = unbroken
    lines = updates(log)
    assert sorted(lines) == [1, 2, 3, 4, 5, 6], log[-3000:]
    for fields in lines.values():
        for key in ("loss", "nll_loss", "jsd_loss", "onpolicy_share", "gen_len", "gen_seconds"):
            assert fields[key] != "None", (key, fields)
        # two micro-batches per update (--update-freq 2), each on- or off-policy
        assert fields["onpolicy_share"] in ("0", "0.5", "1")
        on = float(fields["onpolicy_share"]) > 0
        assert (float(fields["gen_len"]) > 1) == on and (float(fields["gen_seconds"]) > 0) == on
    assert {f["onpolicy_share"] for f in lines.values()} != {"0"}
    assert re.search(r"\| valid \| .*\| jsd_loss [\d.]+", log)  # validation logs the divergence
    assert not re.search(r"\| valid \| .*gen_len", log)  # and generates nothing


def test_resumed_run_continues_as_the_unbroken_run(unbroken, tiny_data, tiny_teacher, tmp_path):
    save, log = unbroken
    shutil.copy(save / "checkpoint_1_3.pt", tmp_path / "checkpoint_last.pt")
    proc = train(tiny_data, tiny_teacher, tmp_path)
    resumed_log = proc.stdout + proc.stderr
    assert re.search(r"Loaded checkpoint \S*checkpoint_last.pt \(epoch 1 @ 3 updates\)", resumed_log)
    resumed, original = updates(resumed_log), updates(log)
    assert sorted(resumed) == [4, 5, 6]
    for k in resumed:
        strip = [{n: v for n, v in f.items() if n not in TIMING} for f in (resumed[k], original[k])]
        assert strip[0] == strip[1], (k, strip)
