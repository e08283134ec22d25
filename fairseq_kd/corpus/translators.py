"""Translating a chunk of the split with the teacher: one interface, two backends.

:class:`ChunkTranslator` owns what both backends share (empty and long
sources, length-sorted batches, the selection among the candidates,
:mod:`.select`); a backend only turns batches of source lines into candidate
lists (N-best lists or samples) of target pieces with the teacher's scores
(log-probability per token, normalised by length ** --lenpen):

* ``fairseq``: fairseq's own SequenceGenerator, same settings and results as
  fairseq-generate (ensembles, fp16);
* ``ctranslate2``: the teacher converted to CTranslate2 (cached, see
  :mod:`fairseq_kd.deploy.ct2`); on CPU the worker's threads decode that many
  batches at once, one thread each (faster than one batch on all threads for
  small teachers, benchmarks/README.md).
"""
from fairseq_kd.corpus.data import length_sorted_batches
from fairseq_kd.corpus.select import Selector, decoding
from fairseq_kd.errors import require

BACKENDS = ("fairseq", "ctranslate2")
# --backend auto: fairseq_kd.corpus.build.resolve_backend picks one of BACKENDS
AUTO = "auto"


class ChunkTranslator:
    """Translates chunks of ``data``; subclasses implement :meth:`translate_batches`."""

    def __init__(self, args, data, max_source_positions):
        self.args, self.data = args, data
        self.beam, self.nbest = decoding(args)
        self.selector = Selector(args)
        self.max_source = max_source_tokens(args, max_source_positions)

    def translate_batches(self, batches):
        """For each batch of line ids: per line, the candidates as (piece string, score), best first."""
        raise NotImplementedError

    def translate_chunk(self, start, end):
        """Translate lines start..end-1, yielding batch sizes as it goes.

        The chunk's result is left in ``self.result``: per line the kept
        hypotheses ("hyps") and their scores ("scores": None where the
        teacher did not translate), the empty and long sources, and the lines
        whose first kept hypothesis is not the first candidate ("changed").
        """
        d = self.data
        hyps, scores, empty, long, changed = {}, {}, [], [], []
        todo = []
        for i in range(start, end):
            if d.sizes[i] <= 1:  # only </s>: nothing to translate
                hyps[i], scores[i] = [""], [None]
                empty.append(i)
            elif d.sizes[i] > self.max_source:
                long.append(i)
                if self.args.long_inputs == "reference":
                    hyps[i], scores[i] = [d.reference(i)], [None]
                else:
                    todo.append(i)
            else:
                todo.append(i)
        sizes = {i: min(int(d.sizes[i]), self.max_source) for i in todo}
        batches = length_sorted_batches(todo, sizes, self.args.max_tokens, self.args.batch_size)
        for batch, candidates in zip(batches, self.translate_batches(batches)):
            for i, cands in zip(batch, candidates):
                kept = self._choose(i, [pieces for pieces, _ in cands])
                hyps[i] = [cands[k][0] for k in kept]
                scores[i] = [cands[k][1] for k in kept]
                if kept[0] != 0:
                    changed.append(i)
            yield len(batch)
        lines = range(start, end)
        self.result = {"start": start, "end": end, "hyps": [hyps[i] for i in lines],
                       "scores": [scores[i] for i in lines], "empty": empty, "long": long,
                       "changed": sorted(changed)}

    def source_tokens(self, i):
        """Line i's source ids, ending with </s>; truncated to the maximum (--long-inputs truncate)."""
        tokens = self.data.src[i]
        if len(tokens) > self.max_source:  # keep </s> at the end
            tokens = tokens.new_tensor([*tokens[: self.max_source - 1].tolist(), int(tokens[-1])])
        return tokens

    def _choose(self, i, pieces):
        """Indices of line i's kept candidates (the utilities compare texts after --post-process)."""
        if len(pieces) == 1 or self.selector.method == "beam":
            return self.selector.select(pieces, pieces)
        from fairseq.data import data_utils

        post = self.args.post_process
        texts = [data_utils.post_process(p, post) for p in pieces]
        reference = self.data.reference(i, post) if self.selector.method == "inter" else None
        return self.selector.select(pieces, texts, reference)


def max_source_tokens(args, limit):
    """Source tokens (with </s>) a line may have: --max-source-tokens, at most the teacher's ``limit``."""
    if args.max_source_tokens > 0:
        # longer sources would index past the teacher's position embeddings
        require(args.max_source_tokens <= limit, f"--max-source-tokens {args.max_source_tokens} "
                f"exceeds the teacher's maximum source positions ({limit})")
        return args.max_source_tokens
    return limit


class FairseqTranslator(ChunkTranslator):
    """The teacher (or ensemble) and fairseq's SequenceGenerator, loaded once per process."""

    def __init__(self, args, data, device):
        import torch
        from argparse import Namespace

        from fairseq.dataclass.configs import GenerationConfig

        from fairseq_kd.tasks.translation_kd import TranslationKDConfig, TranslationKDTask

        cfg = TranslationKDConfig(data=args.data, source_lang=args.source_lang,
                                  target_lang=args.target_lang, teacher_path=args.path)
        # The task owns teacher loading and its dictionary checks.
        self.task = TranslationKDTask(cfg, data.src_dict, data.tgt_dict)
        self.models = self.task.teachers
        unfreeze_for_decoding(self.models)
        super().__init__(args, data, min(m.max_positions()[0] for m in self.models))
        gen = GenerationConfig(beam=self.beam, nbest=self.nbest, lenpen=args.lenpen,
                               unkpen=args.unkpen, max_len_a=args.max_len_a, max_len_b=args.max_len_b,
                               min_len=args.min_len, **fairseq_sampling(args))
        for m in self.models:
            m.to(device)
            if args.fp16:
                m.half()
            # as fairseq-generate: beam-size-aware attention, so results match its own
            m.prepare_for_inference_(Namespace(generation=gen))
        self.generator = self.task.build_generator(self.models, gen)
        self.strip = getattr(self.generator, "symbols_to_strip_from_output", {self.generator.eos})
        self.device, self.torch = device, torch

    def translate_chunk(self, start, end):
        if self.args.sampling:  # a chunk draws the same samples in any process, in any order
            self.torch.manual_seed(self.args.seed + start)
        yield from super().translate_chunk(start, end)

    def translate_batches(self, batches):
        for batch in batches:
            yield [[(self.data.tgt_dict.string(h["tokens"], extra_symbols_to_ignore=self.strip), h["score"])
                    for h in hyps] for hyps in self._generate(batch)]

    def _generate(self, batch):
        from fairseq.data import data_utils

        d = self.data
        tokens = [self.source_tokens(i) for i in batch]
        src_tokens = data_utils.collate_tokens(tokens, d.src_dict.pad(), d.src_dict.eos(), left_pad=True)
        sample = {"net_input": {"src_tokens": src_tokens.to(self.device),
                                "src_lengths": self.torch.tensor([len(t) for t in tokens], device=self.device)}}
        hypos = self.task.inference_step(self.generator, self.models, sample)
        return [[{"tokens": h["tokens"].int().cpu(), "score": float(h["score"])} for h in sent[: self.nbest]]
                for sent in hypos]


def fairseq_sampling(args):
    """GenerationConfig's sampling fields for --sampling (none without it).

    fairseq draws ``beam`` samples per source, one per beam, each from the
    whole (top-k or top-p restricted) distribution at every step.
    """
    if not args.sampling:
        return {}
    topk = args.sampling_topk if args.sampling == "topk" else -1
    topp = args.sampling_topp if args.sampling == "topp" else -1.0
    return dict(sampling=True, sampling_topk=topk, sampling_topp=topp, temperature=args.sampling_temperature)


def unfreeze_for_decoding(models):
    """Let the teacher's parameters require grad again, as fairseq-generate leaves them.

    Why: the task loads the teacher frozen, and PyTorch's matmul folds a 3-D
    input into one 2-D GEMM only when the weight requires grad (aten's
    ``should_fold``, pytorch/pytorch#118548).  While decoding, the features
    reaching the output projection (no bias, dim x vocabulary) are B x 1 x C
    views of a T x B x C tensor, so with frozen weights each step ran as B
    broadcast matrix-vector products (``aten::bmm``): with the shipped
    teacher's 256 x 8008 projection that was 3-4x the CPU time of the one
    product fairseq-generate computes (timed alternately in one process), the
    bulk of why ``fairseq-kd corpus`` was slower than fairseq-generate, and the
    scores differed from fairseq-generate's in the last bits.  Nothing is
    trained: generation runs under ``torch.no_grad`` (the task's
    ``inference_step``).
    """
    for m in models:
        for p in m.parameters():
            p.requires_grad_(True)


class CT2Translator(ChunkTranslator):
    """The teacher converted to CTranslate2 (``args.ct2_model``), decoding as fairseq-generate."""

    def __init__(self, args, data, device, device_index=0):
        from fairseq_kd.deploy.ct2 import max_source_positions

        super().__init__(args, data, max_source_positions(args.path))
        self.translator, self.options = ct2_decoder(args, args.ct2_model, device, device_index, self.beam,
                                                    self.nbest)

    def translate_batches(self, batches):
        from fairseq_kd.deploy.ct2 import translate_batches

        symbols = self.data.src_dict.symbols
        sources = [[[symbols[t] for t in self.source_tokens(i)[:-1].tolist()] for i in batch]
                   for batch in batches]  # CTranslate2 appends </s> itself
        for hyps in translate_batches(self.translator, sources, scores=True, **self.options):
            yield [[(" ".join(h), score) for h, score in nbest] for nbest in hyps]


def ct2_decoder(args, model_dir, device, device_index, beam, nbest):
    """A corpus worker's CTranslate2 translator for ``model_dir`` and its decoding options.

    On CPU the worker's --threads decode that many batches at once, one
    thread each; a GPU worker decodes one batch at a time.
    """
    from fairseq_kd.deploy.ct2 import load_translator

    parallel = args.threads if device == "cpu" else 1
    if args.sampling:
        import ctranslate2

        # Each decoding thread seeds its generator once, from this seed: the samples
        # repeat for the same process and batches, not across resumed runs.
        ctranslate2.set_random_seed(args.seed)
    translator = load_translator(model_dir, device, device_index, threads=1, parallel=max(parallel, 1))
    options = dict(beam=beam, nbest=nbest, lenpen=args.lenpen, min_len=args.min_len,
                   max_len_a=args.max_len_a, max_len_b=args.max_len_b)
    options.update(ct2_sampling(args))  # sampling decodes with beam 1
    return translator, options


def ct2_sampling(args):
    """CTranslate2's sampling options for --sampling (none without it).

    CTranslate2 samples with beam size 1 and returns num_hypotheses samples
    (sorted by score); top-p needs top-k 0 (the whole vocabulary).  It has
    no epsilon sampling (Finkelstein et al.'s choice for MBR).
    """
    if not args.sampling:
        return {}
    topk = args.sampling_topk if args.sampling == "topk" else 0
    topp = args.sampling_topp if args.sampling == "topp" else 1.0
    return dict(beam=1, sampling_topk=topk, sampling_topp=topp, sampling_temperature=args.sampling_temperature)
