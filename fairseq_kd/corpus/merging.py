"""Merging a corpus build's chunks: the pairs each line keeps, the filters, and what the report says of them."""
import os
from collections import Counter

from fairseq_kd.atomic_io import write_lines
from fairseq_kd.corpus import filters, select
from fairseq_kd.errors import require


def kept_pairs(args, work, sources):
    """The merge every corpus build shares: its chunks in line order, the pairs kept after
    --select/--keep and --filter (the dropped ones in OUT/SPLIT.filtered.tsv), and the
    report entries that say so.

    ``sources``: the split's source lines as the filters compare them (pieces, or
    plain text for an external teacher).  Returns (ids, lines, untranslated,
    entries): the source line of each kept pair, its target, the lines the
    teacher did not translate, and the report's entries.
    """
    merged = MergedChunks(work, args.keep)
    require(len(merged.hyps) == len(sources), f"merged {len(merged.hyps)} lines, the split has {len(sources)}")
    untranslated = merged.untranslated(args.long_inputs)
    selected = merged.pairs()
    kept, dropped, threshold = filter_pairs(args, selected, sources, untranslated, merged.scored)
    filtered_file = write_filtered(args, dropped, sources)
    # an empty split is no corpus (and fairseq cannot even map its empty .bin)
    require(kept or not selected,
            f"--filter dropped all {len(selected)} pairs (see {filtered_file}): loosen its thresholds")
    ids, lines = [i for i, _, _ in kept], [h for _, h, _ in kept]
    translated = len(sources) - len(untranslated)
    entries = {"lines": len(lines), "sources": len(sources), "pairs": len(lines),
               "duplication": round(len(lines) / max(len(sources), 1), 4), "translated": translated,
               "empty_sources": merged.empty, "long_sources": merged.long, "long_inputs": args.long_inputs,
               **selection_report(args, merged, translated, untranslated),
               "pairs_selected": len(selected), "filter": ",".join(filters.parse_rules(args.filter)) or filters.NONE,
               "filtered": filtered_counts(dropped), "filtered_file": filtered_file, "score_threshold": threshold}
    return ids, lines, untranslated, entries


class MergedChunks:
    """The saved chunks of a split, in line order: per line the first ``keep`` kept hypotheses
    (chunks saved with a larger --keep hold more) and their scores.

    Chunks saved before selections existed hold one line each ("lines") and
    no scores nor changed picks: they merge as they are (``scored`` and
    ``changed`` say what they lack).
    """

    def __init__(self, work, keep):
        self.hyps, self.scores, self.empty, self.long, self.changed = [], [], [], [], []
        self.scored = True
        for c in range(len(work.chunks)):
            chunk = work.load(c)
            if "hyps" in chunk:
                self.hyps += [hs[:keep] for hs in chunk["hyps"]]
                self.scores += [ss[:keep] for ss in chunk["scores"]]
                if self.changed is not None:
                    self.changed += chunk["changed"]
            else:  # an earlier version's chunk
                self.hyps += [[line] for line in chunk["lines"]]
                self.scores += [[None] for _ in chunk["lines"]]
                self.scored, self.changed = False, None
            self.empty += chunk["empty"]
            self.long += chunk["long"]

    def untranslated(self, long_inputs):
        """Lines whose target is not the teacher's: empty sources, long ones given the gold target."""
        return set(self.empty) | (set(self.long) if long_inputs == "reference" else set())

    def pairs(self):
        """[(line, hypothesis, score)] in line order, a line's kept hypotheses best first."""
        return [(i, h, score) for i, (hs, ss) in enumerate(zip(self.hyps, self.scores))
                for h, score in zip(hs, ss)]


def filter_pairs(args, pairs, sources, untranslated, scored):
    """(kept pairs, [(line, rule, hypothesis)] dropped, score threshold or None) under --filter."""
    rules = filters.parse_rules(args.filter)
    if not rules:
        return pairs, [], None
    judged = [p for p in pairs if p[0] not in untranslated]
    if "score" in rules:
        require(scored, "--filter score: chunks saved by an earlier version of fairseq-kd corpus hold no "
                "teacher scores; decode again into another --out")
    rule = filters.PairFilter(args, [score for _, _, score in judged])
    kept, dropped = [], []
    for i, h, score in pairs:
        reason = None if i in untranslated else rule.reason(sources[i].split(), h.split(), score)
        if reason:
            dropped.append((i, reason, h))
        else:
            kept.append((i, h, score))
    return kept, dropped, rule.min_score


def write_filtered(args, dropped, sources):
    """OUT/SPLIT.filtered.tsv: every dropped pair with its rule (none without --filter)."""
    path = os.path.join(args.out, f"{args.split}.filtered.tsv")
    if not filters.parse_rules(args.filter):
        if os.path.exists(path):  # left by an earlier merge with filters: it would describe other files
            os.remove(path)
        return None
    write_lines(path, ["line\treason\tsource\thypothesis",
                       *(f"{i}\t{reason}\t{sources[i]}\t{h}" for i, reason, h in dropped)])
    return path


def selection_report(args, merged, translated, untranslated):
    """What was selected, and how often the choice left the first candidate (report entries)."""
    changed = None if merged.changed is None else len(merged.changed)
    fewer = sum(len(hs) < args.keep for i, hs in enumerate(merged.hyps) if i not in untranslated)
    return {"selection": select.describe(args), "select": args.select,
            "candidates": select.decoding(args)[1], "sampling": args.sampling,
            "utility": select.utility_name(args), "keep": args.keep, "changed_picks": changed,
            "changed_share": None if changed is None else round(changed / max(translated, 1), 4),
            "fewer_than_keep": fewer}


def filtered_counts(dropped):
    """{rule: pairs it dropped} of :func:`filter_pairs`'s dropped pairs (the report's "filtered")."""
    return dict(sorted(Counter(reason for _, reason, _ in dropped).items()))
