"""``onpolicy_kd``: on-policy distillation, GKD (Agarwal et al., ICLR 2024).

For each training batch, with probability lambda (``--onpolicy-ratio``) the
targets are the student's own outputs y_s for the batch's sources, generated
inside the step without gradient; otherwise they are the batch's targets y
(gold, or the teacher's translations when the task has ``--distilled-data``).
On either, the teacher scores every prefix in one pass and

    L = T^2 * sum_j D_beta(q_T(.|x, y_<j) || p_T(.|x, y_<j))

summed over the non-pad target tokens, where D_beta is the generalized
Jensen-Shannon divergence of the paper scaled by 1 / (beta (1 - beta)), with
beta = 0 exactly the forward KL(q || p) of word-level KD and beta = 1 exactly
the reverse KL(p || q) (:mod:`fairseq_kd.losses.jsd` has the formula and the
reasons).  ``sample_size`` is the number of target tokens the batch was
trained on (the generated ones for an on-policy batch), or sentences with
--sentence-avg.  With ``--onpolicy-ratio 0 --jsd-beta 0`` this is ``word_kd``
at ``--kd-alpha 1`` without label smoothing.

Generation (:func:`sample_outputs`): an incremental decoder of ours over the
student's fairseq decoder, in eval mode (no dropout: the student's policy as
at test time) under ``torch.no_grad``, sampling each token from
softmax(logits / tau) (``--sample-temperature``; 0 = greedy) with a
``torch.Generator`` of its own, never fairseq's global stream (so dropout is
unchanged).  As fairseq's generator: pad is never produced, an output has at
least one token before EOS, and at most ``int(a * src_len + b)`` tokens
(``--onpolicy-max-len-a/-b``; src_len counts the source's EOS, as fairseq)
within both models' maximum target positions, then EOS.  Outputs become
fairseq targets (:func:`as_fairseq_targets`): tokens then EOS, right-padded,
``prev_output_tokens`` = EOS + target[:-1], padding where the target pads.
The student then runs a normal forward pass on them (dropout, gradient,
through its DDP wrapper), so gradients reach the student only through that
scoring pass; the sampled tokens are integers from a no-grad pass.

Randomness (:func:`step_generators`): two generators per forward pass, seeded
from (update seed, micro-batch index within the update), the sampling one
also from the data-parallel rank.  The update seed is the one fairseq's
trainer gives torch at the start of every update, ``--seed`` + the number of
updates done (:func:`update_seed`; fairseq does it so that a resumed run is
reproducible), and the micro-batch index counts the forward passes of an
update from 0: a run resumed from a checkpoint draws, at update k, what the
unbroken run drew.

DDP: the on-policy decision is drawn from the rank-free generator, so every
rank takes the same decision for the same micro-batch: a global batch is
wholly on- or off-policy, as a single process would draw it once for the
union of the ranks' batches.  Each rank samples the outputs of its own
sentences with its own stream; the replicas hold the same weights, so each
sentence's output is an independent draw from the same student distribution
as in one process on the union batch, and the trainer sums losses, sample
sizes and gradients over ranks exactly as over sentences.  The result is the
single-process update on the union batch up to which random draws were
made (in distribution, not bit for bit).  ``--update-freq``: each
micro-batch is a forward pass with its own index, hence its own draws.

Validation (criterion in eval mode) never samples: it scores the batch's
targets, so the validation loss moves only with the student.
"""
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from fairseq.criterions import register_criterion
from fairseq.dataclass import FairseqDataclass
from fairseq.logging import metrics
from omegaconf import II

from fairseq_kd.criterions.kd_base import KDCriterionBase, check_unit_interval
from fairseq_kd.errors import require
from fairseq_kd.hidden_states import unwrap_model
from fairseq_kd.losses import jsd_kd_loss
from fairseq_kd.losses.common import upcast
from fairseq_kd.teacher import Teacher

# what each generator of a step is for (part of its seed)
DECISION_STREAM, SAMPLING_STREAM = 0, 1


@dataclass
class OnPolicyKDConfig(FairseqDataclass):
    onpolicy_ratio: float = field(
        default=0.5,
        metadata={"help": "lambda in [0, 1]: probability that a training batch's targets are the "
                  "student's own outputs (sampled without gradient); otherwise the batch's "
                  "targets (gold, or --distilled-data)"},
    )
    jsd_beta: float = field(
        default=0.5,
        metadata={"help": "beta in [0, 1] of the generalized JSD between teacher q and student p, "
                  "mixture beta*q + (1-beta)*p, scaled by 1/(beta(1-beta)): 0 = forward "
                  "KL(q||p) (word-level KD), 1 = reverse KL(p||q), both exact"},
    )
    sample_temperature: float = field(
        default=1.0,
        metadata={"help": "temperature tau >= 0 of the student's sampling of its outputs; "
                  "0 = greedy decoding"},
    )
    onpolicy_max_len_a: float = field(
        default=1.5,
        metadata={"help": "a generated output has at most int(a * src_len + b) tokens before "
                  "EOS (src_len with the source's EOS, as fairseq-generate's --max-len-a)"},
    )
    onpolicy_max_len_b: int = field(
        default=10,
        metadata={"help": "b of the maximum generated length int(a * src_len + b)"},
    )
    kd_temperature: float = field(
        default=1.0,
        metadata={"help": "softmax temperature T of teacher and student in the divergence "
                  "(scaled by T^2, as word-level KD); generation uses --sample-temperature"},
    )
    kd_topk: int = field(
        default=0,
        metadata={"help": "0: the teacher's full distribution; k > 0: its k best tokens, "
                  "renormalised (only with --jsd-beta 0: the mixture needs every token)"},
    )
    report_accuracy: bool = field(
        default=False, metadata={"help": "report the accuracy on the trained targets"},
    )
    sentence_avg: bool = II("optimization.sentence_avg")


def update_seed():
    """The seed of the current update: fairseq's trainer seeds torch with ``--seed`` +
    the number of updates done at the start of every update (``Trainer._set_seed``),
    for runs that resume reproducibly.  Read back without drawing from torch's stream.

    (A criterion is told neither the update number nor the seed; the update
    number fairseq logs to its metrics is stale after a resume: its
    ``metrics.load_state_dict`` replaces the aggregator it keeps logging to.)
    Outside a trainer: the last ``torch.manual_seed``.
    """
    return torch.initial_seed()


def data_parallel_rank():
    """This process's data-parallel rank (0 without torch.distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 0
    from fairseq.distributed import utils as distributed_utils

    return distributed_utils.get_data_parallel_rank()


def data_parallel_world_size():
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 1
    from fairseq.distributed import utils as distributed_utils

    return distributed_utils.get_data_parallel_world_size()


def seeded_generator(device, *key):
    """A torch.Generator on ``device`` seeded from the integers ``key``, mixed by numpy's
    SeedSequence (nearby keys give unrelated streams)."""
    seed = int(np.random.SeedSequence([int(k) % 2 ** 64 for k in key]).generate_state(1, np.uint64)[0])
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def step_generators(step_seed, micro, rank, device):
    """``(decision, sampling)`` generators of micro-batch ``micro`` of the update seeded
    ``step_seed``: the decision's (on CPU) is the same on every rank, the sampling one
    (on ``device``) is the rank's own."""
    return (seeded_generator("cpu", step_seed, micro, DECISION_STREAM),
            seeded_generator(device, step_seed, micro, SAMPLING_STREAM, rank))


def max_output_lengths(src_lengths, a, b, limit):
    """Per sentence, the most tokens an output may have before its EOS:
    ``min(int(a * src_len + b), limit)`` (fairseq-generate's rule, per sentence)."""
    return (src_lengths.double() * a + b).floor().long().clamp(0, limit)


def pick_tokens(logits, temperature, generator):
    """One token per row: argmax at temperature 0, else a draw from softmax(logits / tau)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@torch.no_grad()
def sample_outputs(model, src_tokens, src_lengths, max_lengths, temperature, generator, eos, pad):
    """The student's outputs for a batch of sources: (B, 1 + L) tokens, each row EOS
    (the decoder's start symbol), its output tokens, EOS, then pad.

    ``model``: the fairseq encoder-decoder (unwrapped), run in eval mode and put
    back in its previous mode.  ``max_lengths`` (B,): the most tokens before
    EOS per sentence.  A row has at least one token before EOS when its
    maximum allows one (fairseq's min_len 1); pad is never drawn.
    """
    was_training = model.training
    model.eval()
    try:
        encoder_out = model.encoder(src_tokens, src_lengths=src_lengths)
        state = {}  # the decoder's incremental state: each step feeds only the new token
        tokens = src_tokens.new_full((src_tokens.size(0), 1), eos)
        done = torch.zeros_like(src_lengths, dtype=torch.bool)
        for step in range(int(max_lengths.max()) + 1):
            logits, _ = model.decoder(tokens, encoder_out=encoder_out, incremental_state=state)
            logits = upcast(logits[:, -1, :]).clone()
            logits[:, pad] = -math.inf
            if step == 0:
                logits[max_lengths > 0, eos] = -math.inf
            at_limit = max_lengths <= step  # forced to end here
            logits[at_limit] = -math.inf
            logits[at_limit, eos] = 0.0
            nxt = pick_tokens(logits, temperature, generator).masked_fill(done, pad)
            tokens = torch.cat([tokens, nxt.unsqueeze(1)], dim=1)
            done |= nxt.eq(eos)
            if bool(done.all()):
                break
    finally:
        model.train(was_training)
    return tokens


def as_fairseq_targets(tokens, pad):
    """``(target, prev_output_tokens)`` of :func:`sample_outputs`'s rows, as fairseq's
    collater makes them: target = output + EOS, right-padded; prev_output_tokens =
    EOS + target[:-1], with pad wherever the target pads."""
    target = tokens[:, 1:]
    prev = tokens[:, :-1].masked_fill(target.eq(pad), pad)
    return target.contiguous(), prev.contiguous()


def with_targets(sample, target, prev_output_tokens, pad):
    """A sample of the same sentences whose targets are ``target``."""
    net_input = dict(sample["net_input"], prev_output_tokens=prev_output_tokens)
    return {"id": sample.get("id"), "nsentences": target.size(0), "ntokens": int(target.ne(pad).sum()),
            "net_input": net_input, "target": target}


def supervised_sample(sample):
    """The batch's own targets: the distilled ones when the task batches them, else gold."""
    distilled = sample.get("distilled")
    if distilled is None:
        return sample
    net_input = dict(sample["net_input"], prev_output_tokens=distilled["prev_output_tokens"])
    return {"id": sample.get("id"), "nsentences": distilled["target"].size(0),
            "ntokens": distilled["ntokens"], "net_input": net_input, "target": distilled["target"]}


@register_criterion("onpolicy_kd", dataclass=OnPolicyKDConfig)
class OnPolicyKDCriterion(KDCriterionBase):
    """D_beta on the student's own outputs (probability lambda) or on the batch's targets.

    Keeps its own ``forward`` (like ``hybrid_kd``): the targets, and with them
    ``sample_size``, are chosen inside the step, and there is no NLL term to
    mix; it reuses the base class's checks, logging output, accuracy and
    ``reduce_metrics``.
    """

    LOSS_TERMS = ("jsd_loss",)
    MEAN_STATS = ("onpolicy_share",)

    def __init__(self, task, onpolicy_ratio, jsd_beta, sample_temperature, onpolicy_max_len_a,
                 onpolicy_max_len_b, kd_temperature, kd_topk, report_accuracy, sentence_avg):
        check_unit_interval("--onpolicy-ratio", onpolicy_ratio)
        check_unit_interval("--jsd-beta", jsd_beta)
        require(sample_temperature >= 0,
                f"--sample-temperature must be >= 0 (0 = greedy), got {sample_temperature}")
        require(onpolicy_max_len_a >= 0 and onpolicy_max_len_b >= 0,
                f"--onpolicy-max-len-a/-b must be >= 0, got {onpolicy_max_len_a} and {onpolicy_max_len_b}")
        require(onpolicy_max_len_a > 0 or onpolicy_max_len_b >= 1,
                "--onpolicy-max-len-a 0 --onpolicy-max-len-b 0 allows no token before EOS")
        # The mixture beta*q + (1-beta)*p and the reverse KL read q on every token the
        # student may choose; a top-k teacher is 0 off its k tokens (KL(p||q) infinite at 1).
        require(kd_topk == 0 or jsd_beta == 0,
                f"--kd-topk {kd_topk} needs --jsd-beta 0: the JSD's mixture and the reverse KL need the "
                f"teacher's probability of every token, which a top-k teacher does not have")
        # alpha 1: the base class's word part is the whole loss; no label smoothing (no NLL term)
        super().__init__(task, sentence_avg, 0.0, 1.0, kd_temperature, kd_topk, 0, report_accuracy,
                         needs_teacher=True)
        require(isinstance(task.teacher, Teacher),
                "onpolicy_kd needs the teacher model (--teacher-path): it scores the student's own "
                "outputs, prefixes no --teacher-cache holds")
        self.ratio, self.beta = onpolicy_ratio, jsd_beta
        self.sample_temperature = sample_temperature
        self.max_len_a, self.max_len_b = onpolicy_max_len_a, onpolicy_max_len_b
        self.eos = task.target_dictionary.eos()
        self._step_seed, self._micro = None, 0  # the update seed of the last training pass, its passes so far

    def forward(self, model, sample, reduce=True):
        onpolicy, generated = False, {}
        if self.training:
            decision, sampling = self.next_generators(sample["net_input"]["src_tokens"].device)
            onpolicy = bool(torch.rand((), generator=decision) < self.ratio)
            generated = dict.fromkeys(("gen_tokens", "gen_sentences", "gen_seconds"), 0)
        if onpolicy:
            trained, generated = self.onpolicy_sample(model, sample, sampling)
        else:
            trained = supervised_sample(sample)
        # the student's scoring pass, through its wrapper (DDP must see the call)
        net_output = model(**trained["net_input"])
        teacher = self.task.teacher.distribution(trained, self.topk, like=model)
        loss, nll_loss, jsd = jsd_kd_loss(net_output[0], model.get_targets(trained, net_output), teacher,
                                          self.padding_idx, self.beta, self.temperature)
        sample_size = self.sample_size(trained)
        stats = {"onpolicy_share": float(onpolicy)} if self.training else None
        logging_output = self.logging_output(trained, loss, nll_loss, sample_size, stats,
                                             jsd_loss=jsd, **generated)
        self.add_accuracy(logging_output, model, net_output, trained)
        return loss, sample_size, logging_output

    def next_generators(self, device):
        """The (decision, sampling) generators of this training pass; advances the
        pass count of the current update."""
        step_seed = update_seed()
        if step_seed != self._step_seed:
            self._step_seed, self._micro = step_seed, 0
        micro, self._micro = self._micro, self._micro + 1
        return step_generators(step_seed, micro, data_parallel_rank(), device)

    def onpolicy_sample(self, model, sample, generator):
        """(the batch with the student's outputs as targets, the generation's logged sums)."""
        student = unwrap_model(model)  # no gradient, no DDP bookkeeping: the bare model
        src_tokens, src_lengths = sample["net_input"]["src_tokens"], sample["net_input"]["src_lengths"]
        limits = max_output_lengths(src_lengths, self.max_len_a, self.max_len_b,
                                    self.output_length_limit(student))
        start = time.perf_counter()
        tokens = sample_outputs(student, src_tokens, src_lengths, limits, self.sample_temperature,
                                generator, self.eos, self.padding_idx)
        if tokens.is_cuda:
            torch.cuda.synchronize(tokens.device)
        seconds = time.perf_counter() - start
        trained = with_targets(sample, *as_fairseq_targets(tokens, self.padding_idx), self.padding_idx)
        # summed over ranks by fairseq: per rank, the mean over ranks
        return trained, {"gen_tokens": trained["ntokens"], "gen_sentences": tokens.size(0),
                         "gen_seconds": seconds / data_parallel_world_size()}

    def output_length_limit(self, student):
        """The most tokens before EOS that both student and teacher accept as a target."""
        limits = [student.max_decoder_positions()]
        teacher_limits = self.task.teacher.max_positions()
        if teacher_limits is not None:
            limits.append(teacher_limits[1])
        return min(limits) - 1

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        """The base class's metrics, plus ``gen_len`` (generated target tokens, EOS
        included, per generated sentence) and ``gen_seconds`` (seconds spent generating
        per update, mean over ranks; 0 for an off-policy update), in training."""
        super().reduce_metrics(logging_outputs)
        if not any("gen_seconds" in log for log in logging_outputs):
            return  # validation: nothing is generated

        def total(key):
            return sum(log.get(key, 0) for log in logging_outputs)

        sentences = total("gen_sentences")
        # weighted by generated sentences: a mean over updates counts only what was
        # generated, and an interval without any shows 0 (weight 0), not None
        metrics.log_scalar("gen_len", total("gen_tokens") / max(sentences, 1), sentences, round=2)
        metrics.log_scalar("gen_seconds", total("gen_seconds"), 1, round=3)
