"""fairseq-kd evaluate / table / plot on the tiny teacher."""
import json

from sacrebleu.metrics import BLEU, CHRF

from helpers import USER_DIR, run, tool


def test_evaluate_table_plot(tiny_data, tiny_teacher, tmp_path):
    results = tmp_path / "results.json"
    base = [tool("fairseq-kd"), "evaluate", "--data", tiny_data / "bin", "--ref", tiny_data / "raw/test.en",
            "--results", results, "--beam", "2", "--cpu", "--batch-size", "16"]
    run(base + ["--checkpoint", tiny_teacher, "--name", "teacher"])
    data = json.loads(results.read_text())
    assert [s["name"] for s in data["systems"]] == ["teacher"]
    refs = (tiny_data / "raw/test.en").read_text().splitlines()
    for label in ("greedy", "beam"):
        hyps = (tmp_path / f"results.teacher.{label}.txt").read_text().splitlines()
        assert len(hyps) == len(refs) == 40  # every sentence, none dropped
        entry = data["systems"][0][label]
        assert entry["bleu"] == round(BLEU().corpus_score(hyps, [refs]).score, 2)
        assert entry["chrf"] == round(CHRF().corpus_score(hyps, [refs]).score, 2)
        assert entry["sentences_per_s"] > 0
    # greedy hypotheses are those of a direct fairseq-generate run, in input order
    direct = run([tool("fairseq-generate"), tiny_data / "bin", "--user-dir", USER_DIR, "--path", tiny_teacher, "--gen-subset", "test",
                  "--beam", "1", "--batch-size", "7", "--required-batch-size-multiple", "1",
                  "--max-len-a", "1.5", "--max-len-b", "10", "--post-process", "sentencepiece", "--cpu"])
    by_id = {int(l.split("\t")[0][2:]): l.split("\t")[2] for l in direct.stdout.splitlines() if l.startswith("H-")}
    assert [by_id[i] for i in range(40)] == (tmp_path / "results.teacher.greedy.txt").read_text().splitlines()
    # parameters: the teacher's unique tensors
    assert data["systems"][0]["params"] == 360_960
    table = run([tool("fairseq-kd"), "table", results]).stdout
    assert "| teacher |" in table and "BLEU signature: `nrefs:1" in table
    run([tool("fairseq-kd"), "plot", results, "--out", tmp_path / "plot.png"])
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
