"""Building a distilled corpus (``fairseq-kd corpus``): the teacher's translation of a split.

:mod:`.data` reads the binarized split and plans chunks, shards and batches;
:mod:`.translators` translates a chunk with either backend (fairseq's
SequenceGenerator or CTranslate2) behind one interface, into candidates per
source; :mod:`.select` chooses the kept ones (beam order, Seq-Inter, MBR;
one or n per source); :mod:`.build` runs the chunks in worker processes,
saves each one (resume), and merges them, dropping the pairs that
:mod:`.filters` rejects.
"""
