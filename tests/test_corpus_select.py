"""fairseq-kd corpus's selections (beam, inter, MBR; keep n) and filters, against brute force.

The unit tests need no teacher; the end-to-end ones decode the tiny teacher
with the fairseq backend and compare with stock fairseq-generate's N-best lists.
"""
import argparse
import itertools
import json
import shutil
from collections import Counter

import numpy as np
import pytest
import sacrebleu

import helpers
from fairseq_kd.corpus import filters, select, work
from fairseq_kd.errors import KDError
from test_corpus_backend import parse
from test_seq_kd_corpus import corpus, odd_lines_data, read_lines, stock_nbest  # noqa: F401 (a fixture)


# ------------------------------------------------------------------ utilities and MBR
def brute_mbr_order(texts, utility):
    """Candidates by expected utility against the others (j != i), ties to the earlier one."""
    score = sacrebleu.sentence_chrf if utility == "chrf" else sacrebleu.sentence_bleu
    n = len(texts)
    u = [sum(score(texts[i], [texts[j]]).score for j in range(n) if j != i) / (n - 1) for i in range(n)]
    return sorted(range(n), key=lambda i: (-u[i], i))


CANDIDATES = [
    "the king said to his servants",
    "the king said unto his servants",
    "and the king said to the servants",
    "the king spoke to his servants",
    "the king said unto his servants",  # a duplicate: support for candidate 1
    "servants",
]


def test_fastchrf_matrix_equals_sacrebleu_sentence_chrf_on_real_sentences(tmp_path):
    raw = helpers.bible_slice(tmp_path, {"valid": 12})
    texts = read_lines(raw / "valid.en") + ["", "a"]  # an empty and a one-character sentence too
    matrix = select.chrf_matrix(texts)
    for i, j in itertools.product(range(len(texts)), repeat=2):
        assert matrix[i][j] == pytest.approx(sacrebleu.sentence_chrf(texts[i], [texts[j]]).score, abs=1e-9)


@pytest.mark.parametrize("utility", ["chrf", "bleu"])
@pytest.mark.parametrize("keep", [1, 3])
def test_mbr_keeps_the_best_expected_utility_against_the_others(utility, keep):
    args = argparse.Namespace(select="mbr", keep=keep, utility=utility)
    kept = select.Selector(args).select(CANDIDATES, CANDIDATES)
    expected = select.first_distinct(brute_mbr_order(CANDIDATES, utility), CANDIDATES, keep)
    assert kept == expected and len(kept) == keep
    assert len({CANDIDATES[k] for k in kept}) == keep  # distinct hypotheses
    if keep == 1:
        assert kept == [1]  # the duplicated candidate: its copy is support


def test_expected_utility_leaves_the_candidate_itself_out():
    matrix = [[100, 10, 40], [20, 100, 60], [0, 30, 100]]
    assert select.expected_utilities(matrix) == [25, 40, 15]


def test_ties_break_towards_the_better_beam_rank():
    # same length, so chrF's precision and recall swap: each has the other's utility
    pair = ["one two", "two one"]
    args = argparse.Namespace(select="mbr", keep=1, utility="chrf")
    assert select.Selector(args).select(pair, pair) == [0]
    assert select.Selector(args).select(pair[::-1], pair[::-1]) == [0]
    assert select.ranked([3.0, 5.0, 5.0, 3.0]) == [1, 2, 0, 3]


def test_beam_keeps_the_first_distinct_and_says_when_there_are_fewer():
    args = argparse.Namespace(select="beam", keep=3, utility=None)
    assert select.Selector(args).select(["x", "x", "y"], ["x", "x", "y"]) == [0, 2]


def test_inter_keeps_the_best_against_the_gold_target():
    gold = "the king spoke to his servants"
    args = argparse.Namespace(select="inter", keep=1, utility=None)
    bleu = [sacrebleu.sentence_bleu(c, [gold]).score for c in CANDIDATES]
    assert select.Selector(args).select(CANDIDATES, CANDIDATES, gold) == [bleu.index(max(bleu))] == [3]


# ------------------------------------------------------------------ options and saved settings
def resolved(*extra):
    args = parse("out", *extra)
    select.resolve(args)
    return args


def test_default_and_seq_inter_settings_are_saved_as_before():
    assert select.saved_settings(resolved()) == {}
    alias, spelled = resolved("--seq-inter", "4"), resolved("--select", "inter", "--candidates", "4")
    for args in (alias, spelled):
        assert (args.select, args.seq_inter, select.decoding(args)) == ("inter", 4, (4, 4))
        assert select.saved_settings(args) == {}  # only seq_inter, which earlier versions saved too
    mbr = resolved("--select", "mbr", "--candidates", "8", "--keep", "2")
    assert select.saved_settings(mbr) == {"select": "mbr", "candidates": 8, "keep": 2, "utility": "chrf"}
    sampled = resolved("--select", "mbr", "--candidates", "8", "--sampling", "topp")
    assert select.saved_settings(sampled)["sampling"] == "topp"
    assert "sampling_topk" not in select.saved_settings(resolved("--sampling", "topp", "--candidates", "3",
                                                                 "--sampling-topk", "7"))
    assert select.decoding(resolved("--keep", "3")) == (5, 5)  # the 5-best of --beam 5
    assert select.decoding(resolved()) == (5, 1)
    assert select.decoding(resolved("--candidates", "8")) == (8, 1)  # the best of beam 8
    assert select.describe(resolved()) == "the best of beam 5"
    assert select.describe(mbr) == "the 8-best of beam 8 ranked by expected chrf (MBR), keep 2"


@pytest.mark.parametrize("extra, message", [
    (["--keep", "6"], "--keep 6 exceeds the 5 candidates per source"),
    (["--select", "mbr", "--candidates", "1"], "--select mbr compares candidates with each other"),
    (["--utility", "bleu"], "--utility applies to --select inter or mbr"),
    (["--sampling", "topk"], "--sampling needs --candidates N"),
    (["--seq-inter", "4", "--select", "mbr"], "--seq-inter N is --select inter --candidates N"),
])
def test_bad_selection_options_are_one_line_errors(extra, message):
    with pytest.raises(KDError, match=message):
        resolved(*extra)


# ------------------------------------------------------------------ filters
def brute_longest_repeat(tokens):
    best = 1 if tokens else 0
    for n, start in itertools.product(range(1, 5), range(len(tokens))):
        times = 1
        while tokens[start:start + n] == tokens[start + times * n:start + (times + 1) * n] \
                and start + (times + 1) * n <= len(tokens):
            times += 1
        best = max(best, times)
    return best


@pytest.mark.parametrize("tokens", [
    [], ["a"], "a a a a a".split(), "x a b a b a b y".split(), "a b c a b c a b c a b c a b".split(),
    "w x y z w x y z w x y z".split(), "the the cat the the the".split(), "a b c d e".split(),
])
def test_longest_repeat_equals_brute_force(tokens):
    assert filters.longest_repeat(tokens) == brute_longest_repeat(tokens)


def test_copy_rule():
    src = "▁el ▁rey ▁dijo".split()
    assert filters.is_copy(src, list(src), 1.0)
    assert filters.is_copy(src, ["▁rey", "▁el", "▁dijo"], 1.0)  # reordered copy
    assert filters.is_copy(src, "▁el ▁rey ▁dijo ▁the".split(), 0.75) and not \
        filters.is_copy(src, "▁el ▁rey ▁dijo ▁the".split(), 0.9)
    assert not filters.is_copy(src, "▁the ▁king ▁said".split(), 0.9)
    assert not filters.is_copy(src, [], 0.9)


def filter_args(**kw):
    defaults = dict(filter="all", filter_score_min=None, filter_score_percentile=None, filter_ratio="0.5,2",
                    filter_copy_overlap=0.9, filter_repeat=2)
    return argparse.Namespace(**{**defaults, **kw})


def test_rules_fire_in_order_on_hand_made_pairs():
    rule = filters.PairFilter(filter_args(filter_score_min=-2.0), [])
    src = "▁a ▁b ▁c ▁d".split()
    assert rule.reason(src, list(src), -9.0) == "copy"  # also a bad score: the first rule names it
    assert rule.reason(src, "▁x ▁x ▁x".split(), 0.0) == "repeat"
    assert rule.reason(src, "▁x".split(), 0.0) == "ratio"  # 1/4 < 0.5
    assert rule.reason(src, "▁w ▁x ▁y ▁z ▁v ▁u ▁t ▁s ▁r".split(), 0.0) == "ratio"  # 9/4 > 2
    assert rule.reason(src, "▁w ▁x ▁y".split(), -2.5) == "score"
    assert rule.reason(src, "▁w ▁x ▁y".split(), -1.5) is None
    only = filters.PairFilter(filter_args(filter="ratio"), [])
    assert only.reason(src, list(src), -9.0) is None


def test_score_percentile_drops_the_worst_share():
    scores = [-0.1 * k for k in range(200)]
    rule = filters.PairFilter(filter_args(filter="score", filter_score_percentile=5.0), scores)
    dropped = [s for s in scores if rule.reason(["▁a"], ["▁b"], s) == "score"]
    assert sorted(dropped) == sorted(scores)[:10]  # the worst 5% of 200
    default = filters.PairFilter(filter_args(filter="score"), scores)
    assert default.min_score == rule.min_score  # 5 is the default percentile


@pytest.mark.parametrize("spec, message", [("copy,nope", "--filter: expected"), ("", "--filter: expected")])
def test_bad_filter_options_are_one_line_errors(spec, message):
    with pytest.raises(KDError, match=message):
        filters.check_args(filter_args(filter=spec))
    with pytest.raises(KDError, match="--filter-ratio"):
        filters.check_args(filter_args(filter_ratio="2,1"))


def test_distilled_data_refuses_a_corpus_without_one_pair_per_line(tmp_path):
    from fairseq_kd.tasks.distilled_data import check_one_pair_per_line

    (tmp_path / "train.report.json").write_text(json.dumps({"pairs": 30, "sources": 30, "filtered": {}}))
    check_one_pair_per_line(tmp_path, "train", "--distilled-data X")
    (tmp_path / "train.report.json").write_text(json.dumps({"pairs": 60, "sources": 30, "keep": 2,
                                                            "filter": "none", "filtered": {}}))
    with pytest.raises(KDError, match="holds 60 pairs for 30 sources .*needs one teacher target per gold line"):
        check_one_pair_per_line(tmp_path, "train", "--distilled-data X")


# ------------------------------------------------------------------ end to end (tiny teacher)
NBEST = 4


@pytest.fixture(scope="module")
def test_nbest(tiny_data, tiny_teacher):
    """Stock fairseq-generate's 4-best lists of the test split (40 lines), pieces."""
    hyps, _ = stock_nbest(tiny_data / "bin", tiny_teacher, "test", str(NBEST))
    return hyps


def decoded_bin(folder, split, lang, dict_file):
    """The lines of a binarized side, as pieces."""
    from fairseq.data import Dictionary, data_utils

    d = Dictionary.load(str(dict_file))
    data = data_utils.load_indexed_dataset(str(folder / f"{split}.es-en.{lang}"), d)
    return [d.string(data[i]) for i in range(len(data))]


def assert_formats_aligned(out, split="test"):
    """pieces, text and bin hold the same pairs, line by line."""
    src, tgt = read_lines(out / f"{split}.es"), read_lines(out / f"{split}.en")
    assert len(src) == len(tgt) == len(read_lines(out / f"{split}.text.en"))
    assert decoded_bin(out, split, "es", out / "dict.es.txt") == src
    assert decoded_bin(out, split, "en", out / "dict.en.txt") == tgt
    return src, tgt


def test_default_is_seq_kd_byte_for_byte(tiny_data, tiny_teacher, test_nbest, tmp_path):
    common = ["--split", "test", "--formats", "bin,pieces,text", "--copy-splits", ""]
    corpus(tiny_data / "bin", tiny_teacher, tmp_path / "default", *common)
    corpus(tiny_data / "bin", tiny_teacher, tmp_path / "spelled", *common, "--seq-inter", "0", "--select", "beam",
           "--keep", "1", "--filter", "none")
    for name in ("test.en", "test.es", "test.text.en", "test.es-en.en.bin", "test.es-en.en.idx",
                 "test.es-en.es.bin", "test.es-en.es.idx"):
        assert (tmp_path / "default" / name).read_bytes() == (tmp_path / "spelled" / name).read_bytes(), name
    assert read_lines(tmp_path / "default" / "test.en") == [test_nbest[i][0] for i in range(40)]
    assert (tmp_path / "default" / "test.es-en.es.bin").read_bytes() == \
        (tiny_data / "bin" / "test.es-en.es.bin").read_bytes()
    report = json.loads((tmp_path / "default" / "test.report.json").read_text())
    assert (report["pairs"], report["sources"], report["duplication"]) == (40, 40, 1.0)
    assert report["changed_picks"] == 0 and report["filtered"] == {}


def test_keep_n_writes_the_n_best_as_pairs(tiny_data, tiny_teacher, test_nbest, tmp_path):
    out = tmp_path / "nbest"
    proc = corpus(tiny_data / "bin", tiny_teacher, out, "--split", "test", "--keep", "3",
                  "--candidates", NBEST, "--formats", "bin,pieces,text", "--copy-splits", "")
    src, tgt = assert_formats_aligned(out)
    gold_src = read_lines(out / "test.es")
    expected = [(i, test_nbest[i][k]) for i in range(40)
                for k in select.first_distinct(range(NBEST), test_nbest[i], 3)]
    sources = decoded_bin(tiny_data / "bin", "test", "es", tiny_data / "bin" / "dict.es.txt")
    assert tgt == [h for _, h in expected]
    assert gold_src == [sources[i] for i, _ in expected]  # the source repeated for each pair
    report = json.loads((out / "test.report.json").read_text())
    fewer = sum(len(set(test_nbest[i][:NBEST])) < 3 for i in range(40))
    assert (report["pairs"], report["sources"], report["fewer_than_keep"]) == (len(expected), 40, fewer)
    assert report["duplication"] == round(len(expected) / 40, 4)
    assert f"wrote {len(expected)} pairs for 40 sources" in proc.stdout


@pytest.mark.parametrize("keep", [1, 2])
def test_mbr_corpus_equals_brute_force_over_the_nbest(tiny_data, tiny_teacher, test_nbest, tmp_path, keep):
    out = tmp_path / "mbr"
    corpus(tiny_data / "bin", tiny_teacher, out, "--split", "test", "--select", "mbr", "--candidates", NBEST,
           "--keep", keep, "--utility", "chrf", "--post-process", "sentencepiece", "--formats", "pieces")
    post = [[helpers_post(h) for h in test_nbest[i]] for i in range(40)]
    expected = []
    for i in range(40):
        order = brute_mbr_order(post[i], "chrf")
        expected += [test_nbest[i][k] for k in select.first_distinct(order, test_nbest[i], keep)]
    assert read_lines(out / "test.en") == expected
    report = json.loads((out / "test.report.json").read_text())
    changed = sum(brute_mbr_order(post[i], "chrf")[0] != 0 for i in range(40))
    assert report["changed_picks"] == changed and report["utility"] == "chrf" and report["candidates"] == NBEST


def test_a_smaller_keep_merges_from_chunks_saved_with_a_larger_one(tiny_data, tiny_teacher, tmp_path):
    """MBR-1 from MBR-n's decode (the recipe's seq_kd_mbr beside seq_kd_mbr_n): the first of each
    line's n kept candidates is the one --keep 1 keeps, so only the merge runs again."""
    args = ["--split", "test", "--chunk-size", "20", "--select", "mbr", "--candidates", str(NBEST),
            "--utility", "chrf", "--post-process", "sentencepiece", "--formats", "bin,pieces"]
    corpus(tiny_data / "bin", tiny_teacher, tmp_path / "mbr_n", *args, "--keep", "2")
    corpus(tiny_data / "bin", tiny_teacher, tmp_path / "fresh", *args, "--keep", "1")
    reused = tmp_path / "mbr"
    shutil.copytree(tmp_path / "mbr_n" / "test.work", reused / "test.work")
    (reused / "test.work" / "chunk-000001.json").unlink()  # one chunk left to translate
    proc = corpus(tiny_data / "bin", tiny_teacher, reused, *args, "--keep", "1")
    assert "resuming: 1 of 2 chunks already done" in proc.stdout
    for name in ("test.en", "test.es", "test.es-en.en.bin", "test.es-en.es.bin"):
        assert (reused / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes(), name
    report, fresh = (json.loads((d / "test.report.json").read_text()) for d in (reused, tmp_path / "fresh"))
    assert (report["keep"], report["pairs"], report["changed_picks"]) == (1, 40, fresh["changed_picks"])
    # the chunk translated on resume kept as many as the saved ones: the folder still serves --keep 2
    for c in ("chunk-000000.json", "chunk-000001.json"):
        assert (reused / "test.work" / c).read_text() == (tmp_path / "mbr_n" / "test.work" / c).read_text()
    corpus(tiny_data / "bin", tiny_teacher, reused, *args, "--keep", "2")
    assert read_lines(reused / "test.en") == read_lines(tmp_path / "mbr_n" / "test.en")
    proc = corpus(tiny_data / "bin", tiny_teacher, reused, *args, "--keep", "3", check=False)
    assert "holds a run with other settings (keep)" in proc.stderr


def helpers_post(pieces):
    return pieces.replace(" ", "").replace("\u2581", " ").strip()


def hand_made_chunk(tiny_data):
    """Two hypotheses per test line, built to trip each rule, with made-up teacher scores.

    The tiny teacher's own outputs are all alike (runs of one piece), so the
    pairs are written into the saved chunk by hand and merged from there.
    """
    src = read_lines(tiny_data / "pieces" / "test.sp.es")
    gold = read_lines(tiny_data / "pieces" / "test.sp.en")
    hyps, scores = [], []
    for i, (s, g) in enumerate(zip(src, gold)):
        second = {0: s, 1: " ".join(["▁the"] * 8), 2: g.split()[0]}.get(i % 5, " ".join(g.split()[:-1]))
        hyps.append([g, second])
        scores.append([-0.5 - 0.1 * i, -1.0 - 0.05 * i])
    return {"start": 0, "end": len(src), "hyps": hyps, "scores": scores, "empty": [], "long": [],
            "changed": []}


def brute_reason(s, h, score, threshold, repeat=4, ratio=(0.33, 3), overlap=0.9):
    s, h = s.split(), h.split()
    if h == s or sum((Counter(h) & Counter(s)).values()) >= overlap * len(h) > 0:
        return "copy"
    if brute_longest_repeat(h) > repeat:
        return "repeat"
    if not ratio[0] <= len(h) / len(s) <= ratio[1]:
        return "ratio"
    return "score" if score < threshold else None


def test_filters_drop_pairs_with_a_side_file(tiny_data, tiny_teacher, tmp_path):
    """Every rule against brute force on hand-made pairs; outputs stay aligned; the counts add up."""
    out = tmp_path / "filtered"
    common = ["--split", "test", "--keep", "2", "--candidates", NBEST, "--formats", "bin,pieces,text",
              "--copy-splits", ""]
    corpus(tiny_data / "bin", tiny_teacher, out, *common)
    chunk = hand_made_chunk(tiny_data)
    (out / "test.work" / "chunk-000000.json").write_text(json.dumps(chunk))
    proc = corpus(tiny_data / "bin", tiny_teacher, out, *common)  # merged again, unfiltered
    src_all, tgt_all = read_lines(out / "test.es"), read_lines(out / "test.en")
    assert tgt_all == [h for hs in chunk["hyps"] for h in hs]
    proc = corpus(tiny_data / "bin", tiny_teacher, out, *common, "--filter", "all",
                  "--filter-score-percentile", "20")
    scores = [s for ss in chunk["scores"] for s in ss]
    threshold = np.percentile(scores, 20)
    reasons = [brute_reason(s, h, score, threshold) for s, h, score in zip(src_all, tgt_all, scores)]
    assert {"copy", "repeat", "ratio", "score", None} <= set(reasons)
    src, tgt = assert_formats_aligned(out)
    assert list(zip(src, tgt)) == [p for p, r in zip(zip(src_all, tgt_all), reasons) if r is None]
    side = [line.split("\t") for line in read_lines(out / "test.filtered.tsv")]
    assert side[0] == ["line", "reason", "source", "hypothesis"]
    lines = [i for i, hs in enumerate(chunk["hyps"]) for _ in hs]
    dropped = [[str(i), r, s, h] for i, s, h, r in zip(lines, src_all, tgt_all, reasons) if r]
    assert side[1:] == dropped
    report = json.loads((out / "test.report.json").read_text())
    assert report["filtered"] == dict(sorted(Counter(r for r in reasons if r).items()))
    assert report["pairs"] + len(dropped) == report["pairs_selected"] == len(tgt_all)
    assert report["score_threshold"] == pytest.approx(threshold)
    assert f"{len(dropped)} pairs filtered (--filter copy,repeat,ratio,score)" in proc.stdout
    # the recipe's seq_kd_filtered: another --out that starts from these chunks decodes nothing
    # and writes the same filtered corpus
    assert work.chunks_hold_scores(out / "test.work")
    copy = tmp_path / "copy"
    shutil.copytree(out / "test.work", copy / "test.work")
    proc = corpus(tiny_data / "bin", tiny_teacher, copy, *common, "--filter", "all",
                  "--filter-score-percentile", "20")
    assert "resuming: 1 of 1 chunks already done" in proc.stdout
    for name in ("test.es", "test.en", "test.filtered.tsv"):
        assert read_lines(copy / name) == read_lines(out / name)
    # the filters act at the merge: the same folder re-merges without them, and the side file goes
    proc = corpus(tiny_data / "bin", tiny_teacher, out, *common)
    assert "chunks already done" in proc.stdout and not (out / "test.filtered.tsv").exists()
    assert read_lines(out / "test.en") == tgt_all
    proc = corpus(tiny_data / "bin", tiny_teacher, out, *common, "--filter", "score", "--filter-score-min", "0",
                  check=False)
    assert "--filter dropped all 80 pairs" in proc.stderr and (out / "test.filtered.tsv").exists()


def test_filters_judge_only_the_teachers_translations(odd_lines_data, tiny_teacher, tmp_path):
    """The empty line of an empty source and the gold target of a long one are always kept."""
    corpus(odd_lines_data, tiny_teacher, tmp_path, "--max-source-tokens", "200", "--formats", "pieces",
           "--filter", "ratio", "--filter-ratio", "100,200")  # drops every translation
    gold = read_lines(odd_lines_data / "raw" / "train.en")
    assert read_lines(tmp_path / "train.en") == ["", gold[7]]
    report = json.loads((tmp_path / "train.report.json").read_text())
    assert report["filtered"] == {"ratio": 28} and report["pairs"] == 2 and report["sources"] == 30


def test_a_chunk_folder_of_the_previous_version_resumes_with_the_defaults(tiny_data, tiny_teacher, tmp_path):
    """Chunks without hypotheses lists or scores ("lines" only), settings without the new options."""
    args = ["--split", "test", "--chunk-size", "20", "--formats", "pieces"]
    out = tmp_path / "old"
    corpus(tiny_data / "bin", tiny_teacher, out, *args)
    expected = read_lines(out / "test.en")
    old = json.loads((out / "test.work" / "chunk-000000.json").read_text())
    old = {"start": old["start"], "end": old["end"], "lines": [h[0] for h in old["hyps"]],
           "empty": old["empty"], "long": old["long"]}
    assert work.chunks_hold_scores(out / "test.work")
    (out / "test.work" / "chunk-000000.json").write_text(json.dumps(old))
    assert not work.chunks_hold_scores(out / "test.work")  # the recipe decodes again
    (out / "test.work" / "chunk-000001.json").unlink()
    (out / "test.en").unlink()
    proc = corpus(tiny_data / "bin", tiny_teacher, out, *args)
    assert "resuming: 1 of 2 chunks already done" in proc.stdout
    assert read_lines(out / "test.en") == expected
    proc = corpus(tiny_data / "bin", tiny_teacher, out, *args, "--select", "mbr", "--candidates", "4", check=False)
    assert "holds a run with other settings (candidates, select, utility)" in proc.stderr
    proc = corpus(tiny_data / "bin", tiny_teacher, out, *args, "--filter", "score", check=False)
    assert "--filter score: chunks saved by an earlier version" in proc.stderr


@pytest.mark.parametrize("backend", ["fairseq", "ctranslate2"])
def test_sampled_candidates(tiny_data, tiny_teacher, tmp_path, monkeypatch, backend):
    monkeypatch.setenv("FAIRSEQ_KD_CACHE", str(tmp_path / "ct2_cache"))
    out = tmp_path / backend
    corpus(tiny_data / "bin", tiny_teacher, out, "--split", "test", "--select", "beam", "--keep", "3",
           "--candidates", "6", "--sampling", "topk", "--sampling-topk", "5", "--formats", "pieces",
           "--backend", backend)
    src, tgt = read_lines(out / "test.es"), read_lines(out / "test.en")
    per_source = Counter(src)
    pairs = list(zip(src, tgt))
    assert len(set(pairs)) == len(pairs)  # distinct hypotheses per source
    assert all(n <= 3 for n in per_source.values())
    report = json.loads((out / "test.report.json").read_text())
    assert report["sampling"] == "topk" and report["candidates"] == 6 and report["pairs"] == len(tgt)
    if backend == "fairseq":  # each chunk is seeded: a second run draws the same samples
        corpus(tiny_data / "bin", tiny_teacher, tmp_path / "again", "--split", "test", "--keep", "3",
               "--candidates", "6", "--sampling", "topk", "--sampling-topk", "5", "--formats", "pieces",
               "--backend", backend)
        assert read_lines(tmp_path / "again" / "test.en") == tgt
    assert report["selection"] == "6 samples (top-k 5, temperature 1.0) in the teacher's order, keep 3"


def test_mbr_with_ctranslate2(tiny_data, tiny_teacher, tmp_path, monkeypatch):
    """The ctranslate2 backend's N-best list goes through the same selection (here against its own list)."""
    monkeypatch.setenv("FAIRSEQ_KD_CACHE", str(tmp_path / "ct2_cache"))
    common = ["--split", "test", "--candidates", NBEST, "--formats", "pieces", "--backend", "ctranslate2"]
    corpus(tiny_data / "bin", tiny_teacher, tmp_path / "nbest", *common, "--keep", NBEST)
    corpus(tiny_data / "bin", tiny_teacher, tmp_path / "mbr", *common, "--select", "mbr")
    src, tgt = read_lines(tmp_path / "nbest" / "test.es"), read_lines(tmp_path / "nbest" / "test.en")
    lists = {}
    for s, h in zip(src, tgt):
        lists.setdefault(s, []).append(h)
    chosen = read_lines(tmp_path / "mbr" / "test.en")
    for s, c in zip(read_lines(tmp_path / "mbr" / "test.es"), chosen):
        cands = lists[s]
        if len(cands) > 1:
            assert c == cands[brute_mbr_order(cands, "chrf")[0]]
